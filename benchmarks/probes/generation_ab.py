"""Shared by the generation A/B probes (topq_sync.py, edit_barrier.py): a batch-1 canvas (prompt 64
random tokens + 64 masks), the library's jitted generation compiled ahead without an edit, and one
edit program per variant of a library function swapped in before tracing, each timed against no
edit in interleaved pairs (`common.measure_pair`).
"""
from __future__ import annotations

import functools
import os
import sys
import time
from typing import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from timerome_jax.backbone import model as model_lib  # noqa: E402
from timerome_jax.backbone.intervene import Intervene  # noqa: E402
from timerome_jax.diffusion import sampler  # noqa: E402
from timerome_jax.method import memory as mem_lib  # noqa: E402


def unstacked_model_and_memory(cfg, tiny: bool):
    """(unstacked random params, an |F| = 400, q = 4 memory of random keys at layer 19 resid (or the
    last layer), numpy Generator for the canvases): what the edit A/B probes time."""
    up = model_lib.unstack(C.init_params(jax.random.key(0), cfg, C.default_init_std(tiny)), consume=True)
    layer = min(19, cfg.n_layers - 1)
    rng = np.random.default_rng(1)
    u, v_o, v_t = (rng.standard_normal((400, cfg.d_model)).astype(np.float32) for _ in range(3))
    mem = mem_lib.build(u, 0.1 * v_o, 0.1 * v_t, lam=0.1 * cfg.d_model, alpha=1.0, q=4, layer=layer,
                        module="resid", step=-1, fingerprint="probe")
    return up, mem, rng


def summary(r: dict, steps: int) -> dict:
    """One `timed_variants` result -> compile seconds, per-step ms without / with the edit and the
    overhead (median of the per-pair ratios, ratio of the medians, microseconds per step)."""
    mn, me, ratios = r["no_edit"], r["edit"], r["ratios"]
    return {"compile_s": r["compile_s"], "step_ms_no_edit": 1e3 * mn["steady_s"] / steps,
            "step_ms_edit": 1e3 * me["steady_s"] / steps, "n_pairs": len(ratios),
            "overhead_pct_median_pair": 100 * (float(np.median(ratios)) - 1),
            "overhead_pct_of_medians": 100 * (me["steady_s"] / mn["steady_s"] - 1),
            "overhead_us_per_step": 1e6 * (me["steady_s"] - mn["steady_s"]) / steps}


def compiled_variants(params, cfg, mem, steps: int, module, attr: str, variants: dict,
                      rng: np.random.Generator) -> tuple[Callable, dict]:
    """The batch-1 no-edit generation and one edit program per (name, fn) of `variants` (module.attr
    = fn while tracing, caches cleared, then restored). Returns (run_base, {name: {"run", "compile_s",
    "program"}})."""
    prompt = C.random_tokens(rng, (1, 64), cfg)
    x, pad, pm = sampler.make_canvas(prompt.tolist(), 64, cfg)
    scfg = sampler.SamplerConfig(steps=steps)
    sched = sampler.schedule(x, pad, cfg, scfg)
    key = jax.random.key(3)

    pad = model_lib.attention_mask(pad)  # as `sampler.generate` hands it to the jitted scan

    def compiled(iv):
        return sampler.generate_scan.lower(params, x, pad, pm, sched, key, iv, cfg=cfg, scfg=scfg,
                                           return_history=False).compile()

    base = compiled(None)
    iv = Intervene(edit=mem)
    library = getattr(module, attr)
    out = {}
    for name, fn in variants.items():
        setattr(module, attr, fn)
        jax.clear_caches()  # the traced program is cached per function, not per what it inlined
        try:
            t0 = time.perf_counter()
            prog = compiled(iv)
            comp_s = time.perf_counter() - t0
        finally:
            setattr(module, attr, library)
        out[name] = {"run": functools.partial(prog, params, x, pad, pm, sched, key, iv), "compile_s": comp_s,
                     "program": prog}
    return functools.partial(base, params, x, pad, pm, sched, key, None), out


def timed_variants(params, cfg, mem, steps: int, module, attr: str, variants: dict, repeats: int,
                   rng: np.random.Generator) -> Iterator[dict]:
    """For each (name, fn) of `variants` (`compiled_variants`), time the edit program against the
    no-edit one in interleaved pairs. Yields {"name", "compile_s", "program" (compiled), "no_edit",
    "edit" (`measure_pair` results; "out" = tokens), "ratios" (per-pair edit / no edit)}."""
    run_base, progs = compiled_variants(params, cfg, mem, steps, module, attr, variants, rng)
    for name, p in progs.items():
        C.block(run_base())
        C.block(p["run"]())
        mn, me, ratios = C.measure_pair(run_base, p["run"], want=repeats)
        yield {"name": name, "compile_s": p["compile_s"], "program": p["program"], "no_edit": mn, "edit": me,
               "ratios": ratios}
