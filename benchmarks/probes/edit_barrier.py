"""Probe: does fencing the edit off from XLA's fusion decisions cut its batch-1 overhead?

Unstacked layout, LLaDA-8B shape (--layers layers), batch 1, prompt 64 + 64 new tokens, --steps
steps, an |F| = 400, q = 4 edit at layer 19 resid. Variants of `intervene.apply_edit` swapped in
before tracing: `plain` (the library's) and `barrier` (the edit's input and output pass through
`lax.optimization_barrier`, so the layers around it compile as they do without an edit). Each is
timed against no edit in interleaved pairs. Writes --out (JSON) and prints one line per variant.

    python benchmarks/probes/edit_barrier.py --out /tmp/eb.json            # GPU
    python benchmarks/probes/edit_barrier.py --out /tmp/eb.json --tiny     # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from generation_ab import summary, timed_variants, unstacked_model_and_memory  # noqa: E402
from timerome_jax.backbone import intervene as iv_lib  # noqa: E402
from timerome_jax.backbone import model as model_lib  # noqa: E402

LIBRARY = iv_lib.apply_edit


def fenced(h, edit, step, module):
    if edit is None or edit.module != module:
        return h
    return jax.lax.optimization_barrier(LIBRARY(jax.lax.optimization_barrier(h), edit, step, module))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    cfg = C.model_config(args.tiny)
    if not args.tiny:
        cfg = cfg.replace(n_layers=args.layers)
    up, mem, rng = unstacked_model_and_memory(cfg, args.tiny)
    rec = {"device": jax.devices()[0].device_kind, "layers": cfg.n_layers, "steps": args.steps, "variants": {}}
    toks = {}
    for r in timed_variants(up, cfg, mem, args.steps, model_lib, "apply_edit", {"plain": LIBRARY, "barrier": fenced},
                            args.repeats, rng):
        name = r["name"]
        toks[name] = np.asarray(r["edit"]["out"]).tolist()
        v = rec["variants"][name] = summary(r, args.steps)
        print(f"[edit_barrier] {name}: {v['step_ms_no_edit']:.3f} -> {v['step_ms_edit']:.3f} ms, overhead "
              f"{v['overhead_pct_median_pair']:.2f}% (pairs) / {v['overhead_pct_of_medians']:.2f}% (medians)", flush=True)
    rec["tokens_equal"] = toks["plain"] == toks["barrier"]
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
