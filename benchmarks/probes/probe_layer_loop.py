"""Probe: what the layer loop costs at batch 1, and what the edit adds (one variant per process).

    python benchmarks/probes/probe_layer_loop.py --out R --label scan                      # as shipped
    python benchmarks/probes/probe_layer_loop.py --out R --label unroll --unroll 32        # fully unrolled
    XLA_FLAGS=... python benchmarks/probes/probe_layer_loop.py --out R --label flagname    # an XLA option
    python benchmarks/probes/probe_layer_loop.py --out /tmp/r --tiny                       # CPU, seconds

Why: the h100_call3 profile of generation showed 8 weight-slice copies per layer iteration
(`memcpy128`, 16384 per 64-step generation): the rolled `lax.scan` copies each layer's weights out
of the stack before its matmuls, which at batch 1 reads and writes the weights twice more than the
floor. This script times, in one process: the forward at batch 1 and 32 (no edit / with the
|F| = 400, q = 4 edit at layer 19 resid, interleaved), a 64-step generation at batch 1 (no edit /
edit, interleaved), the |F| = 1 capture and the model fingerprint; and counts, in the optimized HLO
of the batch-1 forward, the copy-like ops. It appends one JSON line per run to R/probe.jsonl.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
import common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_generate import make_memory  # noqa: E402
from timerome_jax.method import capture as cap_lib  # noqa: E402
from timerome_jax.backbone import model as model_lib  # noqa: E402
from timerome_jax.diffusion import sampler  # noqa: E402
from timerome_jax.backbone.intervene import Intervene  # noqa: E402


def hlo_counts(compiled) -> dict:
    text = compiled.as_text() or ""
    pats = {"dynamic-slice": r"= [^\n]*dynamic-slice\(", "copy": r"= [^\n]* copy\(", "custom-call": r"custom-call\(",
            "while": r"= [^\n]* while\(", "conditional": r"= [^\n]* conditional\(",
            "dynamic_slice_fusion": r"dynamic_address_computation|dynamic_slice_fusion|__custom_fusion",
            "memcpy": r"memcpy|DynamicMemcpy"}
    return {k: len(re.findall(p, text)) for k, p in pats.items()}


def main(argv=None):
    ap = C.base_parser(__doc__)
    ap.add_argument("--label", default="scan")
    ap.add_argument("--unroll", dest="layer_unroll", type=int, default=1, help="= --layer-unroll")
    ap.add_argument("--what", default="fwd,gen,capture")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--dump-hlo", action="store_true", help="write the batch-1 forward's optimized HLO")
    ap.add_argument("--fwd-batches", default=None, help="comma list (1,32; --tiny 1,4)")
    args = ap.parse_args(argv)
    C.fill_sizes(args, (("layer", 19, 1), ("fwd_batches", "1,32", "1,4")))
    what = set(args.what.split(","))
    cfg, std, deadline, ceiling = C.start(args)
    rec = {"label": args.label, "unroll": args.layer_unroll, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    params = C.init_params(jax.random.key(args.seed), cfg, std)
    mem = make_memory(cfg, 16 if args.tiny else 400, 4, 0.5, args.layer, "resid", args.seed + 3)
    rng = np.random.default_rng(args.seed)
    T = 16 if args.tiny else 128
    fwd = jax.jit(lambda p, x, iv: model_lib.forward(p, x, cfg, intervene=iv))
    if "fwd" in what:
        for B in [int(b) for b in str(args.fwd_batches).split(",")]:
            x = jnp.asarray(C.random_tokens(rng, (B, T), cfg))
            t0 = time.perf_counter()
            comp = fwd.lower(params, x, Intervene()).compile()
            rec[f"fwd_b{B}_compile_s"] = time.perf_counter() - t0
            if B == 1:
                rec["hlo_no_edit"] = hlo_counts(comp)
                if args.dump_hlo:
                    with open(os.path.join(args.out, f"hlo_fwd_b1_{args.label}.txt"), "w") as fh:
                        fh.write(comp.as_text() or "")
                rec["hlo_edit"] = hlo_counts(fwd.lower(params, x, Intervene(edit=mem)).compile())
            a, b, ratios = C.measure_pair(lambda: fwd(params, x, Intervene()), lambda: fwd(params, x, Intervene(edit=mem)),
                                          want=10)
            rec[f"fwd_b{B}"] = {"no_edit_ms": 1e3 * a["steady_s"], "edit_ms": 1e3 * b["steady_s"],
                                "overhead_pct_median_ratio": 100 * (float(np.median(ratios)) - 1) if ratios else None,
                                "runs": a["n_steady"]}
            print(args.label, f"fwd_b{B}", rec[f"fwd_b{B}"], flush=True)
    if "gen" in what:
        steps = 8 if args.tiny else 64
        scfg = sampler.SamplerConfig(steps=steps, remasking="low_confidence", temperature=0.0)
        prompts = C.random_tokens(rng, (1, T // 2), cfg)
        x, pad, pm = sampler.make_canvas([list(p) for p in prompts], T - T // 2, cfg)
        sched = sampler.schedule(x, pad, cfg, scfg)
        key = jax.random.key(0)
        g = lambda iv: sampler.generate_scan(params, x, pad, pm, sched, key, iv, cfg=cfg, scfg=scfg, return_history=False)
        t0 = time.perf_counter()
        C.block(g(Intervene()))
        C.block(g(Intervene(edit=mem)))
        rec["gen_compile_s"] = time.perf_counter() - t0
        a, b, ratios = C.measure_pair(lambda: g(Intervene()), lambda: g(Intervene(edit=mem)), want=5)
        rec["gen_b1"] = {"no_edit_ms_per_step": 1e3 * a["steady_s"] / steps, "edit_ms_per_step": 1e3 * b["steady_s"] / steps,
                         "overhead_pct_median_ratio": 100 * (float(np.median(ratios)) - 1) if ratios else None,
                         "runs": a["n_steady"], "floor_ms_per_step": 1e3 * C.weight_bytes(cfg) / ceiling["bytes_per_s"]
                         if ceiling.get("bytes_per_s") else None}
        print(args.label, "gen_b1", rec["gen_b1"], flush=True)
    if "capture" in what:
        tok = C.random_tokens(rng, (1, T), cfg)
        cb = cap_lib.ClozeBatch(*(jnp.asarray(a) for a in (
            tok, np.ones((1, T), bool), np.arange(4)[None], np.ones((1, 4), bool), np.arange(8, 12)[None],
            np.ones((1, 4), bool), tok, np.ones((1, T), bool), np.arange(8, 12)[None], np.ones((1, 4), bool))))
        r = C.measure(lambda: cap_lib.capture(params, cfg, cb, args.layer, "resid", chunk=1), want=5)
        f = C.measure(lambda: cap_lib.model_fingerprint(params, cfg), want=5, sync=lambda x: x)
        rec["capture_f1_ms"] = 1e3 * r["steady_s"]
        rec["fingerprint_ms"] = 1e3 * f["steady_s"]
        print(args.label, "capture", rec["capture_f1_ms"], "fingerprint", rec["fingerprint_ms"], flush=True)
    rec["ceiling"] = {k: v for k, v in ceiling.items() if isinstance(v, (int, float, str))}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe.jsonl"), "a") as fh:
        fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
