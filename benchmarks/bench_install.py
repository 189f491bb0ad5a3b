"""Figure b: edit install (capture, Eqs. 6-9, + ridge solve, Eq. 11) for |F| in {1, 40, 400, 4000}.

    python benchmarks/bench_install.py --out benchmarks/results
    python benchmarks/bench_install.py --out /tmp/r --tiny            # CPU, seconds

Facts are random token arrays laid out as a `capture.ClozeBatch` directly (no tokenizer): prompt 112
tokens (a 6-token subject inside it) + object 16 tokens, and prompt + target 16 tokens, so both
cloze sequences are exactly 128 tokens (no padding). Coordinate: layer 19, resid (k* = -1).

JAX: `install_s` is `pipeline.capture_and_build` back to back (what `pipeline.install` does after
tokenising, without a gate): the capture (forward stopped at the layer, `--chunk` facts per forward
with both cloze sequences in it) and the Eq. 11 float64 solve; up to `memory.DEVICE_SOLVE_MAX`
facts the solve runs on the device queued behind the capture (`memory.build_on_device`), past it
on the host after the read-back (`memory.build`). The parts are timed apart as well: `capture`
(`capture.capture`, results brought to the host) and `solve` (`default_lam` + the host
`memory.build` of those keys); `install_s_parts` is their sum. The model fingerprint (which
`capture_and_build` looks up) is timed apart: `fingerprint_s` reads the weights (once per loaded
model; `capture.model_fingerprint` caches it per params object), `install_s` includes only the
cached lookup (`fingerprint_cached_s`), and `install_s_first_for_this_model` the full read.
Floor: max(FLOPs / matmul ceiling, one read of the layers' weights per chunk / read bandwidth).
PyTorch: `torch_ref.hooks.capture_torch` (a forward hook at the layer that stops the forward), same
chunks with both cloze sequences in one batched forward (as the JAX capture does), masked means in float32 on the device; solve on the GPU in float64 (Cholesky, then
cholesky_inverse), the same lam rule. Same weights (DLPack views).
Capture and solve are reported apart; compile time apart from steady state (median of up to
`--repeats` runs within the budget; the JSON gives how many).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from timerome_jax.backbone import model as model_lib  # noqa: E402
from timerome_jax.method import capture as cap_lib  # noqa: E402
from timerome_jax.method import memory as mem_lib  # noqa: E402
from timerome_jax.backbone.config import module_id  # noqa: E402
from timerome_jax.method.trace import Coordinate  # noqa: E402
from timerome_jax.pipeline import capture_and_build, default_lam  # noqa: E402

TARGETS_S = {1: 0.2, 40: 0.5, 400: 3.0, 4000: 25.0}


def make_cloze(cfg, n: int, prompt_len: int, obj_len: int, tgt_len: int, subj_len: int, seed: int) -> dict:
    """NumPy arrays of a ClozeBatch of n random facts (no padding): see the module docstring."""
    rng = np.random.default_rng(seed)
    prompts = C.random_tokens(rng, (n, prompt_len), cfg)
    objs = C.random_tokens(rng, (n, obj_len), cfg)
    tgts = C.random_tokens(rng, (n, tgt_len), cfg)
    starts = rng.integers(0, prompt_len - subj_len + 1, n)
    subj = starts[:, None] + np.arange(subj_len)[None]
    to = np.concatenate([prompts, objs], 1)
    tt = np.concatenate([prompts, tgts], 1)
    opos = np.broadcast_to(np.arange(prompt_len, prompt_len + obj_len), (n, obj_len))
    tpos = np.broadcast_to(np.arange(prompt_len, prompt_len + tgt_len), (n, tgt_len))
    i32 = lambda a: np.ascontiguousarray(a, np.int32)  # noqa: E731
    ones = lambda a: np.ones(a.shape, bool)  # noqa: E731
    return {"tokens_o": i32(to), "pad_o": ones(to), "subj_pos": i32(subj), "subj_valid": ones(subj),
            "obj_pos": i32(opos), "obj_valid": ones(opos), "tokens_t": i32(tt), "pad_t": ones(tt),
            "tgt_pos": i32(tpos), "tgt_valid": ones(tpos)}


def cloze_batch(arrs: dict, n: int) -> cap_lib.ClozeBatch:
    return cap_lib.ClozeBatch(**{k: jnp.asarray(v[:n]) for k, v in arrs.items()})


# ------------------------------------------------------------------------------------------------
# JAX
# ------------------------------------------------------------------------------------------------


def jax_solve(u, v_o, v_t, layer, module, alpha, q, fingerprint):
    lam = default_lam(u)
    mem = mem_lib.build(u, v_o, v_t, lam=lam, alpha=alpha, q=q, layer=layer, module=module, step=-1,
                        fingerprint=fingerprint)
    jax.block_until_ready(mem.G)
    return mem


def library_install(params, cfg, cb, args, module: int) -> str:
    """`pipeline.capture_and_build` at the figure's coordinate (returns once the memory is on the
    device); -> where the solve ran ("device" / "host")."""
    coord = Coordinate(args.layer, -1, module)
    return capture_and_build(params, cfg, cb, coord, args.alpha, args.q, chunk=args.chunk)[2]["solved_on"]


def jax_gate_solve(u, v_o, v_t, keys, n_slots, whitening, h_probe, probe_slots, layer, module, alpha, q,
                   fingerprint):
    """The default gated build as pipeline.install does it: keys whitened on the host, n_slots per fact,
    no per-token gate (tau = TAU_OFF), tau_seq from the calibration probe rows (`calibrate_tau_seq`)."""
    mem = mem_lib.build(u, v_o, v_t, lam=default_lam(u), alpha=alpha, q=q, layer=layer, module=module, step=-1,
                        fingerprint=fingerprint, gate_keys=keys, whitening=whitening, gate_n_slots=n_slots)
    mem = mem_lib.with_gate(mem, tau=mem_lib.TAU_OFF, token=False,
                            tau_seq=mem_lib.calibrate_tau_seq(mem, h_probe, probe_slots))
    jax.block_until_ready(mem.G)
    return mem


def jax_gate_calibration(params, cfg, layer, module, n_rows: int, seq_len: int, slots: int, seed: int, chunk: int):
    """What `gate.calibrate` computes once per (model, coordinate), on random tokens of its sizes:
    residuals of n_rows whitening rows + n_rows threshold rows + n_rows probe rows (seq_len tokens,
    the last `slots` masked in the probes), `fit_whitening` on the whitening rows -> (mu, P), probe
    residuals [n_rows, seq_len, D] f32 and their slots."""
    rng = np.random.default_rng(seed)
    toks = C.random_tokens(rng, (3 * n_rows, seq_len), cfg)
    toks[2 * n_rows:, -slots:] = cfg.mask_token_id
    pad = np.ones(toks.shape, bool)
    h = cap_lib.capture_residuals(params, cfg, toks, pad, layer, module, chunk=chunk)
    h = h.reshape(3 * n_rows, seq_len, -1)
    whitening = mem_lib.fit_whitening(h[:n_rows].reshape(-1, h.shape[-1]))
    probe_slots = np.zeros((n_rows, seq_len), bool)
    probe_slots[:, -slots:] = True
    return whitening, h[2 * n_rows:], probe_slots


# ------------------------------------------------------------------------------------------------
# PyTorch
# ------------------------------------------------------------------------------------------------


def torch_capture(model, tb: dict, n: int, layer: int, module: int, chunk: int):
    """capture_torch per chunk (forward stops at the layer), masked means in float32 -> u, v_o, v_t.
    As in `capture.capture`, the original and target sequences of a chunk go through one batched
    forward (padded to one length and one number of read positions)."""
    import torch
    import torch.nn.functional as F

    from timerome_jax.torch_ref.hooks import capture_torch

    def mean(h, valid):
        w = valid.float()[..., None]
        return (h.float() * w).sum(1) / w.sum(1)

    def pad_to(x, width, fill):
        return F.pad(x, (0, width - x.shape[1]), value=fill)

    us, vos, vts = [], [], []
    S, P = tb["subj_pos"].shape[1], tb["obj_pos"].shape[1]
    T = max(tb["tokens_o"].shape[1], tb["tokens_t"].shape[1])
    R = max(S + P, tb["tgt_pos"].shape[1])
    pad_id = int(tb["pad_id"])
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        k = sl.stop - sl.start
        pos_o = torch.cat([tb["subj_pos"][sl], tb["obj_pos"][sl]], 1)
        tokens = torch.cat([pad_to(tb["tokens_o"][sl], T, pad_id), pad_to(tb["tokens_t"][sl], T, pad_id)])
        mask = torch.cat([pad_to(tb["pad_o"][sl], T, False), pad_to(tb["pad_t"][sl], T, False)])
        pos = torch.cat([pad_to(pos_o, R, 0), pad_to(tb["tgt_pos"][sl], R, 0)])
        a = capture_torch(model, tokens, pos, layer, module, attention_mask=mask)
        us.append(mean(a[:k, :S], tb["subj_valid"][sl]))
        vos.append(mean(a[:k, S:S + P], tb["obj_valid"][sl]))
        vts.append(mean(a[k:, : tb["tgt_pos"].shape[1]], tb["tgt_valid"][sl]))
    return torch.cat(us), torch.cat(vos), torch.cat(vts)


def torch_solve(u, v_o, v_t, rel: float = 0.1):
    """G = (U U^T + lam I)^{-1} in float64 on the device (lam = rel * mean |u|^2, as default_lam);
    D = v_t - v_o. Returns (G float32, D, lam)."""
    import torch

    U = u.double()
    lam = rel * (U * U).sum(-1).mean()
    K = U @ U.T + lam * torch.eye(U.shape[0], dtype=U.dtype, device=U.device)
    G = torch.cholesky_inverse(torch.linalg.cholesky(K))
    G = 0.5 * (G + G.T)
    return G.float(), v_t - v_o, lam


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def parse(argv=None):
    ap = C.base_parser(__doc__)
    ap.add_argument("--sizes", default=None, help="comma list of |F| (1,40,400,4000; --tiny 1,4,40)")
    ap.add_argument("--layer", type=int, default=None, help="capture layer (19; --tiny 1)")
    ap.add_argument("--module", default="resid")
    ap.add_argument("--chunk", type=int, default=None, help="facts per forward, both frameworks (200; --tiny 8)")
    ap.add_argument("--prompt-len", type=int, default=None, help="112; --tiny 12")
    ap.add_argument("--object-len", type=int, default=None, help="16; --tiny 4")
    ap.add_argument("--target-len", type=int, default=None, help="16; --tiny 4")
    ap.add_argument("--subj-len", type=int, default=None, help="6; --tiny 3")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--q", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per size (fewer once the budget is spent)")
    ap.add_argument("--unstacked", type=int, default=1, choices=(0, 1),
                    help="also time the smallest |F| with the unstacked layer layout (model.unstack; default 1)")
    ap.add_argument("--gate", action="store_true",
                    help="also time the default gated install (as pipeline.install with a given calibration): "
                         "slot-key capture + gated build (keys whitened, n_slots) + tau_seq on --gate-rows probe "
                         "rows; the calibration (gate.calibrate: residual captures + whitening fit, once per model "
                         "and coordinate) is timed apart, once")
    ap.add_argument("--gate-rows", type=int, default=None,
                    help="calibration rows per kind (whitening, threshold, probe), as gate.calibrate (400; --tiny 16)")
    args = ap.parse_args(argv)
    C.fill_sizes(args, (("sizes", "1,40,400,4000", "1,4,40"), ("layer", 19, 1), ("chunk", 200, 8),
                        ("prompt_len", 112, 12), ("object_len", 16, 4), ("target_len", 16, 4),
                        ("subj_len", 6, 3), ("gate_rows", 400, 16)))
    args.sizes = sorted({int(s) for s in str(args.sizes).split(",") if s.strip()})
    return args


def main(argv=None):
    args = parse(argv)
    cfg, std, deadline, ceiling = C.start(args)
    m_id = module_id(args.module)
    rec = C.Record(os.path.join(args.out, "fig_b_install.json"), "b", "edit install: capture + solve", args)
    t0 = time.perf_counter()
    params = C.init_params(jax.random.key(args.seed), cfg, std)
    rec["init_s"] = time.perf_counter() - t0
    n_max = max(args.sizes)
    arrs = make_cloze(cfg, n_max, args.prompt_len, args.object_len, args.target_len, args.subj_len, args.seed + 2)
    T_o, T_t = arrs["tokens_o"].shape[1], arrs["tokens_t"].shape[1]
    rec["shapes"] = {**C.shape_info(cfg, params), "sizes": args.sizes, "layer": args.layer, "module": args.module,
                     "seq_len_object_cloze": T_o, "seq_len_target_cloze": T_t, "chunk": args.chunk,
                     "unpadded": True}
    rec["ceiling"] = ceiling
    L_run = args.layer + 1
    rows = {}
    for n in args.sizes:
        f_cap = C.forward_flops(cfg, n, T_o, L_run, head=False) + C.forward_flops(cfg, n, T_t, L_run, head=False)
        f_solve = 2 * n * n * cfg.d_model + n ** 3  # Gram matrix + Cholesky and inverse (~n^3/3 + 2n^3/3)
        calls = -(-n // args.chunk)  # one read of the weights per chunk (both cloze sequences together)
        fl = C.floor(f_cap + f_solve, calls * C.weight_bytes(cfg, L_run, head=False), ceiling)
        rows[str(n)] = {"n": n, "capture_flops": f_cap, "solve_flops": f_solve, "floor": fl,
                        "target_install_s": TARGETS_S.get(n)}
    rec["sizes"] = rows
    rec.save()
    results = {}

    # optional repeats: torch (first) gets half of the budget, JAX what is left but at least the other half
    t_deadline = deadline.half_of_rest()
    if not args.skip_torch:
        with rec.section("torch"):
            import torch

            tmodel, dev = C.shared_torch_model(params, cfg, rec)
            tb = {k: torch.as_tensor(v, device=dev).long() if v.dtype != bool else torch.as_tensor(v, device=dev)
                  for k, v in arrs.items()}
            tb["pad_id"] = cfg.pad_token_id
            with torch.no_grad():
                torch_capture(tmodel, tb, 1, args.layer, m_id, args.chunk)  # warm-up (handles, kernels)
                C.torch_sync()
                for n in args.sizes:
                    C.torch_reset_peak()
                    cap = C.measure(lambda: torch_capture(tmodel, tb, n, args.layer, m_id, args.chunk),
                                    want=args.repeats, deadline=t_deadline, sync=lambda _: C.torch_sync())
                    u, v_o, v_t = cap["out"]
                    sol = C.measure(lambda: torch_solve(u, v_o, v_t), want=args.repeats, deadline=t_deadline,
                                    sync=lambda _: C.torch_sync())
                    G, D, lam = sol["out"]
                    r = rows[str(n)]
                    r["torch"] = {"capture": C.strip(cap), "solve": C.strip(sol), "peak_bytes": C.torch_peak_bytes(),
                                  "install_s": cap["steady_s"] + sol["steady_s"]}
                    r["torch"]["ratio_to_floor"] = C.ratio(r["torch"]["install_s"], r["floor"]["floor_s"])
                    results[("torch", n)] = tuple(x.float().cpu().numpy() for x in (u, v_o, v_t, G, D))
                    del u, v_o, v_t, G, D, cap, sol
                    rec.save()
            del tmodel, tb
            C.torch_release()

    def jax_part(cfg_used):
        j_deadline = deadline.at_least((deadline.budget_s or 0) / 2)
        # the fingerprint read from the weights (once per loaded model: model_fingerprint caches it per
        # params object) is timed apart; an install pays only the cached lookup (`fingerprint_cached`)
        fpm = C.measure(lambda: cap_lib.model_fingerprint(params, cfg_used, cache=False), want=3,
                        deadline=j_deadline, sync=lambda _: None)
        fp = fpm["out"]
        cap_lib.model_fingerprint(params, cfg_used)  # fills the cache, as the first install does
        fpc = C.measure(lambda: cap_lib.model_fingerprint(params, cfg_used), want=5, deadline=j_deadline,
                        sync=lambda _: None)
        rec["fingerprint_cached"] = C.strip(fpc)
        rec["fingerprint_cached_s"] = fpc["steady_s"]
        if args.gate:  # the one-time calibration, on random tokens (its cost does not depend on their values)
            cal = C.measure(lambda: jax_gate_calibration(params, cfg_used, args.layer, m_id, args.gate_rows,
                                                         T_o, args.object_len, args.seed + 9, args.chunk),
                            want=1, deadline=j_deadline, sync=lambda _: None, allow_estimate=True)
            whitening, h_probe, probe_slots = cal["out"]
            rec["gate_calibration"] = {**C.strip(cal), "rows_per_kind": args.gate_rows, "seq_len": T_o,
                                       "what": "gate.calibrate's work once per (model, coordinate): residual "
                                               "captures of 3 x rows + fit_whitening (host float64)"}
            rec["gate_calibration_s"] = cal["steady_s"]
        rec["fingerprint"] = C.strip(fpm)
        rec["fingerprint_s"] = fpm["steady_s"]
        for n in args.sizes:
            cb = cloze_batch(arrs, n)
            cap = C.measure(lambda: cap_lib.capture(params, cfg_used, cb, args.layer, m_id, chunk=args.chunk),
                            want=args.repeats, deadline=j_deadline)
            u, v_o, v_t = cap["out"]
            sol = C.measure(lambda: jax_solve(u, v_o, v_t, args.layer, m_id, args.alpha, args.q, fp),
                            want=args.repeats, deadline=j_deadline)
            mem = sol["out"]
            inst = C.measure(lambda: library_install(params, cfg_used, cb, args, m_id), want=args.repeats,
                             deadline=j_deadline, sync=lambda _: None)
            r = rows[str(n)]
            comp = sum(c["compile_s"] for c in cap["compile_runs"])
            r["jax"] = {"capture": C.strip(cap), "solve": C.strip(sol), "capture_compile_s": comp,
                        "install": C.strip(inst), "solved_on": inst["out"],
                        "install_s": inst["steady_s"],
                        "install_s_parts": cap["steady_s"] + sol["steady_s"] + rec["fingerprint_cached_s"],
                        "install_s_first_for_this_model": inst["steady_s"] - rec["fingerprint_cached_s"]
                        + rec["fingerprint_s"],
                        "peak_bytes_so_far": C.jax_peak_bytes()}
            r["jax"]["ratio_to_floor"] = C.ratio(r["jax"]["install_s"], r["floor"]["floor_s"])
            results[("jax", n)] = (u, v_o, v_t, np.asarray(mem.G)[:n, :n], np.asarray(mem.Dm)[:n])
            if args.gate:
                keys = C.measure(lambda: np.asarray(jax.block_until_ready(cap_lib.capture_slot_keys(
                    params, cfg_used, cb, args.layer, m_id, chunk=args.chunk))), want=args.repeats, deadline=j_deadline)
                n_slots = np.asarray(arrs["obj_valid"][:n]).sum(1).astype(np.int32)
                gsol = C.measure(lambda: jax_gate_solve(u, v_o, v_t, keys["out"], n_slots, whitening, h_probe,
                                                        probe_slots, args.layer, m_id, args.alpha, args.q, fp),
                                 want=args.repeats, deadline=j_deadline)
                g_inst = cap["steady_s"] + keys["steady_s"] + gsol["steady_s"] + rec["fingerprint_cached_s"]
                r["jax"]["gate"] = {"slot_keys": C.strip(keys), "solve_with_gate": C.strip(gsol),
                                    "memory": "latch default: n_slots, tau_seq calibrated, no per-token gate",
                                    "token_gate": bool(gsol["out"].gate.token),
                                    "install_s": g_inst, "probe_rows": int(h_probe.shape[0]),
                                    "install_s_with_calibration": g_inst + rec["gate_calibration_s"]}
            rec.save()
        if args.unstacked:
            # the unstacked layer layout (model.unstack): the capture's layer loop reads each
            # layer's own arrays (no copy out of the stack); timed at the smallest |F| (the |F| = 1 target)
            up = model_lib.unstack(params)
            fpu = C.measure(lambda: cap_lib.model_fingerprint(up, cfg_used, cache=False), want=3,
                            deadline=j_deadline, sync=lambda _: None)
            cap_lib.model_fingerprint(up, cfg_used)
            n = min(args.sizes)
            cb = cloze_batch(arrs, n)
            # a few milliseconds each: many runs, and no soft deadline, cost under a second and steady the medians
            reps = max(args.repeats, 21)
            fpuc = C.measure(lambda: cap_lib.model_fingerprint(up, cfg_used), want=reps, sync=lambda _: None)
            cap = C.measure(lambda: cap_lib.capture(up, cfg_used, cb, args.layer, m_id, chunk=args.chunk),
                            want=reps)
            u_u = cap["out"]
            sol = C.measure(lambda: jax_solve(*u_u, args.layer, m_id, args.alpha, args.q, fpu["out"]),
                            want=reps)
            # the library's install back to back, as a user runs it (the figure's install_s, as in every row)
            whole = C.measure(lambda: library_install(up, cfg_used, cb, args, m_id), want=reps, sync=lambda _: None)
            r = rows[str(n)]
            parts = cap["steady_s"] + sol["steady_s"] + fpuc["steady_s"]
            inst = whole["steady_s"]
            r["jax_unstacked"] = {"capture": C.strip(cap), "solve": C.strip(sol), "fingerprint": C.strip(fpu),
                                  "install": C.strip(whole), "solved_on": whole["out"], "install_s_parts": parts,
                                  "fingerprint_cached": C.strip(fpuc),
                                  "install_s_first_for_this_model": inst - fpuc["steady_s"] + fpu["steady_s"],
                                  "fingerprint_equal_to_stacked": fpu["out"] == fp, "install_s": inst,
                                  "ratio_to_floor": C.ratio(inst, r["floor"]["floor_s"]),
                                  "ratio_to_floor_parts": C.ratio(parts, r["floor"]["floor_s"]),
                                  "u_equal_to_stacked": bool(np.array_equal(np.asarray(u_u[0]),
                                                                            results[("jax", n)][0]))}
            rec.save()
            del up
        if args.profile:
            n = max(args.sizes)
            cb = cloze_batch(arrs, n)
            with C.maybe_profile(args.profile):
                cap_lib.capture(params, cfg_used, cb, args.layer, m_id, chunk=args.chunk)
            rec["profile"] = {"dir": os.path.abspath(args.profile), "what": f"capture |F|={n}"}

    with rec.section("jax"):
        C.with_attn_fallback(rec, cfg, jax_part)

    met = {}
    for n in args.sizes:
        r = rows[str(n)]
        if ("jax", n) in results and ("torch", n) in results:
            j, t = results[("jax", n)], results[("torch", n)]
            r["agreement"] = {k: C.agreement(a, b) for k, a, b in zip(("u", "v_o", "v_t", "G", "D"), j, t)}
        if "jax" in r and "torch" in r:
            r["torch_over_jax"] = {"capture": C.ratio(r["torch"]["capture"]["steady_s"], r["jax"]["capture"]["steady_s"]),
                                   "solve": C.ratio(r["torch"]["solve"]["steady_s"], r["jax"]["solve"]["steady_s"]),
                                   "install": C.ratio(r["torch"]["install_s"], r["jax"]["install_s"])}
        if "jax" in r:
            tgt = TARGETS_S.get(n)
            met[str(n)] = {"within_target_s": None if tgt is None else r["jax"]["install_s"] <= tgt,
                           "within_2x_floor": (r["jax"]["ratio_to_floor"] or 1e9) <= 2.0}
            if "jax_unstacked" in r:
                met[str(n)]["unstacked_within_2x_floor"] = (r["jax_unstacked"]["ratio_to_floor"] or 1e9) <= 2.0
            if "gate" in r["jax"]:
                g = r["jax"]["gate"]
                met[str(n)]["gated_within_target_s"] = None if tgt is None else g["install_s"] <= tgt
                met[str(n)]["gated_with_calibration_within_target_s"] = (
                    None if tgt is None else g["install_s_with_calibration"] <= tgt)
    rec["met"] = met
    rec["jax_peak_bytes"] = C.jax_peak_bytes()
    out = rec.finish()
    for n in args.sizes:
        r = out["sizes"][str(n)]
        print(f"[b] |F|={n}: floor {r['floor']['floor_s']:.3g}s jax install {r.get('jax', {}).get('install_s')} "
              f"(unstacked {r.get('jax_unstacked', {}).get('install_s')}) torch {r.get('torch', {}).get('install_s')}",
              flush=True)
    return out


if __name__ == "__main__":
    main()
