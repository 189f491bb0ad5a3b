"""Ceilings of this card, measured in the same run as the figures: bf16 matmul rate, read and copy bandwidth.

    python benchmarks/bench_ceiling.py --out benchmarks/results            # 8192^3 bf16, 2 GiB copy
    python benchmarks/bench_ceiling.py --out /tmp/r --tiny                  # 512^3, 16 MiB (CPU)

Matmul: C <- A @ C repeated `reps` times inside one jitted fori_loop (A ~ N(0, 1/n), so the values
keep their scale; random data, never zeros), 2 n^3 FLOPs each; median of 5 calls after a warm-up.
PyTorch: the same chain timed with CUDA events. Bandwidth over a 2 GiB bf16 buffer, `reps` passes
in one jitted loop: read (a float32 sum, bytes read) and copy (y = y + 1, bytes read plus written;
torch: dst.copy_(src)). The figures take the JAX matmul rate and READ bandwidth as the ceiling: their
bytes floors count weights read once. (A single host-timed `x + 1` pass, the measurement before,
read 2.1-2.9 TB/s on an H200 whose reads run at 4.2 TB/s: results/probes_h200/bandwidth_h200.json.)
Writes ceiling.json.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def measure_torch(n: int, reps: int = 10, copy_bytes: int = 1 << 31, calls: int = 5) -> dict:
    """The same two numbers through PyTorch (CUDA events on GPU, host clock on CPU)."""
    import torch

    dev = C.torch_device()
    g = torch.Generator(device=dev).manual_seed(1)
    a = (torch.randn(n, n, device=dev, generator=g) / n ** 0.5).to(torch.bfloat16)
    c = torch.randn(n, n, device=dev, generator=g).to(torch.bfloat16)
    bufs = [c, torch.empty_like(c)]
    cuda = dev.type == "cuda"

    def chain():
        for i in range(reps):
            torch.matmul(a, bufs[i % 2], out=bufs[(i + 1) % 2])

    def timed(fn):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            return s.elapsed_time(e) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    out = {"n": n, "reps": reps, "device": str(dev)}
    with torch.no_grad():
        chain()
        C.torch_sync()
        ts = [timed(chain) / reps for _ in range(calls)]
        out["matmul_times_s"] = ts
        out["matmul_s"] = statistics.median(ts)
        out["matmul_flops_per_s"] = 2 * n ** 3 / out["matmul_s"]
        out["matmul_result_finite"] = bool(torch.isfinite(bufs[reps % 2].float()).all())
        m = copy_bytes // 2
        src = torch.randn(m, device=dev, generator=g).to(torch.bfloat16)
        dst = torch.empty_like(src)
        dst.copy_(src)
        C.torch_sync()
        ts = [timed(lambda: dst.copy_(src)) for _ in range(calls)]
        out["copy_bytes"] = 2 * m * 2
        out["copy_times_s"] = ts
        out["copy_bytes_per_s"] = out["copy_bytes"] / statistics.median(ts)
    del a, c, bufs, src, dst
    C.torch_release()
    return out


def main(argv=None) -> dict:
    ap = C.base_parser(__doc__)
    ap.add_argument("--n", type=int, default=None, help="matmul size (8192; --tiny 512)")
    ap.add_argument("--reps", type=int, default=None, help="matmuls per timed call (10; --tiny 4)")
    ap.add_argument("--copy-mib", type=int, default=None,
                    help="copy buffer MiB (2048, i.e. 2^30 bf16 values: JAX's random arrays stay under 2^31 "
                         "elements; --tiny 16)")
    args = ap.parse_args(argv)
    dn, dreps, dcopy = C.default_sizes(args.tiny)
    n, reps, copy_bytes = args.n or dn, args.reps or dreps, (args.copy_mib << 20) if args.copy_mib else dcopy
    os.makedirs(args.out, exist_ok=True)
    rec = C.Record(os.path.join(args.out, "ceiling.json"), "ceiling", "bf16 matmul, read and copy ceilings", args)
    with rec.section("jax"):
        rec["jax"] = C.measure_jax(n, reps, copy_bytes)
        rec["ceiling"] = C.ceiling_of(rec["jax"])
    if not args.skip_torch:
        with rec.section("torch"):
            rec["torch"] = measure_torch(n, reps, copy_bytes)
    if "jax" in rec.data and "torch" in rec.data:
        rec["torch_over_jax_matmul_rate"] = rec["torch"]["matmul_flops_per_s"] / rec["jax"]["matmul_flops_per_s"]
    out = rec.finish()
    j = out.get("jax", {})
    print(f"[ceiling] jax matmul {j.get('matmul_flops_per_s', 0) / 1e12:.1f} TFLOP/s, read "
          f"{j.get('read_bytes_per_s', 0) / 1e12:.2f} TB/s, copy {j.get('copy_bytes_per_s', 0) / 1e12:.2f} TB/s; "
          f"torch copy {out.get('torch', {}).get('copy_bytes_per_s', 0) / 1e12:.2f} TB/s, matmul "
          f"{out.get('torch', {}).get('matmul_flops_per_s', 0) / 1e12:.1f} TFLOP/s", flush=True)
    return out


if __name__ == "__main__":
    main()
