"""Smoke benchmark: an LLaDA-8B-shaped model with random bf16 weights, forward + 64-step generation.

    python benchmarks/probes/smoke_llada8b.py --out /tmp/smoke_llada8b.json
    python benchmarks/probes/smoke_llada8b.py --tiny --out /tmp/smoke_tiny.json   # same code, small config, CPU, seconds

Measures, on jax.devices()[0]:
- init: time to create the random bf16 params ON the device (one jitted init; nothing big on host);
- forward: compile time (AOT lower + compile) and steady-state time (median of --repeats runs) of
  one forward on a [1, 256] batch;
- generate: compile time and steady-state time of a --steps step generation of --gen-length tokens
  after a --prompt-length prompt, at batch 1 and (if memory allows) batch 8;
- peak device memory (memory_stats()['peak_bytes_in_use'], None on CPU), recorded after each phase;
  it is the running peak since the process started, so later phases include earlier ones.
If --attn auto picks cudnn and the cudnn forward fails, the error is recorded ("cudnn_error") and
everything is measured with the xla attention instead ("attn_impl_used").
Writes a JSON file (device kind, jax version, config, all timings) atomically to --out.
Random weights: the numbers are speed and memory only, never quality.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from timerome_jax.backbone import model
from timerome_jax.diffusion import sampler  # noqa: E402
from timerome_jax.backbone.config import ModelConfig, llada_8b  # noqa: E402
from timerome_jax.io import write_json  # noqa: E402


def tiny_config(attn_impl: str) -> ModelConfig:
    return ModelConfig(family="llada", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                       head_dim=16, d_ff=128, mask_token_id=511, pad_token_id=0, eos_token_id=1,
                       max_seq_len=1024, dtype="bfloat16", attn_impl=attn_impl)


def init_on_device(key, cfg: ModelConfig, std: float = 0.02):
    """Random params in bfloat16, generated directly in bf16 inside one jit (no float32 copies)."""
    shapes = model.param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))

    def make(key):
        keys = jax.random.split(key, len(flat))
        leaves = []
        for k, (path, shp) in zip(keys, flat):
            if "norm" in jax.tree_util.keystr(path):
                leaves.append(jnp.ones(shp, jnp.bfloat16))
            else:
                leaves.append(jax.random.normal(k, shp, jnp.bfloat16) * jnp.bfloat16(std))
        return jax.tree.unflatten(treedef, leaves)

    return jax.jit(make)(key)


def peak_bytes():
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def in_use_bytes():
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("bytes_in_use", 0))


def time_compiled(fn, args, repeats: int):
    """Median wall time of fn(*args) (blocking), after one untimed warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_forward(params, cfg, seq_len: int, repeats: int):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.mask_token_id, (1, seq_len)), jnp.int32)
    pad_mask = jnp.ones((1, seq_len), bool)
    fwd = jax.jit(model.forward, static_argnames=("cfg",))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, tokens, cfg, pad_mask).compile()
    compile_s = time.perf_counter() - t0
    med, times = time_compiled(compiled, (params, tokens, pad_mask), repeats)
    return {"batch": 1, "seq_len": seq_len, "compile_s": compile_s, "median_s": med, "times_s": times,
            "tokens_per_s": seq_len / med, "peak_bytes_in_use": peak_bytes()}


def bench_generate(params, cfg, batch: int, prompt_length: int, gen_length: int, steps: int,
                   block_length, repeats: int):
    rng = np.random.default_rng(batch)
    prompts = [list(rng.integers(2, cfg.mask_token_id, prompt_length)) for _ in range(batch)]
    scfg = sampler.SamplerConfig(steps=steps, block_length=block_length)
    x, pad_mask, prompt_mask = sampler.make_canvas(prompts, gen_length, cfg)
    sched = sampler.schedule(x, pad_mask, cfg, scfg)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    compiled = sampler.generate_scan.lower(params, x, pad_mask, prompt_mask, sched, key, None, cfg=cfg,
                                           scfg=scfg, return_history=False).compile()
    compile_s = time.perf_counter() - t0
    med, times = time_compiled(compiled, (params, x, pad_mask, prompt_mask, sched, key, None), repeats)
    out = np.asarray(compiled(params, x, pad_mask, prompt_mask, sched, key, None))
    left = int((out[:, -gen_length:] == cfg.mask_token_id).sum())
    return {"batch": batch, "prompt_length": prompt_length, "gen_length": gen_length, "steps": steps,
            "block_length": block_length, "compile_s": compile_s, "median_s": med, "times_s": times,
            "step_ms": 1e3 * med / steps, "new_tokens_per_s": batch * gen_length / med,
            "masks_left_after_generation": left, "peak_bytes_in_use": peak_bytes()}


def _jaxlib_version():
    try:
        import jaxlib
        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--tiny", action="store_true", help="small config (CPU, seconds); same code path")
    ap.add_argument("--attn", choices=("auto", "cudnn", "xla"), default="auto",
                    help="attention impl; auto = cudnn on GPU (falls back to xla, recorded, if cudnn fails)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median; >= 5)")
    ap.add_argument("--seq-len", type=int, default=None, help="forward length (default 256; --tiny 32)")
    ap.add_argument("--prompt-length", type=int, default=None, help="default 128; --tiny 16")
    ap.add_argument("--gen-length", type=int, default=None, help="default 128; --tiny 16")
    ap.add_argument("--steps", type=int, default=None, help="default 64; --tiny 8")
    ap.add_argument("--block-length", type=int, default=None, help="default: one block")
    ap.add_argument("--no-batch8", action="store_true", help="skip the batch-8 generation")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")
    # --tiny shrinks the shapes too (a 2-core CPU runs [8, 256] tiny forwards at ~10 per second)
    for name, full, tiny in (("seq_len", 256, 32), ("prompt_length", 128, 16), ("gen_length", 128, 16),
                             ("steps", 64, 8)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)

    dev = jax.devices()[0]
    gpu = dev.platform == "gpu"
    attn = args.attn if args.attn != "auto" else ("cudnn" if gpu else "xla")
    cfg = tiny_config(attn) if args.tiny else llada_8b().replace(dtype="bfloat16", attn_impl=attn)
    result = {"device_kind": dev.device_kind, "platform": dev.platform, "n_devices": jax.device_count(),
              "jax_version": jax.__version__, "jaxlib_version": _jaxlib_version(),
              "tiny": args.tiny, "config": cfg.to_dict(), "repeats": args.repeats,
              "note": "random weights: speed and memory only"}

    t0 = time.perf_counter()
    params = jax.block_until_ready(init_on_device(jax.random.PRNGKey(0), cfg))
    result["init_s"] = time.perf_counter() - t0
    result["param_count"] = int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
    result["param_bytes"] = int(sum(a.nbytes for a in jax.tree.leaves(params)))
    result["bytes_in_use_after_init"] = in_use_bytes()

    try:
        result["forward"] = bench_forward(params, cfg, args.seq_len, args.repeats)
    except Exception as e:  # noqa: BLE001 - a cudnn failure is recorded, then xla is measured
        if args.attn != "auto" or cfg.attn_impl != "cudnn":
            raise
        result["cudnn_error"] = f"{type(e).__name__}: {e}"[:2000]
        cfg = cfg.replace(attn_impl="xla")
        result["config"] = cfg.to_dict()
        result["forward"] = bench_forward(params, cfg, args.seq_len, args.repeats)
    result["attn_impl_used"] = cfg.attn_impl

    gen = dict(prompt_length=args.prompt_length, gen_length=args.gen_length, steps=args.steps,
               block_length=args.block_length, repeats=args.repeats)
    result["generate_b1"] = bench_generate(params, cfg, 1, **gen)
    if not args.no_batch8:
        try:
            result["generate_b8"] = bench_generate(params, cfg, 8, **gen)
        except Exception as e:  # noqa: BLE001 - out of memory is a result, not a crash
            result["generate_b8"] = {"error": f"{type(e).__name__}: {e}"[:2000],
                                     "traceback": traceback.format_exc()[-4000:]}
    result["peak_bytes_in_use"] = peak_bytes()
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
