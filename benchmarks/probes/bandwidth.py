"""Probe: how much memory bandwidth this card gives, measured several ways (the bytes floors divide by it).

`bench_ceiling` times ONE jitted `x + 1` over a 2 GiB bf16 buffer with the host clock. Here, in one
process, each way is timed as the median of --calls:
- `jax_add_single`: that measurement (bytes read + written / host time of one call);
- `jax_add_chain`, `jax_sum_chain`: bench_ceiling's copy and read (`common.measure_jax`): --reps
  dependent `x + 1` passes, or --reps float32 sums of the buffer (bytes read: the read-only stream a
  batch-1 generation step is), inside one jitted `fori_loop` (one dispatch and one wait for all of
  them), host time / reps;
- `jax_gemm_m128`: a [128, 4096] bf16 canvas times k distinct [4096, 12288] weights (about the
  buffer's bytes in all, each read once): the matmul shape of a batch-1 generation step;
- `torch_copy`, `torch_sum`: `dst.copy_(src)` and `src.sum(dtype=float32)`, timed with CUDA events.
Writes --out (JSON): bytes per second of each.

--split-k: instead, the three matmul shapes of a batch-1 step, each as one dot and split over K into
2, 4, 8 partial products (`split_k_rows`).

--options: instead, the matmul rows (`jax_gemm_m128`) compiled with XLA option sets that change how
GEMMs are emitted (split-K autotuning, cuBLAS only, autotune level), and the library's batch-1
generation at the 8B shape (unstacked, prompt 64 + 64 new tokens, 64 steps) with the default and
the --gen-options sets: step time and bytes per second of weights read.

    python benchmarks/probes/bandwidth.py --out /tmp/bw.json          # GPU
    python benchmarks/probes/bandwidth.py --out /tmp/bw.json --tiny   # CPU smoke
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def host_timed(fn, calls: int) -> list:
    C.block(fn())
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        C.block(fn())
        ts.append(time.perf_counter() - t0)
    return ts


def canvas_and_weights(t: int, d: int, f: int, total_bytes: int):
    """A [t, d] bf16 canvas and k distinct [d, f] bf16 weights (about total_bytes in all, at most 64),
    as separate arrays: a matmul chain over them reads each weight once (a slice of one stacked
    array inside a loop can be copied out first)."""
    k = max(1, min(total_bytes // (2 * d * f), 64))
    ws = [jax.random.normal(jax.random.key(10 + i), (d, f), jnp.bfloat16) * 0.02 for i in range(k)]
    return jax.random.normal(jax.random.key(4), (t, d), jnp.bfloat16), ws


def gemm_chain(h, ws):
    """sum_i h @ ws[i] in float32 (unrolled)."""
    return sum(jnp.dot(h, w, preferred_element_type=jnp.float32) for w in ws)


def jax_rows(n_bytes: int, reps: int, calls: int, tiny: bool) -> dict:
    # the batch-1 generation step's matmuls: a [128, 4096] canvas times distinct [4096, 12288] weights
    h, ws = canvas_and_weights(*((16, 64, 256) if tiny else (128, 4096, 12288)), n_bytes)
    gemms = jax.jit(gemm_chain)
    x = jax.random.normal(jax.random.key(2), (n_bytes // 2,), jnp.bfloat16)
    single = jax.jit(lambda x: x + jnp.bfloat16(1))
    rows = {}
    for name, fn, moved in (("jax_gemm_m128", lambda: gemms(h, ws), sum(w.nbytes for w in ws)),
                            ("jax_add_single", lambda: single(x), 2 * n_bytes)):
        ts = host_timed(fn, calls)
        t = statistics.median(ts)
        rows[name] = {"bytes_moved": moved, "time_s": t, "bytes_per_s": moved / t, "times_s": ts, "per_call": 1}
    # the chained passes are bench_ceiling's (common.measure_jax): times per pass
    ceil = C.measure_jax(C.default_sizes(tiny)[0], reps=reps, copy_bytes=n_bytes, calls=calls)
    for name, kind in (("jax_add_chain", "copy"), ("jax_sum_chain", "read")):
        ts = ceil[f"{kind}_times_s"]
        rows[name] = {"bytes_moved": ceil[f"{kind}_bytes"], "time_s": statistics.median(ts),
                      "bytes_per_s": ceil[f"{kind}_bytes_per_s"], "times_s": ts, "per_call": reps}
    return rows


def torch_timed(fn, calls: int) -> list:
    """Seconds per call of fn (one warm-up call first): CUDA events on a GPU, else the host clock."""
    import torch

    fn()
    ts = []
    for _ in range(calls):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return ts


def torch_rows(n_bytes: int, calls: int) -> dict:
    import torch

    dev = C.torch_device()
    src = torch.randn(n_bytes // 2, device=dev).to(torch.bfloat16)
    dst = torch.empty_like(src)
    rows = {}
    for name, fn, moved in (("torch_copy", lambda: dst.copy_(src), 2 * n_bytes),
                            ("torch_sum", lambda: src.sum(dtype=torch.float32), n_bytes)):
        ts = torch_timed(fn, calls)
        t = statistics.median(ts)
        rows[name] = {"bytes_moved": moved, "time_s": t, "bytes_per_s": moved / t, "times_s": ts}
    return rows


OPTION_SETS = {
    "default": {},
    "cublas_only": {"xla_gpu_enable_triton_gemm": False},
    "split_k": {"xla_gpu_enable_split_k_autotuning": True},
    "autotune4": {"xla_gpu_autotune_level": 4},
    "cublaslt": {"xla_gpu_enable_cublaslt": True},
    "autotune0": {"xla_gpu_autotune_level": 0},
    "autotune0_cublas_only": {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False},
    "cublaslt_autotune0": {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False,
                           "xla_gpu_enable_cublaslt": True},
    "triton_on": {"xla_gpu_enable_triton_gemm": True},
    "pdl_off": {"xla_gpu_enable_pdl": False},
    "triton_mof": {"xla_gpu_unsupported_enable_triton_multi_output_fusion": True},
    "heroless": {"xla_gpu_experimental_enable_triton_heroless_priority_fusion": True},
    "cudnn_gemm": {"xla_gpu_cudnn_gemm_fusion_level": 2},
}


def options_rows(args) -> dict:
    import numpy as np

    from timerome_jax.backbone import model as model_lib
    from timerome_jax.diffusion import sampler

    rows = {}
    h, ws = canvas_and_weights(*((16, 64, 256) if args.tiny else (128, 4096, 12288)),
                               (16 << 20) if args.tiny else (2048 << 20))
    w_total = sum(w.nbytes for w in ws)
    gemms = jax.jit(gemm_chain)
    for name, opts in OPTION_SETS.items():
        try:
            prog = gemms.lower(h, ws).compile(compiler_options=opts)
        except Exception as e:  # noqa: BLE001 - an option this XLA rejects is a result too
            rows[f"gemm_{name}"] = {"error": str(e)[:300]}
            continue
        ts = host_timed(lambda: prog(h, ws), args.calls)
        tm = statistics.median(ts)
        rows[f"gemm_{name}"] = {"time_s": tm, "bytes_per_s": w_total / tm}
        print(f"[options] gemm {name}: {w_total / tm / 1e12:.3f} TB/s", flush=True)
    ws = None
    cfg = C.model_config(args.tiny)
    up = model_lib.unstack(C.init_params(jax.random.key(0), cfg, C.default_init_std(args.tiny)), consume=True)
    rng = np.random.default_rng(1)
    prompt = C.random_tokens(rng, (1, 64), cfg)
    x, pad, pm = sampler.make_canvas(prompt.tolist(), 64, cfg)
    scfg = sampler.SamplerConfig(steps=64)
    sched = sampler.schedule(x, pad, cfg, scfg)
    key = jax.random.key(3)
    w_bytes = C.weight_bytes(cfg)
    for name in ["default"] + [n for n in args.gen_options.split(",") if n and n != "default"]:
        t0 = time.perf_counter()
        try:
            prog = sampler.generate_scan.lower(up, x, pad, pm, sched, key, None, cfg=cfg, scfg=scfg,
                                               return_history=False).compile(compiler_options=OPTION_SETS[name])
        except Exception as e:  # noqa: BLE001
            rows[f"generate_{name}"] = {"error": str(e)[:300]}
            continue
        comp = time.perf_counter() - t0
        ts = host_timed(lambda: prog(up, x, pad, pm, sched, key, None), args.calls)
        step = statistics.median(ts) / 64
        rows[f"generate_{name}"] = {"step_s": step, "compile_s": comp, "weight_bytes": w_bytes,
                                    "bytes_per_s": w_bytes / step}
        print(f"[options] generate {name}: step {1e3 * step:.3f} ms, {w_bytes / step / 1e12:.3f} TB/s of weights "
              f"(compile {comp:.1f} s)", flush=True)
    return rows


def split_k_rows(args) -> dict:
    """--split-k: the three matmul shapes of a batch-1 step ([128, K] x [K, N] for (K, N) = (4096,
    4096): q, k, v, o; (4096, 12288): gate, up; (12288, 4096): down), each over distinct weights (about
    2 GiB), as one dot and split into s partial products over K (a batched dot [s, 128, K/s] x
    [s, K/s, N], float32 partials summed): bytes of weights read per second."""
    rows = {}
    t = 16 if args.tiny else 128
    shapes = [(64, 64), (64, 256), (256, 64)] if args.tiny else [(4096, 4096), (4096, 12288), (12288, 4096)]
    total = (1 << 20) if args.tiny else (2048 << 20)
    for kk, n in shapes:
        h, ws = canvas_and_weights(t, kk, n, total)
        k = len(ws)
        for s in (1, 2, 4, 8):
            def one(h, w, s=s):
                if s == 1:
                    return jnp.dot(h, w, preferred_element_type=jnp.float32)
                parts = jnp.einsum("tsk,skn->stn", h.reshape(t, s, kk // s), w.reshape(s, kk // s, n),
                                   preferred_element_type=jnp.float32)
                return parts.sum(0)
            prog = jax.jit(lambda h, ws, one=one: sum(one(h, w) for w in ws))
            ts = host_timed(lambda: prog(h, ws), args.calls)
            tm = statistics.median(ts)
            name = f"K{kk}_N{n}_s{s}"
            rows[name] = {"time_s": tm, "bytes_per_s": 2 * k * kk * n / tm, "matrices": k}
            print(f"[split_k] {name}: {2 * k * kk * n / tm / 1e12:.3f} TB/s", flush=True)
        ws = None
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--calls", type=int, default=7)
    ap.add_argument("--options", action="store_true", help="GEMM / generation under XLA option sets")
    ap.add_argument("--gen-options", default="split_k,cublas_only", help="option sets for the generation rows")
    ap.add_argument("--split-k", action="store_true", help="the step's matmul shapes split over K")
    args = ap.parse_args(argv)
    rec = {"device": jax.devices()[0].device_kind, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.split_k:
        rec["rows"] = split_k_rows(args)
    elif args.options:
        rec.update(option_sets=OPTION_SETS, rows=options_rows(args))
    else:
        n_bytes = (16 << 20) if args.tiny else (2048 << 20)
        rec.update(buffer_bytes=n_bytes, reps=args.reps,
                   rows={**jax_rows(n_bytes, args.reps, args.calls, args.tiny), **torch_rows(n_bytes, args.calls)})
        for k, r in rec["rows"].items():
            print(f"[bandwidth] {k}: {r['bytes_per_s'] / 1e12:.3f} TB/s ({1e3 * r['time_s']:.3f} ms)", flush=True)
    write_json(args.out, rec)

if __name__ == "__main__":
    main()
