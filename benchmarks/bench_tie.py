"""Figure a: the full TIE sweep (every layer x step x module) for 8 facts, JAX lanes vs PyTorch hooks.

    python benchmarks/bench_tie.py --out benchmarks/results                      # figure a
    python benchmarks/bench_tie.py --out R --what stages --profile R/profile     # where the time goes
    python benchmarks/bench_tie.py --out R --what scaling                        # 1 vs all local devices
    python benchmarks/bench_tie.py --out R --what screen                         # screen + exact top 5% vs full
    python benchmarks/bench_tie.py --out R --what sweep,screen                   # both, one init (run_all's a)
    python benchmarks/bench_tie.py --out R --tiny --what sweep,stages,scaling    # CPU, seconds
    python benchmarks/bench_tie.py --out R --layout unstacked                    # per-layer arrays

--layout (every part): "stacked" (default; params["layers"] one [L, ...] array per weight, a layer
`lax.scan` at --layer-unroll) or "unstacked" (`model.unstack`: a list of per-layer arrays, an
unrolled layer loop, what `load_model(layout="auto")` gives on a GPU). The records keep it under
knobs.layout; the PyTorch side shares the same arrays either way.

sweep (fig_a_tie.json): 8 unpadded facts of prompt 112 + answer 16 = 128 tokens (subject 6 tokens),
K = 8 denoising steps, n_noise = 1, LLaDA-8B shape with random bf16 weights made on the device.
JAX: `timerome_jax.method.trace.trace` (lanes; an unpadded FactBatch runs with no attention mask, so
cuDNN attention is vmapped without a mask). PyTorch: `torch_ref.trace.torch_trace` (forward hooks,
candidates of one step batched, prefix steps shared) on the same canvases, the same noise draw and
the same weights (DLPack views). Both run `chunk` candidates x 8 facts = 64 rows per forward, so the
[rows, 128, 126464] float32 logits fit. JAX programs are compiled ahead (AOT, timed apart), before
the torch sweep; the timed sweeps must compile nothing (checked). With --ready-file / --hold-file
(run_all) the compile phase may run beside another process (validate_8b), and nothing is timed
until that one has ended (the JSON keeps `held_after_compile`). A full sweep takes minutes at 8B: `--repeats`
(default 1) sets how many are timed; the JSON says how many were.

stages (tie_stages.json): the lane loop on the first `--stage-lanes` lanes, with stages left out:
full (= trace.run_lanes), no_commit (canvas never updated), no_logprob (no object log-prob
bookkeeping), forward_only (forward + LM head, logits reduced by a max), body_only (no LM head).
Differences between variants say where the time goes. `--profile DIR` wraps one steady run of
`full` on those lanes in jax.profiler.trace (with --what sweep alone too: a whole 8B sweep would make
a trace of hundreds of MB).

screen (tie_screen.json): `method.screen.screen` and `screen_and_trace` (screen + exact TIE on the
top --top-frac of each module's cells) on the same facts, against the full exact sweep: figure a's
JAX time and Eq. 5 coordinate when fig_a_tie.json of the same facts is in --out, else one sweep timed
here. With `--what sweep,screen` (one process, one init) the screen's first call, which compiles
its programs, runs in a thread beside figure a's ahead-of-time compile (nothing is timed then), and
the screen's timed calls follow the sweep.

scaling (tie_scaling.json): `timerome_jax.method.sharding.trace` (lanes sharded over a 1-D mesh, params
replicated) on 1, 2 and all local devices (`--scaling-devices`), same code.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from timerome_jax.backbone import model as model_lib  # noqa: E402
from timerome_jax.diffusion import sampler  # noqa: E402
from timerome_jax.method import sharding  # noqa: E402
from timerome_jax.method import trace as tr  # noqa: E402
from timerome_jax.io import write_text  # noqa: E402

STAGES = ("full", "no_commit", "no_logprob", "forward_only", "body_only")


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def make_facts(cfg, n_facts: int, prompt_len: int, answer_len: int, subj_len: int, seed: int) -> tr.FactBatch:
    """n_facts random facts of identical lengths (so the FactBatch has no padding)."""
    if subj_len > prompt_len:
        raise ValueError(f"subject length {subj_len} > prompt length {prompt_len}")
    rng = np.random.default_rng(seed)
    prompts = C.random_tokens(rng, (n_facts, prompt_len), cfg)
    objects = C.random_tokens(rng, (n_facts, answer_len), cfg)
    starts = rng.integers(0, prompt_len - subj_len + 1, n_facts)
    subj = [list(range(s, s + subj_len)) for s in starts]
    fb = tr.make_fact_batch([list(p) for p in prompts], subj, [list(o) for o in objects], cfg)
    assert bool(np.all(np.asarray(fb.pad_mask))), "benchmark facts must be unpadded"
    return fb


def _unpadded(fb: tr.FactBatch) -> tr.FactBatch:
    # what trace.trace does first: an all-True mask is dropped, the forward then gets none
    if fb.pad_mask is not None and bool(np.all(np.asarray(fb.pad_mask))):
        return dataclasses.replace(fb, pad_mask=None)
    return fb


def sigma_of(params, tcfg) -> float:
    return tcfg.noise_scale * float(jnp.std(params["embed"].astype(jnp.float32)))


def noises_of(params, fb, tcfg) -> list:
    """The embedding-noise draws trace.trace uses (same keys), as NumPy [B,T,D] for torch."""
    sigma = sigma_of(params, tcfg)
    return [np.asarray(tr.embedding_noise(jax.random.fold_in(jax.random.key(tcfg.seed), r), fb, params, sigma))
            for r in range(tcfg.n_noise)]


def sweep_work(cfg, B: int, T: int, tcfg: tr.TraceConfig, chunk: int) -> dict:
    """Rows (sequences) the sweep must run, its FLOPs, and the forward calls of the JAX lane plan."""
    K, L, R = tcfg.steps, cfg.n_layers, tcfg.n_noise
    traj_rows = (1 + R) * K * B
    cand_rows = R * 3 * L * (K * (K + 1) // 2) * B  # a candidate patching step k runs steps k..K-1
    n_lanes = len(tr.plan_lanes(L, K))
    calls = (1 + R) * K + R * (-(-n_lanes // chunk)) * (K + 1)
    return {"rows": traj_rows + cand_rows, "trajectory_rows": traj_rows, "candidate_rows": cand_rows,
            "n_candidates": 3 * L * K, "n_lanes": n_lanes, "jax_forward_calls": calls,
            "flops": C.forward_flops(cfg, traj_rows + cand_rows, T),
            "bytes": calls * C.weight_bytes(cfg)}


# ------------------------------------------------------------------------------------------------
# JAX: compile ahead, then time trace.trace
# ------------------------------------------------------------------------------------------------


def warm_trace(params, cfg, fb, tcfg, runner=None) -> dict:
    """Compile (AOT) every program `trace.trace` will run for these shapes, with the very arguments
    it will build (so the timed calls hit the compilation cache). Runs the two short trajectories."""
    watch = C.CompileWatch.get()
    mark, t0 = watch.mark(), time.perf_counter()
    fb, noise, corr, acts = lane_inputs(params, cfg, fb, tcfg)
    lanes = tr.plan_lanes(cfg.n_layers, tcfg.steps)
    if runner is None:
        compiled = tr.run_lanes.lower(params, fb, noise, corr, acts, jnp.asarray(lanes), cfg=cfg,
                                      tcfg=tcfg).compile()
    else:
        compiled = runner.lower(params, fb, noise, corr, acts, lanes).compile()
    C.block((acts, corr))
    n, secs = watch.since(mark, this_thread=True)
    return {"wall_s": time.perf_counter() - t0, "compile_s": secs, "n_compilations": n,
            "run_lanes_memory": C.memory_analysis(compiled)}


# ------------------------------------------------------------------------------------------------
# PyTorch hooks
# ------------------------------------------------------------------------------------------------


def torch_sweep(model, cfg, fb, noises, tcfg, chunk, device) -> dict:
    """torch_ref.trace.torch_trace on the FactBatch's arrays (tie, tie_bar, clean, corrupted)."""
    from timerome_jax.torch_ref.trace import torch_trace

    return torch_trace(model, fb.x0, fb.pad_mask, fb.obj, fb.obj_mask, fb.subj_pos, fb.subj_valid, noises,
                       K=tcfg.steps, mask_id=cfg.mask_token_id, tau=tcfg.tau, chunk=chunk, device=device)


# ------------------------------------------------------------------------------------------------
# stage variants (where the time goes)
# ------------------------------------------------------------------------------------------------


def _stage_step(params, cfg, scfg, fb, sched, x, lpf, step, iv, stage: str):
    """trace._step with stages left out (stage="full" is the same computation)."""
    if stage == "body_only":  # every layer, no LM head: read the last block output on the subject
        out = model_lib.run(params, x, cfg, fb.pad_mask, dataclasses.replace(iv, read_pos=fb.subj_pos), step,
                            stop_layer=cfg.n_layers - 1)
        return x, lpf, jnp.sum(out.acts["resid"][-1].astype(jnp.float32), axis=(-1, -2))
    logits = model_lib.run(params, x, cfg, fb.pad_mask, iv, step).logits
    if stage == "forward_only":  # logits made and read once, nothing else
        return x, lpf, jnp.sum(jnp.max(logits, -1), -1)
    if stage in ("full", "no_commit"):
        lpf, score = tr.object_score(logits, x, lpf, fb, cfg)
    if stage in ("full", "no_logprob"):
        x = sampler.commit(logits, x, sched, step, jax.random.key(0), cfg, scfg)
    if stage == "no_logprob":
        score = jnp.sum(x, -1).astype(jnp.float32)  # keeps the commit chain alive
    return x, lpf, score


_STAGE_STEPS = {}


def stage_step_fn(stage: str):
    """One hashable step function per stage (a static argument of trace.run_lanes)."""
    if stage not in _STAGE_STEPS:
        _STAGE_STEPS[stage] = functools.partial(_stage_step, stage=stage)
    return _STAGE_STEPS[stage]


def stage_lanes(params, fb, noise, corr, clean_acts, lanes, cfg, tcfg, stage: str):
    """trace.run_lanes (same lane pairing, restarts and patches) with `_stage_step` as its step."""
    return tr.run_lanes(params, fb, noise, corr, clean_acts, lanes, cfg=cfg, tcfg=tcfg, step_fn=stage_step_fn(stage))


def lane_inputs(params, cfg, fb, tcfg):
    """(fb without mask, noise, corrupted trajectory, clean acts) as trace.trace builds them."""
    fb = _unpadded(fb)
    clean = tr.trajectory(params, fb, None, cfg=cfg, tcfg=tcfg, read=True)
    noise = tr.embedding_noise(jax.random.fold_in(jax.random.key(tcfg.seed), 0), fb, params, sigma_of(params, tcfg))
    corr = tr.trajectory(params, fb, noise, cfg=cfg, tcfg=tcfg, read=False)
    return fb, noise, corr, clean.acts


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def parse(argv=None):
    ap = C.base_parser(__doc__)
    ap.add_argument("--what", default="sweep", help="comma list of sweep, stages, scaling, screen")
    ap.add_argument("--top-frac", type=float, default=0.05, help="--what screen: exact TIE on this fraction of "
                    "each module's cells (default 0.05)")
    ap.add_argument("--facts", type=int, default=None, help="facts (8; --tiny 4)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (112; --tiny 12)")
    ap.add_argument("--answer-len", type=int, default=None, help="answer tokens (16; --tiny 4)")
    ap.add_argument("--subj-len", type=int, default=None, help="subject tokens (6; --tiny 3)")
    ap.add_argument("--steps", type=int, default=None, help="K denoising steps (8; --tiny 4)")
    ap.add_argument("--n-noise", type=int, default=1)
    ap.add_argument("--noise-scale", type=float, default=3.0)
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--chunk", type=int, default=None, help="JAX lanes per vmapped chunk (8; --tiny 4)")
    ap.add_argument("--torch-chunk", type=int, default=None,
                    help="torch candidates per batch (default: --chunk, so both run the same rows per forward)")
    ap.add_argument("--repeats", type=int, default=1, help="timed full sweeps per framework (steady state)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"stage variants to time ({','.join(STAGES)})")
    ap.add_argument("--stage-lanes", type=int, default=None, help="lanes in the stage runs (2 x chunk)")
    ap.add_argument("--stage-repeats", type=int, default=5)
    ap.add_argument("--layout", choices=("stacked", "unstacked"), default="stacked",
                    help="params layout: stacked (default; one [L, ...] array per weight, layer lax.scan) or "
                         "unstacked (per-layer arrays, unrolled layer loop; load_model's GPU default)")
    ap.add_argument("--ready-file", default=None, help="(run_all; with --what sweep) written at the start, before "
                    "init and the sweep's untimed compile phase")
    ap.add_argument("--hold-file", default=None, help="(run_all) after the compile phase, wait until this file is "
                    "gone before timing anything (another process runs beside the compile phase meanwhile)")
    ap.add_argument("--hold-timeout-s", type=float, default=600.0)
    ap.add_argument("--scaling-devices", default="1,2,all",
                    help="device counts for --what scaling (those above the local count are dropped)")
    args = ap.parse_args(argv)
    C.fill_sizes(args, (("facts", 8, 4), ("prompt_len", 112, 12), ("answer_len", 16, 4), ("subj_len", 6, 3),
                        ("steps", 8, 4), ("chunk", 8, 4)))
    if args.torch_chunk is None:
        args.torch_chunk = args.chunk
    if args.stage_lanes is None:
        args.stage_lanes = 2 * args.chunk
    args.what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = set(args.what) - {"sweep", "stages", "scaling", "screen"}
    if bad:
        ap.error(f"--what: unknown parts {sorted(bad)}")
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if set(args.stages) - set(STAGES):
        ap.error(f"--stages: unknown {sorted(set(args.stages) - set(STAGES))}; choose from {STAGES}")
    return args


def run_sweep(args, cfg, params, fb, tcfg, ceiling, deadline, init_s):
    B, T = fb.x0.shape
    rec = C.Record(os.path.join(args.out, "fig_a_tie.json"), "a", "TIE sweep: JAX lanes vs PyTorch hooks", args)
    work = sweep_work(cfg, B, T, tcfg, args.chunk)
    rec["shapes"] = {**C.shape_info(cfg, params), "facts": B, "seq_len": T, "prompt_len": args.prompt_len,
                     "answer_len": args.answer_len, "subj_len": args.subj_len, "steps": tcfg.steps,
                     "n_noise": tcfg.n_noise, "jax_chunk_lanes": args.chunk, "torch_chunk_candidates": args.torch_chunk,
                     "rows_per_forward": args.chunk * B, "unpadded": True}
    rec["work"] = work
    rec["ceiling"] = ceiling
    rec["floor"] = C.floor(work["flops"], work["bytes"], ceiling)
    rec["init_s"] = init_s
    rec["targets"] = {"jax_over_floor_max": 1.5, "torch_over_jax_min": 1.0}
    jax_res = torch_res = None
    warmed = {}

    def jax_warm(cfg_used):
        """Every JAX program of the sweep (and with --what screen, the screen's) compiled, untimed."""
        pre, first = None, None
        if "screen" in args.what:  # the screen's programs compile in a thread beside the sweep's (untimed)
            watch = C.CompileWatch.get()
            mark, t0 = watch.mark(), time.perf_counter()
            C.block(lane_inputs(params, cfg_used, fb, tcfg))  # the trajectories both use: compiled once, here
            n, secs = watch.since(mark, this_thread=True)
            first = {"wall_s": time.perf_counter() - t0, "compile_s": secs, "n_compilations": n}
            pre = threading.Thread(target=warm_screen, args=(args, cfg_used, params, fb, tcfg), daemon=True)
            pre.start()
        try:
            warm = warm_trace(params, cfg_used, fb, tcfg)
        finally:
            if pre is not None:
                pre.join()
        if first is not None:  # the sweep's compile = the shared trajectories + its own programs
            warm = {**warm, "wall_s": warm["wall_s"] + first["wall_s"],
                    "compile_s": warm["compile_s"] + first["compile_s"],
                    "n_compilations": warm["n_compilations"] + first["n_compilations"],
                    "trajectories_first": first, "in_parallel_with": "the screen's first call (warm_screen)",
                    "wall_s_with_screen_first_call": time.perf_counter() - t0}
        warmed[cfg_used.attn_impl] = warm

    # JAX compiles first (untimed; run_all may run validate_8b beside it), then the timed sweeps
    cfg_jax = cfg
    with rec.section("jax_compile"):
        cfg_jax = C.with_attn_fallback(rec, cfg, jax_warm)
    held = wait_for_hold(args)
    if held is not None:
        rec["held_after_compile"] = held

    if not args.skip_torch:
        with rec.section("torch"):
            import torch

            tmodel, dev = C.shared_torch_model(params, cfg, rec)
            noises = noises_of(params, fb, tcfg)
            C.torch_reset_peak()
            with torch.no_grad():  # warm-up: one forward of a full chunk of rows
                x = torch.as_tensor(np.array(fb.x0), device=dev).repeat(args.torch_chunk, 1)
                t0 = time.perf_counter()
                tmodel(x, attention_mask=torch.ones_like(x)).float().log_softmax(-1)
                C.torch_sync()
                warm_s = time.perf_counter() - t0
                del x
            m = C.measure(lambda: torch_sweep(tmodel, cfg, fb, noises, tcfg, args.torch_chunk, dev), want=args.repeats,
                          deadline=deadline.at, sync=lambda _: C.torch_sync())
            torch_res = m["out"]
            rec["torch"] = {**C.strip(m), "warmup_forward_s": warm_s, "peak_bytes": C.torch_peak_bytes(),
                            "ratio_to_floor": C.ratio(m["steady_s"], rec["floor"]["floor_s"])}
            del tmodel
            C.torch_release()

    def jax_part(cfg_used):
        nonlocal jax_res
        if cfg_used.attn_impl not in warmed:
            jax_warm(cfg_used)
        warm = warmed[cfg_used.attn_impl]
        m = C.measure(lambda: tr.trace(params, cfg_used, fb, tcfg), want=args.repeats, deadline=deadline.at,
                      allow_estimate=True)
        jax_res = m["out"]
        rec["jax"] = {**C.strip(m), "compile": warm, "peak_bytes": C.jax_peak_bytes(),
                      "memory": C.jax_memory(), "ratio_to_floor": C.ratio(m["steady_s"], rec["floor"]["floor_s"])}

    with rec.section("jax"):
        C.with_attn_fallback(rec, cfg_jax or cfg, jax_part)

    if jax_res is not None:
        # Eq. 5's choice from the full exact sweep, for the screen figure to compare with (same facts)
        tb = np.asarray(jax_res.tie_bar)
        rec["jax_selection"] = {
            "resid": tr.select(tb)[0]._asdict(),
            "all_modules": tr.select(tb, modules=("resid", "attn", "mlp"))[0]._asdict(),
            "mean_abs_tie_bar": np.mean(np.abs(tb), 0).round(6).tolist()}
        rec["jax_result_finite"] = {k: bool(np.isfinite(getattr(jax_res, k)[~np.isnan(getattr(jax_res, k))]).all())
                                    for k in ("tie", "tie_bar", "clean", "corrupted")}
    if jax_res is not None and torch_res is not None:
        rec["agreement"] = {k: C.agreement(getattr(jax_res, k), torch_res[k])
                            for k in ("tie", "tie_bar", "clean", "corrupted")}
        jt, tt = rec["jax"]["steady_s"], rec["torch"]["steady_s"]
        rec["torch_over_jax"] = C.ratio(tt, jt)
    if "jax" in rec.data:
        tj = rec.data.get("torch_over_jax")
        rec["met"] = {"jax_within_1.5x_floor": (rec["jax"]["ratio_to_floor"] or 1e9) <= 1.5,
                      "faster_than_torch": None if tj is None else tj > 1.0}
    out = rec.finish()
    j, t = out.get("jax", {}), out.get("torch", {})
    print(f"[a] floor {out['floor']['floor_s']:.3g}s  jax {j.get('steady_s')}s (compile "
          f"{j.get('compile', {}).get('compile_s')}s)  torch {t.get('steady_s')}s  torch/jax {out.get('torch_over_jax')}",
          flush=True)
    return out


def wait_for_hold(args):
    """With --hold-file: wait (at most --hold-timeout-s) until the file is gone, so that nothing timed
    runs beside the process run_all started next to this compile phase. Returns what happened."""
    if not args.hold_file:
        return None
    t0 = time.perf_counter()
    while os.path.exists(args.hold_file) and time.perf_counter() - t0 < args.hold_timeout_s:
        time.sleep(0.25)
    gone = not os.path.exists(args.hold_file)
    return {"waited_s": time.perf_counter() - t0, "released": gone,
            "beside_compile": "run_all ran another job (validate_8b) beside this untimed compile phase"}


def run_stages(args, cfg, params, fb, tcfg, ceiling, deadline):
    B, T = fb.x0.shape
    rec = C.Record(os.path.join(args.out, "tie_stages.json"), "stages", "TIE lane loop with stages left out", args)
    lanes_all = tr.plan_lanes(cfg.n_layers, tcfg.steps)
    lanes = jnp.asarray(lanes_all[: args.stage_lanes])
    n = int(lanes.shape[0])
    rows = n * (tcfg.steps + 1) * B
    rec["shapes"] = {**C.shape_info(cfg), "lanes": n, "of_lanes": len(lanes_all), "rows": rows, "seq_len": T,
                     "rows_per_forward": min(args.chunk, n) * B}
    rec["ceiling"] = ceiling
    flops = {"full": C.forward_flops(cfg, rows, T), "body_only": C.forward_flops(cfg, rows, T, head=False)}
    rec["floor"] = {k: C.floor(v, 0, ceiling) for k, v in flops.items()}
    rec["stages"] = {}

    def part(cfg_used):
        fb_u, noise, corr, acts = lane_inputs(params, cfg_used, fb, tcfg)
        ref = None
        for st in args.stages:
            watch = C.CompileWatch.get()
            mark, t0 = watch.mark(), time.perf_counter()
            comp = tr.run_lanes.lower(params, fb_u, noise, corr, acts, lanes, cfg=cfg_used, tcfg=tcfg,
                                         step_fn=stage_step_fn(st)).compile()
            c_wall, (_, csec) = time.perf_counter() - t0, watch.since(mark)
            m = C.measure(lambda: comp(params, fb_u, noise, corr, acts, lanes), want=args.stage_repeats,
                          deadline=deadline.at)
            if st == "full":
                ref = np.asarray(m["out"])
            rec["stages"][st] = {**C.strip(m), "compile_wall_s": c_wall, "compile_s": csec,
                                 "memory": C.memory_analysis(comp),
                                 "per_lane_step_ms": 1e3 * m["steady_s"] / (n * (tcfg.steps + 1))}
            rec.save()
        if args.profile:
            rec["profile"] = profile_lanes(args.profile, params, cfg_used, fb_u, noise, corr, acts, lanes, tcfg)
        # the variant "full" must be the library's lane loop: same scores as trace.run_lanes
        if ref is not None:
            lib = np.asarray(tr.run_lanes(params, fb_u, noise, corr, acts, lanes, cfg=cfg_used, tcfg=tcfg))
            rec["full_equals_run_lanes"] = C.agreement(ref, lib)

    with rec.section("jax"):
        C.with_attn_fallback(rec, cfg, part)
    s = rec["stages"]
    if "full" in s and s["full"]["steady_s"]:
        f = s["full"]["steady_s"]
        share = {}
        for st, what in (("no_commit", "commit"), ("no_logprob", "logprob_bookkeeping")):
            if st in s and s[st]["steady_s"] is not None:
                share[what] = (f - s[st]["steady_s"]) / f
        if "forward_only" in s and s["forward_only"]["steady_s"] is not None:
            share["commit_and_logprob"] = (f - s["forward_only"]["steady_s"]) / f
            if "body_only" in s and s["body_only"]["steady_s"] is not None:
                share["lm_head"] = (s["forward_only"]["steady_s"] - s["body_only"]["steady_s"]) / f
        if "body_only" in s and s["body_only"]["steady_s"] is not None:
            share["layers"] = s["body_only"]["steady_s"] / f
        rec["share_of_full"] = share
        rec["full_over_floor"] = f / rec["floor"]["full"]["floor_s"]
    out = rec.finish()
    print("[stages] " + "  ".join(f"{k} {v.get('steady_s')}" for k, v in out["stages"].items()), flush=True)
    return out


def profile_lanes(path, params, cfg, fb_u, noise, corr, acts, lanes, tcfg) -> dict:
    """One steady run of the lane loop (stage "full" = trace.run_lanes) on `lanes`, inside
    jax.profiler.trace(path). A subset of the lanes keeps the trace small; every chunk of the sweep
    runs this same program shape."""
    comp = tr.run_lanes.lower(params, fb_u, noise, corr, acts, lanes, cfg=cfg, tcfg=tcfg,
                              step_fn=stage_step_fn("full")).compile()
    C.block(comp(params, fb_u, noise, corr, acts, lanes))
    with C.maybe_profile(path):
        t0 = time.perf_counter()
        C.block(comp(params, fb_u, noise, corr, acts, lanes))
        wall = time.perf_counter() - t0
    return {"dir": os.path.abspath(path), "stage": "full", "lanes": int(lanes.shape[0]), "wall_s": wall}


def run_scaling(args, cfg, params, fb, tcfg, ceiling, deadline):
    B, T = fb.x0.shape
    rec = C.Record(os.path.join(args.out, "tie_scaling.json"), "scaling",
                   "TIE sweep sharded over local devices (jax.sharding)", args)
    devs = jax.local_devices()
    want = []
    for tok in args.scaling_devices.split(","):
        tok = tok.strip()
        k = len(devs) if tok == "all" else int(tok)
        if 1 <= k <= len(devs) and k not in want:
            want.append(k)
    work = sweep_work(cfg, B, T, tcfg, args.chunk)
    rec["shapes"] = {**C.shape_info(cfg), "facts": B, "seq_len": T, "steps": tcfg.steps, "chunk": args.chunk}
    rec["work"] = work
    rec["ceiling"] = ceiling
    rec["floor"] = C.floor(work["flops"], work["bytes"], ceiling)
    rec["n_local_devices"] = len(devs)
    rec["device_counts"] = want
    rec["runs"] = {}
    if len(devs) == 1:
        rec["note"] = "one local device: multi-device scaling not measured (the 1-device sharded run is still timed)"
    rec["targets"] = {"speedup_2": 1.8, "speedup_4": 3.4}
    results = {}

    def part(cfg_used):
        for k in want:
            mesh = sharding.make_mesh(devs[:k])
            p_k, fb_k = sharding.replicate(params, mesh), sharding.replicate(fb, mesh)
            warm = warm_trace(p_k, cfg_used, fb_k, tcfg, runner=sharding.LanesRunner(mesh, cfg_used, tcfg))
            m = C.measure(lambda: sharding.trace(p_k, cfg_used, fb_k, tcfg, mesh=mesh), want=args.repeats,
                          deadline=deadline.at, allow_estimate=True)
            results[k] = m["out"]
            rec["runs"][str(k)] = {**C.strip(m), "compile": warm, "memory": C.jax_memory(),
                                   "ratio_to_floor_of_one_device": C.ratio(m["steady_s"], rec["floor"]["floor_s"])}
            rec.save()
            del p_k, fb_k

    with rec.section("jax"):
        C.with_attn_fallback(rec, cfg, part)
    runs = rec["runs"]
    if "1" in runs and runs["1"]["steady_s"]:
        rec["speedup"] = {k: runs["1"]["steady_s"] / v["steady_s"] for k, v in runs.items() if v["steady_s"]}
        if 1 in results:
            rec["equal_to_one_device"] = {str(k): C.agreement(results[k].tie_bar, results[1].tie_bar)
                                          for k in results if k != 1}
    out = rec.finish()
    print(f"[scaling] {out.get('speedup')}", flush=True)
    return out


SCREEN_WARM = {}


def warm_screen(args, cfg, params, fb, tcfg) -> None:
    """The screen + exact top-k's first call (it compiles every program `run_screen` times: the
    screen's and the exact sweep's on the top cells), into SCREEN_WARM[cfg.attn_impl]; run beside
    figure a's compile when both are asked for in one process, so the compiles overlap."""
    from timerome_jax.method import screen as sc

    watch = C.CompileWatch.get()
    mark, t0 = watch.mark(), time.perf_counter()
    try:
        C.block(sc.screen_and_trace(params, cfg, _unpadded(fb), tcfg, top_frac=args.top_frac).tie_bar)
        n, secs = watch.since(mark, this_thread=True)
        SCREEN_WARM[cfg.attn_impl] = {"wall_s": time.perf_counter() - t0, "compile_s": secs, "n_compilations": n}
    except Exception as e:  # noqa: BLE001 - run_screen then compiles in its own first call and records it
        SCREEN_WARM[cfg.attn_impl] = {"error": f"{type(e).__name__}: {e}"[:2000]}


def run_screen(args, cfg, params, fb, tcfg, ceiling, deadline):
    """The first-order screen, and screen + exact TIE on the top --top-frac of each module's cells,
    against the full exact sweep (figure a's JAX time when its JSON is in --out, else timed here)."""
    from timerome_jax.method import screen as sc

    B, T = fb.x0.shape
    rec = C.Record(os.path.join(args.out, "tie_screen.json"), "screen",
                   "first-order TIE screen + exact top-k vs the full exact sweep", args)
    rec["shapes"] = {**C.shape_info(cfg), "facts": B, "seq_len": T, "steps": tcfg.steps, "chunk": args.chunk,
                     "top_frac": args.top_frac, "cells": 3 * cfg.n_layers * tcfg.steps}
    rec["ceiling"] = ceiling
    rec["targets"] = {"full_over_screen_plus_topk_min": 10.0}
    fb_u = _unpadded(fb)

    def part(cfg_used):
        warm = SCREEN_WARM.get(cfg_used.attn_impl)
        warmed = warm is not None and "error" not in warm
        if warm is not None:
            rec["first_call"] = {**warm, "beside": "figure a's compile (same process)"
                                 + (" and run_all's validate_8b (another process)" if args.hold_file else "")}
        # without a first call made beforehand, each measurement's first call compiles (a compile run)
        m = C.measure(lambda: sc.screen(params, cfg_used, fb_u, tcfg).estimate,
                      want=args.repeats + (0 if warmed else 1), deadline=deadline.at, allow_estimate=True)
        rec["screen"] = C.strip(m)
        rec.save()
        m = C.measure(lambda: sc.screen_and_trace(params, cfg_used, fb_u, tcfg, top_frac=args.top_frac),
                      want=args.repeats + (0 if warmed else 1), deadline=deadline.at, allow_estimate=True)
        st = m["out"]
        rec["screen_plus_topk"] = {**C.strip(m), "n_candidates": int(len(st.candidates)),
                                   "coordinate": sc.select_screened(st)[0]._asdict()}
        rec.save()
        full = sel = None
        a_json = os.path.join(args.out, "fig_a_tie.json")
        if os.path.exists(a_json):
            with open(a_json) as f:
                a = json.load(f)
            same = all(a.get("shapes", {}).get(k) == v for k, v in (("facts", B), ("seq_len", T), ("steps", tcfg.steps)))
            if same and a.get("knobs", {}).get("seed", args.seed) == args.seed:
                full, sel = (a.get("jax") or {}).get("steady_s"), a.get("jax_selection")
                rec["full_sweep_source"] = a_json
        if full is None:
            mf = C.measure(lambda: tr.trace(params, cfg_used, fb, tcfg), want=1, deadline=deadline.at,
                           allow_estimate=True)
            full = mf["steady_s"]
            tb = np.asarray(mf["out"].tie_bar)
            sel = {"resid": tr.select(tb)[0]._asdict(),
                   "all_modules": tr.select(tb, modules=("resid", "attn", "mlp"))[0]._asdict(),
                   "mean_abs_tie_bar": np.mean(np.abs(tb), 0).tolist()}
            rec["full_sweep_source"] = "timed here"
            rec["full_sweep"] = C.strip(mf)
        rec["full_sweep_s"] = full
        if sel is not None:  # does screen + exact top-k pick figure a's coordinate (Eq. 5, same facts)?
            mods = ("resid", "attn", "mlp")
            mine = {"resid": sc.select_screened(st)[0]._asdict(),
                    "all_modules": sc.select_screened(st, modules=mods)[0]._asdict()}
            ref = np.asarray(sel["mean_abs_tie_bar"])
            est = np.mean(np.abs(st.estimate), 0)
            rec["agreement_with_full_sweep"] = {
                "coordinate_full": {k: sel[k] for k in ("resid", "all_modules")}, "coordinate_screened": mine,
                "same_coordinate": {k: mine[k] == sel[k] for k in ("resid", "all_modules")},
                "spearman_screen_vs_exact_mean_abs": float(spearmanr(est.ravel(), ref.ravel())[0])}
        rec["full_over_screen_plus_topk"] = C.ratio(full, rec["screen_plus_topk"]["steady_s"])
        rec["met"] = {"at_least_10x": (rec["full_over_screen_plus_topk"] or 0) >= 10.0}

    with rec.section("jax"):
        C.with_attn_fallback(rec, cfg, part)
    out = rec.finish()
    print(f"[screen] screen {out.get('screen', {}).get('steady_s')}s, screen+top-k "
          f"{out.get('screen_plus_topk', {}).get('steady_s')}s, full {out.get('full_sweep_s')}s, "
          f"speed-up {out.get('full_over_screen_plus_topk')}", flush=True)
    return out


def main(argv=None):
    args = parse(argv)
    cfg, std, deadline, ceiling = C.start(args)
    if args.ready_file and "sweep" in args.what:  # nothing is timed until the compile phase is over (--hold-file)
        write_text(args.ready_file, "init and compile phase\n")
    t0 = time.perf_counter()
    params = C.init_params(jax.random.key(args.seed), cfg, std)
    if args.layout == "unstacked":  # one copy per layer; each stacked leaf is freed once sliced
        params = model_lib.unstack(params, consume=True)
    init_s = time.perf_counter() - t0
    fb = make_facts(cfg, args.facts, args.prompt_len, args.answer_len, args.subj_len, args.seed + 1)
    tcfg = tr.TraceConfig(steps=args.steps, noise_scale=args.noise_scale, n_noise=args.n_noise, tau=args.tau,
                          chunk=args.chunk, seed=args.seed)
    out = {}
    if "sweep" in args.what:
        out["sweep"] = run_sweep(args, cfg, params, fb, tcfg, ceiling, deadline, init_s)
    if "stages" in args.what:
        out["stages"] = run_stages(args, cfg, params, fb, tcfg, ceiling, deadline)
    if "scaling" in args.what:
        out["scaling"] = run_scaling(args, cfg, params, fb, tcfg, ceiling, deadline)
    if "screen" in args.what:
        out["screen"] = run_screen(args, cfg, params, fb, tcfg, ceiling, deadline)
    if args.profile and "stages" not in args.what and "sweep" in args.what:
        # a whole 8B sweep would make a trace of hundreds of MB: profile the lane loop on a subset
        rec = out["sweep"]
        fb_u, noise, corr, acts = lane_inputs(params, cfg.replace(attn_impl=rec.get("attn_impl_used", cfg.attn_impl)),
                                              fb, tcfg)
        lanes = jnp.asarray(tr.plan_lanes(cfg.n_layers, tcfg.steps)[: args.stage_lanes])
        prof = profile_lanes(args.profile, params, cfg.replace(attn_impl=rec.get("attn_impl_used", cfg.attn_impl)),
                             fb_u, noise, corr, acts, lanes, tcfg)
        rec["profile"] = prof
        C.write_json(os.path.join(args.out, "fig_a_tie.json"), rec)
    return out


if __name__ == "__main__":
    main()
