"""Probe: the batch-1 step's matmuls (a 128-token canvas times each weight) and the step itself.

Default: bf16-output GEMM chains over distinct weights (about 2 GiB per call, each product kept, as
in a forward) for the step's shapes and the fused ones ([4096, 12288] = q|k|v, [4096, 24576] =
gate|up), compiled under --option-sets, beside torch.mm (cuBLAS) on the same weights; then the
library's batch-1 generation (`sampler.generate_scan`, unstacked, prompt 64 + 64 new tokens, 64
steps, 8B shape) with separate matrices (`model.unfuse_layer`) and with the fused ones
(`model.unstack`), in interleaved rounds, each fused program under an option set.
--forms: each product written four ways (weight [K, N] or stored [N, K]; h @ w or (w^T h^T)^T).
--pallas: a Pallas (Triton) split-K GEMM (`small_m_matmul`, below) over a tile sweep and JAX's
Mosaic GPU Hopper matmul against XLA, float32 products summed over the chain. (The step with that
kernel was timed while the library had it as `matmul_impl="pallas"`, commit 2540868:
results/probes_h200/gemm_m128_pallas.json.)
Figures: weight bytes per second (median host time of --calls calls); step time per step.

    python benchmarks/probes/gemm_m128.py --out /tmp/gemm.json          # GPU
    python benchmarks/probes/gemm_m128.py --out /tmp/gemm.json --tiny   # CPU smoke (interpreter)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
from timerome_jax.io import write_json  # noqa: E402

import dataclasses  # noqa: E402
import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from probes.bandwidth import OPTION_SETS, canvas_and_weights, host_timed, torch_timed  # noqa: E402

@dataclasses.dataclass(frozen=True)
class Tiles:
    """block_n: output columns per program; split_k: programs per output block along K;
    block_k: K rows of the weight per loop iteration; num_warps, num_stages: Triton's."""

    block_n: int
    split_k: int
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 4


def fits(m: int, k: int, n: int, tiles: Tiles) -> bool:
    """Whether the kernel takes this shape with these tiles (else `matmul` uses XLA's dot)."""
    per_program = k // tiles.split_k if k % tiles.split_k == 0 else 0
    return (n % tiles.block_n == 0 and per_program > 0
            and per_program % tiles.block_k == 0)


def _padded_rows(m: int) -> int:
    """Triton blocks are powers of two (at least 16): the row count the kernel runs on."""
    return max(16, 1 << (m - 1).bit_length())


def _split_k_kernel(x_ref, w_ref, o_ref, *, block_k: int):
    m, k_part = x_ref.shape
    block_n = w_ref.shape[1]

    def body(i, acc):
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        return acc + jnp.dot(x_ref[:, ks], w_ref[ks, :], preferred_element_type=jnp.float32)

    o_ref[...] = jax.lax.fori_loop(0, k_part // block_k, body, jnp.zeros((m, block_n), jnp.float32))


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def small_m_matmul(x: jax.Array, w: jax.Array, tiles: Tiles, interpret: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] float32 with the split-K kernel (`fits` must hold).

    interpret=True runs the kernel through Pallas' interpreter (CPU tests)."""
    m, k = x.shape
    k2, n = w.shape
    if k != k2:
        raise ValueError(f"small_m_matmul: x {x.shape} and w {w.shape} do not chain")
    if not fits(m, k, n, tiles):
        raise ValueError(f"small_m_matmul: {tiles} does not fit x {x.shape} @ w {w.shape}")
    mp = _padded_rows(m)
    xp = jnp.pad(x.astype(w.dtype), ((0, mp - m), (0, 0))) if mp != m else x.astype(w.dtype)
    s, bn = tiles.split_k, tiles.block_n
    k_part = k // s
    parts = pl.pallas_call(
        functools.partial(_split_k_kernel, block_k=tiles.block_k),
        out_shape=jax.ShapeDtypeStruct((s, mp, n), jnp.float32),
        grid=(n // bn, s),
        in_specs=[pl.BlockSpec((mp, k_part), lambda j, i: (0, i)),
                  pl.BlockSpec((k_part, bn), lambda j, i: (i, j))],
        out_specs=pl.BlockSpec((None, mp, bn), lambda j, i: (i, 0, j)),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="small_m_matmul",
    )(xp, w)
    out = parts[0] if s == 1 else jnp.sum(parts, axis=0)
    return out[:m]



T = Tiles
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
        if fits(t, kk, n, tl):
            record(f"pallas_n{tl.block_n}_s{tl.split_k}_k{tl.block_k}_w{tl.num_warps}_st{tl.num_stages}",
                   lambda h, w, tl=tl: small_m_matmul(h, w, tl, interpret=interpret))
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
    tm = statistics.median(torch_timed(lambda: [torch.mm(th, w) for w in tw], calls))
    w_bytes = sum(w.nbytes for w in ws)
    print(f"[gemm] torch.mm: {w_bytes / tm / 1e12:.3f} TB/s", flush=True)
    return {"torch_mm": {"time_s": tm, "bytes_per_s": w_bytes / tm}}


def fair_rows(calls: int, tiny: bool, option_sets) -> dict:
    """XLA (compiled with each of option_sets) and torch.mm over distinct weights, each product kept
    as its own bf16 [128, N] output (no float32 sum between them, as in a forward): weight bytes per
    second."""
    t = 16 if tiny else 128
    total = (1 << 20) if tiny else (2048 << 20)
    shapes = [(64, 64), (64, 128)] if tiny else [(4096, 4096), (4096, 12288), (4096, 24576), (12288, 4096),
                                                 (4096, 126464)]
    rows = {}
    for kk, n in shapes:
        h, ws = canvas_and_weights(t, kk, n, total)
        w_bytes = sum(w.nbytes for w in ws)
        chain = jax.jit(lambda h, ws: [jnp.dot(h, w, preferred_element_type=jnp.float32).astype(h.dtype) for w in ws])
        for opt in option_sets:
            try:
                prog = chain.lower(h, ws).compile(compiler_options=OPTION_SETS[opt] if C.on_gpu() else {})
            except Exception as e:  # noqa: BLE001 - an option this XLA rejects is a result too
                rows[f"K{kk}_N{n}_xla_{opt}"] = {"error": str(e)[:300]}
                continue
            tm = statistics.median(host_timed(lambda: prog(h, ws), calls))
            rows[f"K{kk}_N{n}_xla_{opt}"] = {"time_s": tm, "bytes_per_s": w_bytes / tm, "matrices": len(ws)}
            print(f"[fair] K{kk} N{n} xla {opt}: {w_bytes / tm / 1e12:.3f} TB/s", flush=True)
        if C.on_gpu():
            rows[f"K{kk}_N{n}_torch"] = torch_row(h, ws, calls)["torch_mm"]
    return rows


FORMS = {
    # name: (weight as stored from a [K, N] one, product of h [M, K] and the stored weight -> [M, N])
    "dot": (lambda w: w, lambda h, w: jnp.dot(h, w, preferred_element_type=jnp.float32)),
    "dot_swapped": (lambda w: w, lambda h, w: jnp.dot(w.T, h.T, preferred_element_type=jnp.float32).T),
    "nk_dot": (lambda w: w.T.copy(), lambda h, w: jnp.dot(h, w.T, preferred_element_type=jnp.float32)),
    "nk_swapped": (lambda w: w.T.copy(), lambda h, w: jnp.dot(w, h.T, preferred_element_type=jnp.float32).T),
}


def form_rows(calls: int, tiny: bool) -> dict:
    """--forms: each shape's product written four ways (FORMS: weight [K, N] or stored transposed
    [N, K]; h @ w or (w^T h^T)^T), over about 6 GiB of distinct weights per call (so that dispatch is
    small next to it), bf16 outputs, host time; torch.mm beside them with events and host time."""
    import numpy as np
    import torch

    t = 16 if tiny else 128
    total = (1 << 20) if tiny else (6 << 30)
    shapes = [(64, 64)] if tiny else [(4096, 4096), (4096, 12288), (4096, 24576), (12288, 4096)]
    rows = {}
    for kk, n in shapes:
        k = max(1, min(total // (2 * kk * n), 256))
        h = jax.random.normal(jax.random.key(4), (t, kk), jnp.bfloat16)
        base = [jax.random.normal(jax.random.key(10 + i), (kk, n), jnp.bfloat16) * 0.02 for i in range(k)]
        w_bytes = sum(w.nbytes for w in base)
        for name, (store, prod) in FORMS.items():
            ws = [jax.block_until_ready(store(w)) for w in base] if name.startswith("nk") else base
            prog = jax.jit(lambda h, ws, prod=prod: [prod(h, w).astype(h.dtype) for w in ws])
            tm = statistics.median(host_timed(lambda: prog(h, ws), calls))
            rows[f"K{kk}_N{n}_{name}"] = {"time_s": tm, "bytes_per_s": w_bytes / tm, "matrices": k}
            print(f"[forms] K{kk} N{n} {name}: {w_bytes / tm / 1e12:.3f} TB/s", flush=True)
            ws = None
        if C.on_gpu():
            th = torch.from_numpy(np.array(h.astype(jnp.float32))).cuda().to(torch.bfloat16)
            tw = [torch.from_dlpack(w) for w in base]
            for tname, fn in (("torch_mm", lambda: [torch.mm(th, w) for w in tw]),
                              ("torch_mm_nk", lambda: [torch.mm(th, w.T) for w in twt])):
                twt = [w.T.contiguous() for w in tw] if tname.endswith("nk") else None
                fn()
                torch.cuda.synchronize()
                ts = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
                tm = statistics.median(ts)
                rows[f"K{kk}_N{n}_{tname}"] = {"time_s": tm, "bytes_per_s": w_bytes / tm, "matrices": k}
                print(f"[forms] K{kk} N{n} {tname} (host time): {w_bytes / tm / 1e12:.3f} TB/s", flush=True)
                del twt
            del tw
        del base
    return rows


def step_rows(args) -> dict:
    """The library's batch-1 generation (unstacked), with separate (`model.unfuse_layer`) and with
    fused projections (what `model.unstack` gives)."""
    import numpy as np

    from timerome_jax.backbone import model as model_lib
    from timerome_jax.diffusion import sampler

    cfg = C.model_config(args.tiny)
    fused = model_lib.unstack(C.init_params(jax.random.key(0), cfg, C.default_init_std(args.tiny)), consume=True)
    up = dict(fused, layers=[model_lib.unfuse_layer(lp) for lp in fused["layers"]])
    rng = np.random.default_rng(1)
    prompt = C.random_tokens(rng, (1, 64), cfg)
    x, pad, pm = sampler.make_canvas(prompt.tolist(), 64, cfg)
    scfg = sampler.SamplerConfig(steps=64)
    sched = sampler.schedule(x, pad, cfg, scfg)
    key = jax.random.key(3)
    w_bytes = C.weight_bytes(cfg)
    rows, tokens, progs = {}, {}, {}
    variants = [("separate", up, {})] + [(f"fused_{opt}", fused, OPTION_SETS[opt] if C.on_gpu() else {})
                                         for opt in args.option_sets.split(",")]
    for name, p, opts in variants:
        t0 = time.perf_counter()
        try:
            progs[name] = sampler.generate_scan.lower(p, x, pad, pm, sched, key, None, cfg=cfg, scfg=scfg,
                                                      return_history=False).compile(compiler_options=opts)
        except Exception as e:  # noqa: BLE001
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            continue
        rows[name] = {"compile_s": time.perf_counter() - t0, "options": opts}
        tokens[name] = np.asarray(jax.tree.leaves(progs[name](p, x, pad, pm, sched, key, None))[0])
    # interleaved rounds, so that drift between the variants cancels
    ts = {name: [] for name in progs}
    for _ in range(args.calls):
        for name, p, _opts in variants:
            if name in progs:
                ts[name] += host_timed(lambda: progs[name](p, x, pad, pm, sched, key, None), 1)
    for name in progs:
        step = statistics.median(ts[name]) / 64
        same = bool(np.array_equal(tokens[name], tokens["separate"]))
        rows[name].update(step_s=step, weight_bytes=w_bytes, bytes_per_s=w_bytes / step, tokens_equal_separate=same,
                          step_times_s=[t / 64 for t in ts[name]])
        print(f"[step] {name}: {1e3 * step:.3f} ms, {w_bytes / step / 1e12:.3f} TB/s of weights, "
              f"tokens = separate: {same} (compile {rows[name]['compile_s']:.1f} s)", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--calls", type=int, default=7)
    ap.add_argument("--pallas", action="store_true", help="the kernel sweep (else: fair chains and the step)")
    ap.add_argument("--forms", action="store_true", help="the products written four ways, and torch.mm")
    ap.add_argument("--option-sets", default="default", help=f"XLA option sets, of {list(OPTION_SETS)}")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop the sweep after this many seconds")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    rec = {"device": jax.devices()[0].device_kind, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.forms:
        rec["forms"] = form_rows(args.calls, args.tiny)
    elif args.pallas:
        rec.update(shapes={}, best={})
        t = 16 if args.tiny else 128
        total = (1 << 20) if args.tiny else (2048 << 20)
        for (kk, n), tiles_list in (TINY_SWEEP if args.tiny else SWEEP).items():
            rows = chain_rows(t, kk, n, total, args.calls, tiles_list, args.tiny, t_start + args.budget_s)
            rec["shapes"][f"K{kk}_N{n}"] = rows
            timed = {k: r for k, r in rows.items() if k.startswith("pallas") and "bytes_per_s" in r}
            if timed:
                name = max(timed, key=lambda k: timed[k]["bytes_per_s"])
                rec["best"][f"K{kk}_N{n}"] = {"name": name, "bytes_per_s": timed[name]["bytes_per_s"],
                                              "xla_bytes_per_s": rows.get("xla", {}).get("bytes_per_s")}
    else:
        rec["fair"] = fair_rows(args.calls, args.tiny, args.option_sets.split(","))
        rec["step"] = step_rows(args)
    rec["wall_s"] = time.perf_counter() - t_start
    write_json(args.out, rec)


if __name__ == "__main__":
    main()
