"""The frozen model: config, the pure forward over stacked layers, interventions as data, tokenizers,
loading/saving of HF (`hf_config`, `hf_weights`) and Orbax (`checkpoint`) checkpoints, and a Flax NNX
view of the same arrays (`nnx.MDLM`).

Jitted entry points, one convention across the package
------------------------------------------------------
* A pure function is jitted once, at module level: `entry = jax.jit(_impl, static_argnames=(...))`
  (e.g. `trace.trajectory`, `trace.run_lanes`, `sampler.generate_scan`, `likelihood._elbo_jit`). No `@jax.jit` decorators and no `jax.jit` inside functions, so there
  is one compiled cache per entry point and the traced body stays callable on its own.
* Static arguments are the hashable frozen configs (`ModelConfig`, `SamplerConfig`, `TraceConfig`)
  and the Python ints that fix shapes or code structure (e.g. `n_mc`, `return_history`). Every
  other input is data, including interventions and edit memories (`Intervene`), so new values
  never recompile.
* The public function (`generate`, `elbo`, `trace`) checks its inputs eagerly, with errors
  naming the argument and shape, and then calls the jitted entry point.
* The forward itself (`model.run` / `model.forward`) is not jitted: it is always called inside one of
  those entry points (or by the caller's own `jax.jit` / `nnx.jit`).
* The one exception: functions that close over a runtime object (a device `Mesh` in
  `method.sharding`) are built by an `functools.lru_cache`d factory returning `jax.jit(f)`.
"""
