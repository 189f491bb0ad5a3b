"""Probe: few-row GEMMs (a 128-token canvas times each weight) by XLA, cuBLAS (torch), the library's
Pallas split-K kernel (`gemm.small_m_matmul`) and JAX's Mosaic GPU Hopper matmul, and the batch-1
generation step with `matmul_impl` "xla" and "pallas".

For each weight shape of a batch-1 step ([4096, 4096]: q, k, v, o; [4096, 12288]: gate, up;
[12288, 4096]: down; and the [4096, 126464] LM head), a [128, K] bf16 canvas is multiplied by
distinct weights (about 2 GiB in all, each read once) inside one jitted call, the float32 products
summed; time = the median host time of --calls calls; the row's figure is weight bytes per second.
Each kernel row also records its max relative error against XLA's product on the first weight.
The step rows time the library's `sampler.generate_scan` (unstacked, prompt 64 + 64 new tokens,
64 steps) at the 8B shape; "pallas_best" runs it with the sweep's fastest tiles per shape.

    python benchmarks/probes/gemm_m128.py --out /tmp/gemm.json          # GPU
    python benchmarks/probes/gemm_m128.py --out /tmp/gemm.json --tiny   # CPU smoke (interpreter)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from timerome_jax.backbone import gemm  # noqa: E402
from probes.bandwidth import canvas_and_weights, host_timed  # noqa: E402

T = gemm.Tiles
SWEEP = {
    (4096, 4096): [T(128, 4), T(128, 8), T(128, 4, 128, 4, 3), T(128, 8, 128, 8, 3), T(64, 2), T(64, 4),
                   T(64, 4, 128), T(256, 8, 64, 8, 3), T(128, 2), T(64, 8), T(128, 16), T(128, 8, 64, 4, 6)],
    (4096, 12288): [T(128, 1), T(128, 2), T(128, 4), T(64, 1), T(64, 2), T(128, 2, 128, 8, 3), T(256, 1, 64, 8, 3),
                    T(256, 2, 64, 8, 3), T(128, 2, 64, 4, 6)],
    (12288, 4096): [T(128, 4), T(128, 8), T(128, 16), T(64, 4), T(64, 8), T(128, 8, 128, 8, 3),
                    T(256, 8, 64, 8, 3), T(128, 8, 64, 4, 6)],
    (4096, 126464): [T(128, 1), T(256, 1, 64, 8, 3), T(128, 1, 128, 8, 3), T(128, 2)],
}
TINY_SWEEP = {(256, 256): [T(64, 2), T(128, 1)], (512, 128): [T(64, 4), T(128, 2, 32)]}


def chain_rows(t, kk, n, total, calls, tiles_list, interpret, deadline) -> dict:
    """XLA, torch and every Tiles of tiles_list on one shape: weight bytes per second."""
    h, ws = canvas_and_weights(t, kk, n, total)
    w_bytes = sum(w.nbytes for w in ws)
    ref = jnp.dot(h, ws[0], preferred_element_type=jnp.float32)
    rows = {}

    def record(name, one):
        if time.perf_counter() > deadline:
            rows[name] = {"error": "skipped: --budget-s spent"}
            return
        try:
            err = float(jnp.max(jnp.abs(one(h, ws[0]) - ref)) / jnp.max(jnp.abs(ref)))
            prog = jax.jit(lambda h, ws: sum(one(h, w) for w in ws))
            ts = host_timed(lambda: prog(h, ws), calls)
        except Exception as e:  # noqa: BLE001 - a kernel that does not lower is a result too
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            print(f"[gemm] K{kk} N{n} {name}: {rows[name]['error'][:160]}", flush=True)
            return
        tm = statistics.median(ts)
        rows[name] = {"time_s": tm, "bytes_per_s": w_bytes / tm, "rel_err": err, "matrices": len(ws)}
        print(f"[gemm] K{kk} N{n} {name}: {w_bytes / tm / 1e12:.3f} TB/s (rel err {err:.1e})", flush=True)

    record("xla", lambda h, w: jnp.dot(h, w, preferred_element_type=jnp.float32))
    for tl in tiles_list:
        if gemm.fits(t, kk, n, tl):
            record(f"pallas_n{tl.block_n}_s{tl.split_k}_k{tl.block_k}_w{tl.num_warps}_st{tl.num_stages}",
                   lambda h, w, tl=tl: gemm.small_m_matmul(h, w, tl, interpret=interpret))
    if not interpret:
        mosaic_rows(record)
        rows.update(torch_row(h, ws, calls))
    return rows


def mosaic_rows(record) -> None:
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    dims = hm.MatmulDimension
    for tm, tn, wg, steps in ((64, 64, dims.M, 4), (64, 64, dims.N, 4), (64, 32, dims.M, 6), (64, 128, dims.N, 4)):
        cfg = hm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=64, max_concurrent_steps=steps, wg_dimension=wg,
                              epi_tile_n=min(64, tn), epi_tile_m=64)
        record(f"mosaic_m{tm}_n{tn}_{wg}_st{steps}",
               lambda h, w, cfg=cfg: hm.matmul(h, w, None, cfg).astype(jnp.float32))


def torch_row(h, ws, calls) -> dict:
    import numpy as np
    import torch

    dev = C.torch_device()
    th = torch.from_numpy(np.asarray(h.astype(jnp.float32))).to(dev).to(torch.bfloat16)
    tw = [torch.from_dlpack(w) for w in ws]
    fn = lambda: [torch.mm(th, w) for w in tw]  # noqa: E731
    fn()
    ts = []
    for _ in range(calls):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    tm = statistics.median(ts)
    w_bytes = sum(w.nbytes for w in ws)
    print(f"[gemm] torch.mm: {w_bytes / tm / 1e12:.3f} TB/s", flush=True)
    return {"torch_mm": {"time_s": tm, "bytes_per_s": w_bytes / tm}}


def step_rows(args, best: dict) -> dict:
    import numpy as np

    from timerome_jax.backbone import model as model_lib
    from timerome_jax.diffusion import sampler

    cfg0 = C.model_config(args.tiny)
    up = model_lib.unstack(C.init_params(jax.random.key(0), cfg0, C.default_init_std(args.tiny)), consume=True)
    rng = np.random.default_rng(1)
    prompt = C.random_tokens(rng, (1, 64), cfg0)
    x, pad, pm = sampler.make_canvas(prompt.tolist(), 64, cfg0)
    scfg = sampler.SamplerConfig(steps=64)
    sched = sampler.schedule(x, pad, cfg0, scfg)
    key = jax.random.key(3)
    w_bytes = C.weight_bytes(cfg0)
    rows, tokens = {}, {}
    variants = [("xla", "xla", {}), ("pallas_default", "pallas", {}), ("pallas_best", "pallas", best)]
    for name, impl, tuned in variants:
        if name == "pallas_best" and not tuned:
            continue
        cfg = cfg0.replace(matmul_impl=impl)
        saved = dict(gemm.TUNED)
        gemm.TUNED.update(tuned)  # the sweep's tiles for this row only
        jax.clear_caches()  # the traces hold the tiles chosen when they were made
        try:
            t0 = time.perf_counter()
            prog = sampler.generate_scan.lower(up, x, pad, pm, sched, key, None, cfg=cfg, scfg=scfg,
                                               return_history=False).compile()
            comp = time.perf_counter() - t0
            out = prog(up, x, pad, pm, sched, key, None)
            tokens[name] = np.asarray(jax.tree.leaves(out)[0])
            ts = host_timed(lambda: prog(up, x, pad, pm, sched, key, None), args.calls)
        except Exception as e:  # noqa: BLE001
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            print(f"[step] {name}: {rows[name]['error'][:200]}", flush=True)
            continue
        finally:
            gemm.TUNED.clear()
            gemm.TUNED.update(saved)
        step = statistics.median(ts) / 64
        same = bool(np.array_equal(tokens[name], tokens["xla"])) if "xla" in tokens else None
        rows[name] = {"step_s": step, "compile_s": comp, "weight_bytes": w_bytes, "bytes_per_s": w_bytes / step,
                      "tokens_equal_xla": same, "tiles": {f"{k}": str(v) for k, v in tuned.items()}}
        print(f"[step] {name}: {1e3 * step:.3f} ms, {w_bytes / step / 1e12:.3f} TB/s of weights, "
              f"tokens = xla: {same} (compile {comp:.1f} s)", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--calls", type=int, default=7)
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop sweeping after this many seconds")
    ap.add_argument("--no-step", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    rec = {"device": jax.devices()[0].device_kind, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "shapes": {}, "best": {}}
    t = 16 if args.tiny else 128
    total = (1 << 20) if args.tiny else (2048 << 20)
    best = {}
    for (kk, n), tiles_list in (TINY_SWEEP if args.tiny else SWEEP).items():
        rows = chain_rows(t, kk, n, total, args.calls, tiles_list, args.tiny, deadline)
        rec["shapes"][f"K{kk}_N{n}"] = rows
        timed = {k: r for k, r in rows.items() if k.startswith("pallas") and "bytes_per_s" in r}
        if timed:
            name = max(timed, key=lambda k: timed[k]["bytes_per_s"])
            idx = [f"pallas_n{tl.block_n}_s{tl.split_k}_k{tl.block_k}_w{tl.num_warps}_st{tl.num_stages}"
                   for tl in tiles_list].index(name)
            best[(kk, n)] = tiles_list[idx]
            rec["best"][f"K{kk}_N{n}"] = {"name": name, "bytes_per_s": timed[name]["bytes_per_s"],
                                          "xla_bytes_per_s": rows.get("xla", {}).get("bytes_per_s")}
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)
    if not args.no_step:
        rec["step"] = step_rows(args, best)
    rec["wall_s"] = time.perf_counter() - t_start
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
