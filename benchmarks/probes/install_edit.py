"""Probe: the two batch-1 misses of issue 14, the |F| = 1 install and the unstacked edit overhead.

LLaDA-8B shape, random bf16 weights, unstacked layout (the GPU default).

--what install: the |F| = 1 install (capture to layer 19 of one 128 + 128-token cloze pair, then
the Eq. 11 solve), each part timed (median of --repeats), and the same with the previous host
handling written out here (`old_*`: three outputs fetched one by one after a host-side validity
check, and the memory's nine arrays put on the device one by one). The new capture is profiled
once (`common.kernel_summary`: kernel time, span and wall). Floor: the first 20 layers'
weights read once at the read bandwidth measured here.

--what edit: a batch-1 generation (prompt 64 + 64 new tokens, --steps steps) with an |F| = 400,
q = 4 edit at layer 19 resid, with variants of `EditMemory.delta` swapped in before tracing, each
timed against no edit in interleaved pairs (`generation_ab.timed_variants`): `library`; `null`
(reads h, adds zero: what splitting the layer's fusions costs with no edit work); `dense` (no TopQ);
`topk16` (the TopQ threshold from `lax.top_k(16)`, which needs q <= 16 to be static);
`rank` (keep an entry when fewer than q entries are larger: no sort); `bf16` (both products in
one bf16 pass). The optimized HLO of no edit and of `library` is written gzipped beside --out.

    python benchmarks/probes/install_edit.py --what install --out /tmp/pi.json       # GPU
    python benchmarks/probes/install_edit.py --what edit --out /tmp/pe.json --tiny   # CPU smoke
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_install  # noqa: E402
from generation_ab import compiled_variants, summary, timed_variants, unstacked_model_and_memory  # noqa: E402
from timerome_jax.backbone import model as model_lib  # noqa: E402
from timerome_jax.method import capture as cap_lib  # noqa: E402
from timerome_jax.method import memory as mem_lib  # noqa: E402
from timerome_jax.method.trace import Coordinate  # noqa: E402
from timerome_jax.pipeline import capture_and_build, default_lam  # noqa: E402

HI = jax.lax.Precision.HIGH
LIBRARY_DELTA = mem_lib.EditMemory.delta


def _finish(self, c, h):
    out = self.alpha * jnp.einsum("...c,cd->...d", c, self.Dm, precision=HI)
    return out.astype(h.dtype)


def _keys(self, h):
    c = jnp.einsum("...d,cd->...c", h.astype(jnp.float32), self.W, precision=HI)
    return jnp.where(self.active, c, jnp.zeros_like(c))


def delta_null(self, h):
    return h * jnp.zeros((), h.dtype)


def delta_dense(self, h):
    return _finish(self, _keys(self, h), h)


def delta_topk16(self, h):
    c = _keys(self, h)
    a = jnp.abs(c)
    k = min(16, a.shape[-1])
    thr = jnp.take(jax.lax.top_k(a, k)[0], jnp.clip(self.q - 1, 0, k - 1), axis=-1)
    return _finish(self, jnp.where((self.q <= 0) | (a >= thr[..., None]), c, 0.0), h)


def delta_rank(self, h):
    return _finish(self, _keep_by_rank(_keys(self, h), self.q), h)


def delta_bf16(self, h):
    c = jnp.einsum("...d,cd->...c", h, self.W.astype(h.dtype), preferred_element_type=jnp.float32)
    c = mem_lib.top_q(jnp.where(self.active, c, jnp.zeros_like(c)), self.q)
    out = self.alpha * jnp.einsum("...c,cd->...d", c.astype(h.dtype), self.Dm.astype(h.dtype),
                                  preferred_element_type=jnp.float32)
    return out.astype(h.dtype)


def _split(x):
    """f32 x -> (hi, lo) bf16 with hi + lo = x to about 2^-17 relative."""
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _keep_by_rank(c, q):
    # keep c_i when fewer than q entries are strictly larger in magnitude: the q-th largest value's
    # threshold without a sort (ties kept, as top_q); one fused compare-and-count
    a = jnp.abs(c)
    larger = jnp.sum(a[..., None, :] > a[..., :, None], axis=-1, dtype=jnp.int32)
    return jnp.where((q <= 0) | (larger < q), c, 0.0)


def _split_products(self, h, keep):
    # h is bf16 (the model's dtype), so h @ W needs only W's two bf16 halves; c @ Dm three bf16 passes
    w_hi, w_lo = _split(self.W)
    c = (jnp.einsum("...d,cd->...c", h, w_hi, preferred_element_type=jnp.float32)
         + jnp.einsum("...d,cd->...c", h, w_lo, preferred_element_type=jnp.float32))
    c = keep(jnp.where(self.active, c, jnp.zeros_like(c)), self.q)
    c_hi, c_lo = _split(c)
    d_hi, d_lo = _split(self.Dm)
    ck = jnp.concatenate([c_hi, c_lo, c_hi], axis=-1)
    dk = jnp.concatenate([d_hi, d_hi, d_lo], axis=0)
    out = self.alpha * jnp.einsum("...c,cd->...d", ck, dk, preferred_element_type=jnp.float32)
    return out.astype(h.dtype)


def delta_split(self, h):
    return _split_products(self, h, mem_lib.top_q)


def delta_fast(self, h):
    return _split_products(self, h, _keep_by_rank)


VARIANTS = {"library": LIBRARY_DELTA, "library2": LIBRARY_DELTA, "split": delta_split, "fast": delta_fast,
            "null": delta_null, "dense": delta_dense, "topk16": delta_topk16, "rank": delta_rank, "bf16": delta_bf16}


def old_capture(params, cfg, cb, layer):
    """The previous host handling: validity masks read on the host first, three outputs fetched one by one."""
    for v in (cb.subj_valid, cb.obj_valid, cb.tgt_valid):
        assert np.asarray(v).any(axis=1).all()
    uvv, _ = cap_lib.capture_chunk(params, cb, cfg, layer, 0)
    return tuple(np.asarray(jax.block_until_ready(uvv[:, i])) for i in range(3))


def solve(u, v_o, v_t, layer):
    """figure b's solve (`bench_install.jax_solve`) with alpha 1, q 4 at resid."""
    return bench_install.jax_solve(u, v_o, v_t, layer, "resid", 1.0, 4, "probe")


def build_memory(u, v_o, v_t, layer):
    """`solve` without waiting for the memory on the device."""
    return mem_lib.build(u, v_o, v_t, lam=default_lam(u), alpha=1.0, q=4, layer=layer, module="resid", step=-1,
                         fingerprint="probe")


def _setup_install(args, cfg, rec):
    layer = min(19, cfg.n_layers - 1)
    params = C.init_params(jax.random.key(0), cfg, C.default_init_std(args.tiny))
    up = model_lib.unstack(params, consume=True)
    n_mm, _, copy_bytes = C.default_sizes(args.tiny)
    ceil = C.measure_jax(n_mm, reps=4, copy_bytes=copy_bytes)
    rec["ceiling"] = ceil
    floor_s = C.weight_bytes(cfg, layer + 1, head=False) / ceil["read_bytes_per_s"]
    # one fact of figure b's layout: two 128-token clozes (prompt 112 + 16 answer tokens), subject of 8
    T, s_len, o_len = (128, 8, 16) if not args.tiny else (16, 2, 4)
    cb = bench_install.cloze_batch(bench_install.make_cloze(cfg, 1, T - o_len, o_len, o_len, s_len, 2), 1)
    return layer, up, floor_s, cb


def install_parts(args, cfg, rec):
    """--what install_parts: the install's parts on their own (capture on the device only, its
    transfer back, the solve's host part, the packed transfer + unpack with and without a separate
    `device_put`), and two compile options for the capture, each timed against the library capture in
    interleaved pairs (`graph1`: xla_gpu_graph_min_graph_size=1; `cbtypes`: command buffers for
    fusions, cuBLAS(Lt), custom calls and cuDNN)."""
    layer, up, floor_s, cb = _setup_install(args, cfg, rec)
    m = 0
    upl = cap_lib.layers_up_to(up, layer)
    prog = cap_lib.capture_chunk.lower(upl, cb, cfg, layer, m).compile()
    lib = lambda: cap_lib.capture(up, cfg, cb, layer, "resid")  # noqa: E731
    rows = {}
    for name, opts in (("graph1", {"xla_gpu_graph_min_graph_size": 1}),
                       ("cbtypes", {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"})):
        try:
            p1 = cap_lib.capture_chunk.lower(upl, cb, cfg, layer, m).compile(compiler_options=opts)
        except Exception as e:  # noqa: BLE001 - an option this XLA rejects is a result too
            rows[name] = {"error": str(e)[:300], "steady_s": float("nan")}
            continue
        a, b, r = C.measure_pair(lib, lambda: cap_lib.finish_capture(*p1(upl, cb)), want=args.repeats,
                                 sync=lambda _: None)
        rows["capture"], rows[f"capture_{name}"] = C.strip(a), C.strip(b)
        rows[f"capture_{name}"]["median_pair_ratio"] = float(np.median(r))
    res = prog(upl, cb)
    jax.block_until_ready(res)
    rows["capture_device_only"] = C.strip(C.measure(lambda: prog(upl, cb), want=args.repeats))
    rows["finish_only"] = C.strip(C.measure(lambda: cap_lib.finish_capture(*res), want=args.repeats, sync=lambda _: None))
    u, v_o, v_t = lib()
    to_dev = mem_lib._to_device
    mem_lib._to_device = lambda *xs: xs
    try:
        rows["solve_host_only"] = C.strip(C.measure(lambda: build_memory(u, v_o, v_t, layer), want=args.repeats,
                                                     sync=lambda _: None))
    finally:
        mem_lib._to_device = to_dev
    c, d = u.shape
    buf = np.zeros(3 * c * d + c * c + c + 4, np.float32)
    rows["device_put_unpack"] = C.strip(C.measure(lambda: mem_lib._unpack(jax.device_put(buf), c, d),
                                                  want=args.repeats))
    rows["unpack_numpy"] = C.strip(C.measure(lambda: mem_lib._unpack(buf, c, d), want=args.repeats))
    rows["solve"] = C.strip(C.measure(lambda: solve(u, v_o, v_t, layer), want=args.repeats, sync=lambda _: None))
    rows["install"] = C.strip(C.measure(lambda: solve(*lib(), layer), want=args.repeats, sync=lambda _: None))
    for k, v in rows.items():
        v["ratio_to_floor"] = v["steady_s"] / floor_s
        print(f"[parts] {k}: {v.get('error', '')}" if "error" in v else f"[parts] {k}: {1e3 * v['steady_s']:.3f} ms = {v['ratio_to_floor']:.2f}x floor", flush=True)
    rec["floor_s"] = floor_s
    rec["rows"] = rows


def install_joint(args, cfg, rec):
    """--what install_joint: why a whole install (capture then solve, back to back) takes longer than
    its parts timed apart. Interleaved pairs against the library install: `nocb` (the capture compiled
    without command buffers, so nothing is re-recorded when buffers move), `host_solve` (the solve
    without its device transfer, so nothing is allocated between two captures)."""
    layer, up, floor_s, cb = _setup_install(args, cfg, rec)
    upl = cap_lib.layers_up_to(up, layer)
    lib = lambda: solve(*cap_lib.capture(up, cfg, cb, layer, "resid"), layer)  # noqa: E731
    nocb = cap_lib.capture_chunk.lower(upl, cb, cfg, layer, 0).compile(
        compiler_options={"xla_gpu_enable_command_buffer": ""})
    to_dev = mem_lib._to_device

    def host_solve():
        mem_lib._to_device = lambda *xs: xs
        try:
            return mem_lib.build(*cap_lib.capture(up, cfg, cb, layer, "resid"), lam=1.0, alpha=1.0, q=4,
                                 layer=layer, module="resid", step=-1, fingerprint="probe")
        finally:
            mem_lib._to_device = to_dev

    rows = {}
    for name, fn in (("nocb", lambda: solve(*cap_lib.finish_capture(*nocb(upl, cb)), layer)), ("host_solve", host_solve)):
        a, b, r = C.measure_pair(lib, fn, want=args.repeats, sync=lambda _: None)
        rows[f"install_vs_{name}"], rows[name] = C.strip(a), C.strip(b)
    for k, v in rows.items():
        v["ratio_to_floor"] = v["steady_s"] / floor_s
        print(f"[joint] {k}: {1e3 * v['steady_s']:.3f} ms = {v['ratio_to_floor']:.2f}x floor", flush=True)
    rec["floor_s"] = floor_s
    rec["rows"] = rows


def install_probe(args, cfg, rec):
    layer, up, floor_s, cb = _setup_install(args, cfg, rec)
    new_cap = lambda: cap_lib.capture(up, cfg, cb, layer, "resid")  # noqa: E731
    rows = {}
    u, v_o, v_t = new_cap()
    old = old_capture(up, cfg, cb, layer)
    rec["captures_equal"] = all(np.array_equal(a, b) for a, b in zip((u, v_o, v_t), old))
    for name, fn in (("capture", new_cap), ("old_capture", lambda: old_capture(up, cfg, cb, layer)),
                     ("solve", lambda: solve(u, v_o, v_t, layer))):
        rows[name] = C.strip(C.measure(fn, want=args.repeats, sync=lambda _: None))
    pack = mem_lib.PACK_MAX_FLOATS
    mem_lib.PACK_MAX_FLOATS = 0
    try:
        rows["old_solve"] = C.strip(C.measure(lambda: solve(u, v_o, v_t, layer), want=args.repeats,
                                              sync=lambda _: None))
    finally:
        mem_lib.PACK_MAX_FLOATS = pack
    rows["install"] = {"steady_s": C.strip(C.measure(lambda: solve(*new_cap(), layer), want=args.repeats,
                                                     sync=lambda _: None))["steady_s"]}
    for k, v in rows.items():
        v["ratio_to_floor"] = v["steady_s"] / floor_s
        print(f"[install] {k}: {1e3 * v['steady_s']:.3f} ms = {v['ratio_to_floor']:.2f}x floor", flush=True)
    rec["floor_s"] = floor_s
    rec["rows"] = rows
    s = C.traced_kernels(new_cap, os.path.join(args.trace_dir, "capture_new"))
    s.pop("trace", None)
    rec["profile_capture"] = s
    print(f"[install] capture profile: kernels {s['kernel_us_total'] / 1e3:.2f} ms over a {s['span_us'] / 1e3:.2f} ms "
          f"span, {s['events']} events", flush=True)


def edit_probe(args, cfg, rec):
    up, mem, rng = unstacked_model_and_memory(cfg, args.tiny)
    names = [v for v in args.variants.split(",") if v]
    rec["variants"] = {}
    toks = {}
    hlo_dir = os.path.dirname(os.path.abspath(args.out))
    for r in timed_variants(up, cfg, mem, args.steps, mem_lib.EditMemory, "delta", {k: VARIANTS[k] for k in names},
                            args.repeats, rng):
        name = r["name"]
        toks[name] = np.asarray(r["edit"]["out"]).tolist()
        v = summary(r, args.steps)
        rec["variants"][name] = v
        if name == "library":
            with gzip.open(os.path.join(hlo_dir, "hlo_edit_library.txt.gz"), "wt") as f:
                f.write(r["program"].as_text())
        print(f"[edit] {name}: {v['step_ms_no_edit']:.3f} -> {v['step_ms_edit']:.3f} ms, overhead "
              f"{v['overhead_pct_median_pair']:.2f}% (pairs) / {v['overhead_pct_of_medians']:.2f}% (medians), "
              f"{v['overhead_us_per_step']:.1f} us/step", flush=True)
    if "library" in toks:
        rec["tokens_equal_library"] = {k: t == toks["library"] for k, t in toks.items()}


def edit_rounds(args, cfg, rec):
    """--what edit_rounds: every variant's program and the no-edit one compiled first, then all timed
    in the same interleaved rounds (`common.measure_rounds`), so drifts hit all alike; `library2` is
    the library compiled a second time (how much two compiles of one program differ). Also each
    variant's delta on one random bf16 h [1,128,D] against the library's (max |diff| / max |library|)."""
    up, mem, rng = unstacked_model_and_memory(cfg, args.tiny)
    names = [v for v in args.variants.split(",") if v]
    run_base, progs = compiled_variants(up, cfg, mem, args.steps, mem_lib.EditMemory, "delta",
                                        {k: VARIANTS[k] for k in names}, rng)
    h = jnp.asarray(rng.standard_normal((1, 128, cfg.d_model)), jnp.bfloat16)
    ref = np.asarray(jax.jit(LIBRARY_DELTA)(mem, h), np.float32)
    fns = {"none": run_base, **{k: p["run"] for k, p in progs.items()}}
    for f in fns.values():
        C.block(f())
    res, rounds = C.measure_rounds(fns, want=args.repeats)
    toks = {k: np.asarray(r["out"]).tolist() for k, r in res.items()}
    rec["variants"] = {}
    for k in names:
        d = np.asarray(jax.jit(VARIANTS[k])(mem, h), np.float32)
        v = {"compile_s": progs[k]["compile_s"], "step_ms": 1e3 * res[k]["steady_s"] / args.steps,
             "step_ms_no_edit": 1e3 * res["none"]["steady_s"] / args.steps,
             "overhead_pct": C.overhead_pct(res["none"], res[k], C.round_ratios(rounds, k, "none")),
             "delta_rel_diff_to_library": float(np.max(np.abs(d - ref)) / max(np.max(np.abs(ref)), 1e-30)),
             # in units of the bf16 output's last place (2^-7 of the value's power of two)
             "delta_max_ulps_to_library": float(np.max(np.abs(d - ref) / np.exp2(np.floor(np.log2(
                 np.maximum(np.abs(ref), 1e-30))) - 7))),
             "tokens_equal_library": toks[k] == toks.get("library", toks[k])}
        rec["variants"][k] = v
        o = v["overhead_pct"]
        print(f"[edit_rounds] {k}: {v['step_ms_no_edit']:.3f} -> {v['step_ms']:.3f} ms, overhead {o['paired_median']:.2f}% "
              f"(rounds) / {o['of_medians']:.2f}% (medians), delta diff {v['delta_rel_diff_to_library']:.2e} "
              f"({v['delta_max_ulps_to_library']:.1f} ulp)", flush=True)
    rec["n_rounds"] = len(rounds)


def rounds_against_floor(fns: dict, args, rec: dict, floor_s: float, tag: str) -> None:
    """Each of `fns` once (compiles), then all timed in interleaved rounds (`common.measure_rounds`,
    no extra sync: each returns its result ready); rec gets floor_s, rows (median, runs, ratio to
    the floor) and n_rounds."""
    for f in fns.values():
        f()
    res, rounds = C.measure_rounds(fns, want=args.repeats, sync=lambda _: None)
    rows = {}
    for k, r in res.items():
        rows[k] = {"steady_s": r["steady_s"], "n_steady": r["n_steady"], "ratio_to_floor": r["steady_s"] / floor_s}
        print(f"[{tag}] {k}: {1e3 * r['steady_s']:.3f} ms = {rows[k]['ratio_to_floor']:.2f}x floor", flush=True)
    rec["floor_s"] = floor_s
    rec["rows"] = rows
    rec["n_rounds"] = len(rounds)


def install_b2b(args, cfg, rec):
    """--what install_b2b: the |F| = 1 install back to back (capture, then solve, then the next
    capture), variants timed in the same interleaved rounds: `library` (figure b's back-to-back row:
    the solve waits for its memory on the device), `noblock` (returns the memory as soon as it is
    dispatched; the next capture's read-back waits for it), `hold` (library, every memory kept
    alive, so nothing is freed between captures), `nocb` / `nocb_noblock` (the capture compiled
    without command buffers), and the parts alone (`capture`, `solve`)."""
    layer, up, floor_s, cb = _setup_install(args, cfg, rec)
    upl = cap_lib.layers_up_to(up, layer)
    nocb = cap_lib.capture_chunk.lower(upl, cb, cfg, layer, 0).compile(
        compiler_options={"xla_gpu_enable_command_buffer": ""})
    cap = lambda: cap_lib.capture(up, cfg, cb, layer, "resid")  # noqa: E731
    cap_nocb = lambda: cap_lib.finish_capture(*nocb(upl, cb))  # noqa: E731
    u, v_o, v_t = cap()
    held = []

    def hold():
        held.append(solve(*cap(), layer))
        return held[-1]

    fns = {"library": lambda: solve(*cap(), layer), "noblock": lambda: build_memory(*cap(), layer), "hold": hold,
           "nocb": lambda: solve(*cap_nocb(), layer), "nocb_noblock": lambda: build_memory(*cap_nocb(), layer),
           "capture": cap, "solve": lambda: solve(u, v_o, v_t, layer)}
    rounds_against_floor(fns, args, rec, floor_s, "b2b")


def install_chain(args, cfg, rec):
    """--what install_chain: the |F| = 1 install back to back, in interleaved rounds: `library`
    (`pipeline.capture_and_build`: the float64 solve on the device, queued behind the capture, the
    keys read back and checked while it runs), `host` (capture, read-back, host float64 solve,
    packed transfer: the library before `memory.build_on_device`), and the `capture` alone. Also
    the two memories' G and W against each other. (`install_chain_s4.json` is this mode's first
    run, on the prototype of the device solve that became `memory.build_on_device`.)"""
    layer, up, floor_s, cb = _setup_install(args, cfg, rec)
    coord = Coordinate(layer, -1, 0)
    lib = lambda: capture_and_build(up, cfg, cb, coord, 1.0, 4)[0]  # noqa: E731
    cap = lambda: cap_lib.capture(up, cfg, cb, layer, "resid")  # noqa: E731
    host_mem, dev_mem = solve(*cap(), layer), lib()
    for f in ("G", "W"):
        a, b = np.asarray(getattr(host_mem, f)), np.asarray(getattr(dev_mem, f))
        rec[f"{f}_max_rel_diff"] = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    print(f"[chain] device vs host solve: G {rec['G_max_rel_diff']:.2e}, W {rec['W_max_rel_diff']:.2e}", flush=True)
    fns = {"library": lib, "host": lambda: solve(*cap(), layer), "capture": cap}
    rounds_against_floor(fns, args, rec, floor_s, "chain")


def h2d(args, cfg, rec):
    """--what h2d: what putting a small memory (|F| = 1: U, Dm, W [1,D], G [1,1], active, four scalars;
    one packed f32 buffer) on the device costs, in interleaved rounds: the host time of each call
    (`*_host`: returns when the call does) and the time until its result is on the device (block).
    `unpack_numpy` is the library (`memory._unpack` on the host buffer), `device_put` a plain
    transfer, `unpack_device` the unpack of a buffer already on the device (no transfer), `scalar`
    one 4-byte transfer."""
    d = cfg.d_model
    buf = np.random.default_rng(0).standard_normal(3 * d + 1 + 1 + 4).astype(np.float32)
    dev = jax.device_put(buf)
    one = np.float32(1.0)
    first = lambda x: x[0] if isinstance(x, tuple) else x  # noqa: E731
    calls = {"unpack_numpy": lambda: mem_lib._unpack(buf, 1, d), "device_put": lambda: jax.device_put(buf),
             "unpack_device": lambda: mem_lib._unpack(dev, 1, d), "scalar": lambda: jax.device_put(one)}
    fns = {}
    for k, f in calls.items():
        fns[k] = (lambda f: lambda: jax.block_until_ready(first(f())))(f)
        fns[k + "_host"] = f
    for f in fns.values():
        f()
    res, _ = C.measure_rounds(fns, want=args.repeats, sync=lambda _: None)
    rec["rows"] = {k: {"steady_s": r["steady_s"], "n_steady": r["n_steady"]} for k, r in res.items()}
    for k, r in res.items():
        print(f"[h2d] {k}: {1e6 * r['steady_s']:.1f} us", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--what", choices=("install", "install_parts", "install_joint", "install_b2b", "install_chain", "h2d", "edit",
                                              "edit_rounds"),
                    required=True)
    ap.add_argument("--trace-dir", default="/tmp/probe_trace")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    cfg = C.model_config(args.tiny)
    rec = {"device": jax.devices()[0].device_kind, "what": args.what, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    {"install": install_probe, "install_parts": install_parts, "install_joint": install_joint,
     "install_b2b": install_b2b, "install_chain": install_chain, "h2d": h2d, "edit": edit_probe, "edit_rounds": edit_rounds}[args.what](args, cfg, rec)
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)
    print("RESULT " + json.dumps({k: v for k, v in rec.items() if k in ("rows", "variants")}))


if __name__ == "__main__":
    main()
