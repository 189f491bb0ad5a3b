"""Probe: back-to-back batch-1 generations, and what an idle gap before each call changes.

LLaDA-8B shape, random bf16 weights, unstacked layout: the batch-1 generation (prompt 64 + 64 new
tokens, 64 steps) without and with the |F| = 400, q = 4 edit at layer 19 resid
(`generation_ab.compiled_variants`). After one untimed call of each, --calls timed calls of the
no-edit program, then --calls of the edit program, each call's wall time per step recorded, with
nothing (--mode default: back to back), `gc.collect()` (gc_each) or `time.sleep(--gap-s)` (sleep) before
each call and outside its timing, or with the collector disabled (gc_off). Also the number of
garbage collections inside each timed call. One mode per process (what happens depends on the
process's history):

    for m in default gc_off gc_each sleep; do
        python benchmarks/probes/back_to_back.py --mode $m --out /tmp/b2b_$m.json; done      # GPU
    python benchmarks/probes/back_to_back.py --mode sleep --out /tmp/b2b.json --tiny          # CPU smoke
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402

import jax  # noqa: E402

from generation_ab import compiled_variants, unstacked_model_and_memory  # noqa: E402
from timerome_jax.io import write_json  # noqa: E402
from timerome_jax.method import memory as mem_lib  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=("default", "gc_off", "gc_each", "sleep"), default="default")
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--gap-s", type=float, default=0.05, help="the sleep of --mode sleep")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    cfg = C.model_config(args.tiny)
    up, mem, rng = unstacked_model_and_memory(cfg, args.tiny)
    run_base, progs = compiled_variants(up, cfg, mem, args.steps, mem_lib.EditMemory, "delta",
                                        {"library": mem_lib.EditMemory.delta}, rng)
    run_edit = progs["library"]["run"]
    C.block(run_base())
    C.block(run_edit())
    if args.mode == "gc_off":
        gc.collect()
        gc.disable()
    collections = []

    def n_collections():
        return sum(s["collections"] for s in gc.get_stats())

    def timed(fn):
        ms = []
        for _ in range(args.calls):
            if args.mode == "gc_each":
                gc.collect()
            elif args.mode == "sleep":
                time.sleep(args.gap_s)
            c0 = n_collections()
            t0 = time.perf_counter()
            C.block(fn())
            ms.append(1e3 * (time.perf_counter() - t0) / args.steps)
            collections.append(n_collections() - c0)
        return ms

    rec = {"device": jax.devices()[0].device_kind, "mode": args.mode, "gap_s": args.gap_s if args.mode == "sleep"
           else None, "steps": args.steps, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rec["no_edit"] = timed(run_base)  # ms per step, one entry per call
    rec["edit"] = timed(run_edit)
    rec["gc_collections_per_call"] = collections
    write_json(args.out, rec)
    for k in ("no_edit", "edit"):
        print(f"[b2b] {args.mode} {k}: " + " ".join(f"{x:.3f}" for x in rec[k]), flush=True)


if __name__ == "__main__":
    main()
