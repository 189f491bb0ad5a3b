"""Shared by the generation A/B probes (topq_sync.py, edit_barrier.py): a batch-1 canvas (prompt 64
random tokens + 64 masks), the library's jitted generation compiled ahead without an edit, and one
edit program per variant of a library function swapped in before tracing, each timed against no
edit in interleaved pairs (`common.measure_pair`).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from timerome_jax.backbone.intervene import Intervene  # noqa: E402
from timerome_jax.diffusion import sampler  # noqa: E402


def timed_variants(params, cfg, mem, steps: int, module, attr: str, variants: dict, repeats: int,
                   rng: np.random.Generator) -> Iterator[dict]:
    """For each (name, fn) of `variants`: set module.attr = fn, compile the generation with
    `Intervene(edit=mem)` (caches cleared, so fn is what gets traced), restore the attribute, and
    time the program against the no-edit one. Yields {"name", "compile_s", "program" (compiled),
    "no_edit", "edit" (`measure_pair` results; "out" = tokens), "ratios" (per-pair edit / no edit)}."""
    prompt = C.random_tokens(rng, (1, 64), cfg)
    x, pad, pm = sampler.make_canvas(prompt.tolist(), 64, cfg)
    scfg = sampler.SamplerConfig(steps=steps)
    sched = sampler.schedule(x, pad, cfg, scfg)
    key = jax.random.key(3)

    def compiled(iv):
        return sampler.generate_scan.lower(params, x, pad, pm, sched, key, iv, cfg=cfg, scfg=scfg,
                                           return_history=False).compile()

    base = compiled(None)
    iv = Intervene(edit=mem)
    library = getattr(module, attr)
    for name, fn in variants.items():
        setattr(module, attr, fn)
        jax.clear_caches()  # the traced program is cached per function, not per what it inlined
        try:
            t0 = time.perf_counter()
            prog = compiled(iv)
            comp_s = time.perf_counter() - t0
        finally:
            setattr(module, attr, library)
        run_base: Callable = lambda: base(params, x, pad, pm, sched, key, None)
        run_edit: Callable = lambda: prog(params, x, pad, pm, sched, key, iv)
        C.block(run_base())
        C.block(run_edit())
        mn, me, ratios = C.measure_pair(run_base, run_edit, want=repeats)
        yield {"name": name, "compile_s": comp_s, "program": prog, "no_edit": mn, "edit": me, "ratios": ratios}
