"""Probe: where the time goes in the two figures that miss their floors (GPU kernel summary).

At the LLaDA-8B shape (random bf16 weights): the edit install's capture at |F| = 1 (one cloze
pair of 128 tokens, forward to layer 19) in the stacked and the unstacked layout, and a batch-1
generation (prompt 64 + 64 new tokens, 16 steps) in the stacked layout. Each is run once under
`jax.profiler.trace(create_perfetto_trace=True)`; the trace's device events are summed by kernel
name. Writes --out (JSON): per case the wall time, the summed device-kernel time, the busy share
and the top kernels with their total time and count. The raw traces stay in --trace-dir.

    python benchmarks/probes/profile_summary.py --out /tmp/prof.json --trace-dir /tmp/prof   # GPU
    python benchmarks/probes/profile_summary.py --out /tmp/prof.json --trace-dir /tmp/prof --tiny

--what edit: instead, a batch-1 generation in the unstacked layout without and with an |F| = 400,
q = 4 edit at --layer (resid, every step), and the kernels whose summed time the edit changes most.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from timerome_jax.backbone import model as model_lib  # noqa: E402
from timerome_jax.backbone.intervene import Intervene  # noqa: E402
from timerome_jax.method import memory as mem_lib  # noqa: E402
from timerome_jax.diffusion import sampler  # noqa: E402
from timerome_jax.method import capture as cap_lib  # noqa: E402


def profiled(name: str, fn, trace_dir: str, rec: dict):
    C.block(fn())  # compile + warm
    C.block(fn())
    d = os.path.join(trace_dir, name)
    os.makedirs(d, exist_ok=True)
    t0 = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        C.block(fn())
    wall = time.perf_counter() - t0
    s = C.kernel_summary(d)
    s["wall_us_under_profiler"] = 1e6 * wall
    t0 = time.perf_counter()
    C.block(fn())
    s["wall_us"] = 1e6 * (time.perf_counter() - t0)
    s["busy_share_of_span"] = s["kernel_us_total"] / s["span_us"] if s["span_us"] else None
    rec[name] = s
    print(f"[profile] {name}: wall {s['wall_us'] / 1e3:.2f} ms, kernels {s['kernel_us_total'] / 1e3:.2f} ms over a "
          f"{s['span_us'] / 1e3:.2f} ms span; top: " + ", ".join(f"{k['name'][:40]} {k['us'] / 1e3:.2f} ms"
                                                             for k in s["top"][:5]), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--trace-dir", required=True)
    ap.add_argument("--layer", type=int, default=19)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--what", default="floors", choices=("floors", "edit"))
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args(argv)
    cfg = C.model_config(args.tiny)
    layer = min(args.layer, cfg.n_layers - 1)
    params = C.init_params(jax.random.key(0), cfg, C.default_init_std(args.tiny))
    rng = np.random.default_rng(1)
    if args.what == "edit":
        return edit_profile(args, cfg, layer, params, rng)
    T = 128
    toks = C.random_tokens(rng, (2, T), cfg)
    pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
    valid = np.ones((2, 8), bool)
    b = cap_lib.ClozeBatch(tokens_o=toks[:1], pad_o=np.ones((1, T), bool), subj_pos=pos[:1, :4],
                           subj_valid=valid[:1, :4], obj_pos=pos[:1, 4:], obj_valid=valid[:1, 4:],
                           tokens_t=toks[1:], pad_t=np.ones((1, T), bool), tgt_pos=pos[1:, 4:],
                           tgt_valid=valid[1:, 4:])
    rec = {"device": jax.devices()[0].device_kind, "shape": C.shape_info(cfg), "layer": layer}
    profiled("capture_f1_stacked", lambda: cap_lib.capture(params, cfg, b, layer, "resid"), args.trace_dir, rec)
    prompt = C.random_tokens(rng, (1, 64), cfg)
    x, pad, pm = sampler.make_canvas(prompt.tolist(), 64, cfg)
    scfg = sampler.SamplerConfig(steps=16)
    profiled("generate_b1_16steps_stacked", lambda: sampler.generate(params, cfg, scfg, x, pad, pm, 0),
             args.trace_dir, rec)
    up = model_lib.unstack(params, consume=True)  # frees the stacked leaves
    profiled("capture_f1_unstacked", lambda: cap_lib.capture(up, cfg, b, layer, "resid"), args.trace_dir, rec)
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)


def edit_profile(args, cfg, layer, params, rng):
    up = model_lib.unstack(params, consume=True)
    u, v_o, v_t = (rng.standard_normal((400, cfg.d_model)).astype(np.float32) for _ in range(3))
    mem = mem_lib.build(u, 0.1 * v_o, 0.1 * v_t, lam=0.1 * cfg.d_model, alpha=1.0, q=4, layer=layer, module="resid",
                        step=-1, fingerprint="probe")
    prompt = C.random_tokens(rng, (1, 64), cfg)
    x, pad, pm = sampler.make_canvas(prompt.tolist(), 64, cfg)
    scfg = sampler.SamplerConfig(steps=args.steps)
    rec = {"device": jax.devices()[0].device_kind, "shape": C.shape_info(cfg), "layer": layer, "steps": args.steps}
    iv = Intervene(edit=mem)
    profiled("generate_b1_unstacked_no_edit", lambda: sampler.generate(up, cfg, scfg, x, pad, pm, 0), args.trace_dir, rec)
    profiled("generate_b1_unstacked_edit", lambda: sampler.generate(up, cfg, scfg, x, pad, pm, 0, iv), args.trace_dir,
             rec)
    diff = C.kernel_diff(*(C.kernel_summary(os.path.join(args.trace_dir, f"generate_b1_unstacked_{n}"), 400)
                           for n in ("no_edit", "edit")))
    rec["kernel_diff_top"] = diff
    e, n = rec["generate_b1_unstacked_edit"], rec["generate_b1_unstacked_no_edit"]
    rec["per_step_us"] = {"wall_no_edit": n["wall_us"] / args.steps, "wall_edit": e["wall_us"] / args.steps,
                          "kernels_no_edit": n["kernel_us_total"] / args.steps,
                          "kernels_edit": e["kernel_us_total"] / args.steps}
    print("[profile] per step (us):", json.dumps(rec["per_step_us"]), flush=True)
    for d in diff[:12]:
        print(f"[profile]   {d['name'][:70]}: {d['us_base']:.0f} -> {d['us_other']:.0f} us "
              f"({d['count_base']} -> {d['count_other']})", flush=True)
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
