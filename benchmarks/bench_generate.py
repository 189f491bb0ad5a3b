"""Figures c and d: denoising generation with and without an |F| = 400, q = 4 edit memory.

    python benchmarks/bench_generate.py --out benchmarks/results
    python benchmarks/bench_generate.py --out /tmp/r --tiny          # CPU, seconds

c (fig_c_generate.json): prompt 64 random tokens + 64 generated tokens (canvas 128), 64 denoising
steps (one block, LLaDA low-confidence remasking, temperature 0), batch 1 and 32, LLaDA-8B shape,
random bf16 weights. Edit: `memory.build` from random keys/values, |F| = 400 facts, q = 4, at layer
19 resid, every step (k* = -1). JAX: `sampler.generate` (one jitted scan over the steps; compiled
ahead and timed apart) with `Intervene(edit=memory)`. PyTorch: a Python loop of forward +
`torch_ref.trace.commit` (the same low-confidence rule) with `hooks.EditHook(TorchEditMemory)`, same
weights (DLPack views), no attention mask (no padding: SDPA may pick its flash kernel).
Official (`official` rows, --official-dir PATH): the official LLaDA modeling code from PATH
(modeling_llada.py + configuration_llada.py, as a checkpoint's auto_map names them), same weights
(DLPack), its forward and the same sampler loop around it; absent files are recorded, not fatal.
JAX unstacked (`jax_unstacked` rows, --unstacked 1): the same with `model.unstack(params)` (one array
per layer, an unrolled layer loop that copies no layer out of a stack), tokens compared with the
stacked run.
Reported: steady time per generation (median of up to --repeats within the budget), per step, the
edit's overhead in % of the step time, new tokens/s and the JAX/torch throughput ratio.

d (fig_d_memory.json): what the edit adds to memory. JAX: the compiled programs' memory analysis
(argument / temp / output bytes) with and without the edit, against the edit's own arrays (U, Dm,
G, W, active). The forward reads W = G U, Dm and active (U and G stay in the memory for insert,
remove and save; jit passes the program only what it reads), so its arguments grow by those. PyTorch: peak allocated bytes during a generation with and without the hook.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from timerome_jax.backbone import model as model_lib  # noqa: E402
from timerome_jax.method import memory as mem_lib  # noqa: E402
from timerome_jax.diffusion import sampler  # noqa: E402
from timerome_jax.backbone.intervene import Intervene  # noqa: E402


def make_memory(cfg, n_facts: int, q: int, alpha: float, layer: int, module: str, seed: int) -> mem_lib.EditMemory:
    """An EditMemory of n_facts random keys/values (speed only; lam = 0.1 mean |u|^2)."""
    rng = np.random.default_rng(seed)
    D = cfg.d_model
    u = rng.standard_normal((n_facts, D)).astype(np.float32)
    v_o = 0.1 * rng.standard_normal((n_facts, D)).astype(np.float32)
    v_t = 0.1 * rng.standard_normal((n_facts, D)).astype(np.float32)
    lam = 0.1 * float(np.mean(np.sum(u.astype(np.float64) ** 2, -1)))
    return mem_lib.build(u, v_o, v_t, lam=lam, alpha=alpha, q=q, layer=layer, module=module, step=-1,
                         fingerprint="random-benchmark-memory")


def with_latch_gate(mem: mem_lib.EditMemory, seed: int, n_probe: int = 16, probe_len: int = 128,
                    max_slots: int = 16) -> mem_lib.EditMemory:
    """The same facts as a gated memory built as `pipeline.install` builds the default (speed only):
    random slot keys whitened with a rank-D whitening of random residuals (`fit_whitening`,
    `whiten_keys` inside `memory.build`), n_slots per fact, no per-token gate (tau = TAU_OFF,
    `Gate.token` False) and tau_seq from `memory.calibrate_tau_seq` on random probe residuals
    (n_probe rows of probe_len, the last max_slots masked). Whether rows latch does not change the
    work: the probe runs and the select is taken either way."""
    rng = np.random.default_rng(seed)
    D = mem.d_model
    n = mem_lib.n_facts(mem)
    whitening = mem_lib.fit_whitening(rng.standard_normal((2 * D, D)).astype(np.float32))
    keys = rng.standard_normal((n, D)).astype(np.float32)
    n_slots = rng.integers(2, max_slots + 1, n).astype(np.int32)
    U, Dm = np.asarray(mem.U)[:n], np.asarray(mem.Dm)[:n]
    gated = mem_lib.build(U, np.zeros_like(Dm), Dm, lam=float(mem.lam), alpha=float(mem.alpha), q=int(mem.q),
                          layer=mem.layer, module=mem.module, step=int(mem.step), capacity=mem.capacity,
                          fingerprint=mem.fingerprint, gate_keys=keys, whitening=whitening, gate_n_slots=n_slots)
    h = rng.standard_normal((n_probe, probe_len, D)).astype(np.float32)
    slots = np.zeros((n_probe, probe_len), bool)
    slots[:, -max_slots:] = True
    tau_seq = mem_lib.calibrate_tau_seq(gated, h, slots)
    return mem_lib.with_gate(gated, tau=mem_lib.TAU_OFF, tau_seq=tau_seq, token=False)


def edit_flops(cfg, mem, tokens: int) -> int:
    C_, D = mem.capacity, cfg.d_model
    return int(tokens * (2 * D * C_ + 2 * C_ * C_ + 2 * C_ * D))


def overhead(res: dict, ratios: list) -> dict:
    """The edit's overhead in % of the no-edit time: from the medians, and the median per-pair ratio."""
    return {"edit_overhead_pct": 100 * (res["edit"]["steady_s"] / res["no_edit"]["steady_s"] - 1),
            "edit_overhead_pct_paired_median": 100 * (float(np.median(ratios)) - 1) if ratios else None}


def torch_generate(model, x0, steps: int, mask_id: int, edit=None):
    """The low-confidence sampler (one block, temperature 0) as a torch loop; EditHook when edit."""
    import torch

    from timerome_jax.torch_ref.hooks import EditHook, TraceState, installed
    from timerome_jax.torch_ref.trace import commit, n_transfer

    gen = x0 == mask_id
    ks = n_transfer(gen.sum(1), steps)
    state = TraceState()
    hooks = [] if edit is None else [EditHook(edit, state)]
    x = x0
    with torch.no_grad(), installed(model, *hooks):
        for s in range(steps):
            state.step = s
            x = commit(model(x), x, gen, ks[:, s], mask_id)
    return x


def official_generate(model, x0, steps: int, mask_id: int):
    """The same sampler loop around the official LLaDA code (its forward returns `.logits`)."""
    import torch

    from timerome_jax.torch_ref.trace import commit, n_transfer

    gen = x0 == mask_id
    ks = n_transfer(gen.sum(1), steps)
    x = x0
    with torch.no_grad():
        for s in range(steps):
            x = commit(model(x).logits, x, gen, ks[:, s], mask_id)
    return x


def official_part(args, params, cfg, canv, per_b, toks, deadline, rc):
    """Forward and generation step of the official PyTorch LLaDA code, weights shared with JAX."""
    import torch

    try:
        omodel, how = C.official_model(args.official_dir, params, cfg)
    except C.OfficialCodeMissing as e:
        rc["official"] = {"status": "absent", "message": str(e)}
        print(f"[c] official code: {e}", flush=True)
        return
    rc["official"] = {"status": "ok", "dir": os.path.abspath(args.official_dir), "weights": how}
    dev = C.torch_device()
    for B in args.batches:
        x0 = torch.as_tensor(np.array(canv[B][0]), device=dev).long()
        with torch.no_grad():
            omodel(x0)  # warm-up
        C.torch_sync()
        with torch.no_grad():
            fwd = C.measure(lambda: omodel(x0).logits, want=args.repeats, deadline=deadline,
                            sync=lambda _: C.torch_sync())
        gen = C.measure(lambda: official_generate(omodel, x0, args.steps, cfg.mask_token_id), want=args.repeats,
                        deadline=deadline, sync=lambda _: C.torch_sync())
        toks[("official", "no_edit", B)] = gen["out"].cpu().numpy()
        per_b[str(B)]["official"] = {"forward": {**C.strip(fwd), "forward_ms": 1e3 * fwd["steady_s"]},
                                     "generate": {**C.strip(gen), "step_ms": 1e3 * gen["steady_s"] / args.steps,
                                                  "new_tokens_per_s": B * args.gen_len / gen["steady_s"]}}
        rc.save()
        del x0
    del omodel
    C.torch_release()


def parse(argv=None):
    ap = C.base_parser(__doc__)
    ap.add_argument("--batches", default=None, help="comma list (1,32; --tiny 1,4)")
    ap.add_argument("--prompt-len", type=int, default=None, help="64; --tiny 8")
    ap.add_argument("--gen-len", type=int, default=None, help="64; --tiny 8")
    ap.add_argument("--steps", type=int, default=None, help="64; --tiny 8")
    ap.add_argument("--edit-facts", type=int, default=None, help="|F| of the edit memory (400; --tiny 16)")
    ap.add_argument("--q", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--layer", type=int, default=None, help="19; --tiny 1")
    ap.add_argument("--module", default="resid")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--official-dir", default=None, metavar="PATH",
                    help="folder with the official LLaDA modeling_llada.py + configuration_llada.py: time its forward "
                         "and generation step beside the library, weights shared (default: not run)")
    ap.add_argument("--unstacked", type=int, default=1, choices=(0, 1),
                    help="also time the unstacked layer layout (model.unstack; 1 = yes, the default)")
    ap.add_argument("--gate", action="store_true", help="also time the gated memory (same facts, the latch default "
                    "as pipeline.install builds it, random whitened keys): its per-step overhead over the ungated "
                    "edit, the per-generation probe (model.prime_edit) and that probe amortised over the steps")
    args = ap.parse_args(argv)
    C.fill_sizes(args, (("batches", "1,32", "1,4"), ("prompt_len", 64, 8), ("gen_len", 64, 8),
                        ("steps", 64, 8), ("edit_facts", 400, 16), ("layer", 19, 1)))
    args.batches = [int(b) for b in str(args.batches).split(",") if b.strip()]
    return args


def main(argv=None):
    args = parse(argv)
    cfg, std, deadline, ceiling = C.start(args)
    rc = C.Record(os.path.join(args.out, "fig_c_generate.json"), "c", "generation with / without the edit", args)
    rd = C.Record(os.path.join(args.out, "fig_d_memory.json"), "d", "memory the edit adds", args)
    t0 = time.perf_counter()
    params = C.init_params(jax.random.key(args.seed), cfg, std)
    rc["init_s"] = time.perf_counter() - t0
    mem = make_memory(cfg, args.edit_facts, args.q, args.alpha, args.layer, args.module, args.seed + 3)
    edit_bytes = C.tree_bytes(mem)
    T = args.prompt_len + args.gen_len
    scfg = sampler.SamplerConfig(steps=args.steps, remasking="low_confidence", temperature=0.0)
    shapes = {**C.shape_info(cfg, params), "prompt_len": args.prompt_len, "gen_len": args.gen_len, "seq_len": T,
              "steps": args.steps, "block_length": None, "batches": args.batches,
              "edit": {"facts": args.edit_facts, "capacity": mem.capacity, "q": args.q, "alpha": args.alpha,
                       "layer": args.layer, "module": args.module, "step": -1, "bytes": edit_bytes,
                       "arrays": {k: list(getattr(mem, k).shape) for k in ("U", "Dm", "G", "W", "active")},
                       "bytes_read_by_forward": C.tree_bytes((mem.W, mem.Dm, mem.active))}}
    rc["shapes"], rd["shapes"] = shapes, shapes
    rc["ceiling"] = ceiling
    rng = np.random.default_rng(args.seed + 4)
    canv = {}
    per_b = {}
    for B in args.batches:
        prompts = C.random_tokens(rng, (B, args.prompt_len), cfg)
        x, pad, pm = sampler.make_canvas([list(p) for p in prompts], args.gen_len, cfg)
        canv[B] = (x, pad, pm, sampler.schedule(x, pad, cfg, scfg))
        fl = C.forward_flops(cfg, B * args.steps, T)
        fe = edit_flops(cfg, mem, B * T * args.steps)
        per_b[str(B)] = {"batch": B, "flops": fl, "edit_flops": fe,
                         "floor": C.floor(fl, args.steps * C.weight_bytes(cfg), ceiling),
                         "floor_with_edit": C.floor(fl + fe, args.steps * C.weight_bytes(cfg), ceiling)}
    rc["batches"] = per_b
    rd["batches"] = {str(B): {"edit_bytes": edit_bytes} for B in args.batches}
    rc.save()
    toks = {}

    # optional repeats: torch (first) gets half of the budget, JAX what is left but at least the other half
    t_deadline = deadline.half_of_rest()
    if not args.skip_torch:
        with rc.section("torch"):
            import torch

            from timerome_jax.torch_ref.hooks import TorchEditMemory

            tmodel, dev = C.shared_torch_model(params, cfg, rc)
            base = C.torch_allocated()
            tedit = TorchEditMemory.from_jax(mem, device=dev)
            t_edit_bytes = sum(t.numel() * t.element_size() for t in (tedit.U, tedit.D, tedit.G, tedit.active))
            rd["torch_edit_bytes"] = t_edit_bytes
            for B in args.batches:
                x0 = torch.as_tensor(np.array(canv[B][0]), device=dev).long()
                with torch.no_grad():
                    tmodel(x0)  # warm-up
                C.torch_sync()
                res, peaks = {}, {}
                for name, ed in (("no_edit", None), ("edit", tedit)):  # peak memory of one run each
                    C.torch_reset_peak()
                    before = C.torch_allocated()
                    torch_generate(tmodel, x0, args.steps, cfg.mask_token_id, ed)
                    C.torch_sync()
                    peak = C.torch_peak_bytes()
                    peaks[name] = (peak, None if peak is None else peak - before)
                # then timed alternately, so the overhead is not a drift between two blocks of runs
                mn, me, ratios = C.measure_pair(
                    lambda: torch_generate(tmodel, x0, args.steps, cfg.mask_token_id, None),
                    lambda: torch_generate(tmodel, x0, args.steps, cfg.mask_token_id, tedit),
                    want=args.repeats, deadline=t_deadline, sync=lambda _: C.torch_sync())
                for name, m in (("no_edit", mn), ("edit", me)):
                    toks[("torch", name, B)] = m["out"].cpu().numpy()
                    res[name] = {**C.strip(m), "step_ms": 1e3 * m["steady_s"] / args.steps,
                                 "new_tokens_per_s": B * args.gen_len / m["steady_s"], "peak_bytes": peaks[name][0],
                                 "peak_above_start_bytes": peaks[name][1]}
                res.update(overhead(res, ratios))
                per_b[str(B)]["torch"] = res
                rd["batches"][str(B)]["torch"] = {
                    "peak_above_start_no_edit": res["no_edit"]["peak_above_start_bytes"],
                    "peak_above_start_edit": res["edit"]["peak_above_start_bytes"],
                    "edit_arrays_bytes": t_edit_bytes, "allocated_before_bytes": base}
                rc.save()
                rd.save()
                del x0
            del tmodel, tedit
            C.torch_release()

    # the unstacked layer layout (model.unstack: one array per layer, an unrolled layer loop that
    # copies nothing out of a stack); a second copy of the weights, so it is made only when asked
    up = model_lib.unstack(params) if args.unstacked else None

    if args.official_dir is not None and not args.skip_torch:
        with rc.section("official"):
            official_part(args, params, cfg, canv, per_b, toks, t_deadline, rc)

    def compile_unstacked(cfg_used, key):
        """AOT-compile every unstacked program (each batch, with and without the edit) in parallel
        threads: XLA compiles without the GIL, and an unrolled 32-layer step takes about a minute."""
        jobs = {(B, name): iv for B in args.batches for name, iv in (("no_edit", None), ("edit", Intervene(edit=mem)))}

        def one(item):
            (B, name), iv = item
            x, pad, pm, sched = canv[B]
            t0 = time.perf_counter()
            c = sampler.generate_scan.lower(up, x, pad, pm, sched, key, iv, cfg=cfg_used, scfg=scfg,
                                            return_history=False).compile()
            return (B, name), (c, time.perf_counter() - t0)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            done = dict(pool.map(one, jobs.items()))
        return done, time.perf_counter() - t0

    def unstacked_rows(B, comps, x, pad, pm, sched, key, dl):
        res = {}
        for name, iv in (("no_edit", None), ("edit", Intervene(edit=mem))):
            res[name] = {"compile_wall_s_in_parallel": comps[(B, name)][1]}
            C.block(comps[(B, name)][0](up, x, pad, pm, sched, key, iv))  # first execution
        ive = Intervene(edit=mem)
        mn, me, ratios = C.measure_pair(lambda: comps[(B, "no_edit")][0](up, x, pad, pm, sched, key, None),
                                        lambda: comps[(B, "edit")][0](up, x, pad, pm, sched, key, ive),
                                        want=args.repeats, deadline=dl)
        for name, m in (("no_edit", mn), ("edit", me)):
            toks[("jax_unstacked", name, B)] = np.asarray(m["out"])
            res[name].update({**C.strip(m), "step_ms": 1e3 * m["steady_s"] / args.steps,
                              "new_tokens_per_s": B * args.gen_len / m["steady_s"],
                              "ratio_to_floor": C.ratio(m["steady_s"], per_b[str(B)]["floor" if name == "no_edit"
                                                                                     else "floor_with_edit"]["floor_s"])})
        res.update(overhead(res, ratios))
        return res

    def jax_part(cfg_used):
        j_deadline = deadline.at_least((deadline.budget_s or 0) / 2)
        key = jax.random.key(args.seed + 5)
        watch = C.CompileWatch.get()
        for B in args.batches:
            x, pad, pm, sched = canv[B]
            res, ma, comps, ivs, cinfo = {}, {}, {}, {}, {}
            for name, iv in (("no_edit", None), ("edit", Intervene(edit=mem))):
                mark, t0 = watch.mark(), time.perf_counter()
                comps[name] = sampler.generate_scan.lower(params, x, pad, pm, sched, key, iv, cfg=cfg_used,
                                                          scfg=scfg, return_history=False).compile()
                c_wall, (_, csec) = time.perf_counter() - t0, watch.since(mark)
                ma[name], ivs[name], cinfo[name] = C.memory_analysis(comps[name]), iv, (c_wall, csec)
                C.block(comps[name](params, x, pad, pm, sched, key, iv))  # warm-up (first execution)
            # timed alternately, so the overhead is not a drift between two blocks of runs
            mn, me, ratios = C.measure_pair(lambda: comps["no_edit"](params, x, pad, pm, sched, key, None),
                                            lambda: comps["edit"](params, x, pad, pm, sched, key, ivs["edit"]),
                                            want=args.repeats, deadline=j_deadline)
            for name, m in (("no_edit", mn), ("edit", me)):
                toks[("jax", name, B)] = np.asarray(m["out"])
                res[name] = {**C.strip(m), "compile_wall_s": cinfo[name][0], "compile_s": cinfo[name][1],
                             "step_ms": 1e3 * m["steady_s"] / args.steps,
                             "new_tokens_per_s": B * args.gen_len / m["steady_s"], "memory_analysis": ma[name],
                             "ratio_to_floor": C.ratio(m["steady_s"], per_b[str(B)]["floor" if name == "no_edit"
                                                                                   else "floor_with_edit"]["floor_s"])}
            if args.profile and B == max(args.batches):
                with C.maybe_profile(args.profile):
                    C.block(comps["edit"](params, x, pad, pm, sched, key, ivs["edit"]))
                rc["profile"] = {"dir": os.path.abspath(args.profile), "what": f"generate with the edit, batch {B}"}
            rc.save()
            res.update(overhead(res, ratios))
            if args.gate:
                gmem = with_latch_gate(mem, args.seed + 6, probe_len=x.shape[1], max_slots=args.gen_len)
                giv = Intervene(edit=gmem)
                comps["gated"] = sampler.generate_scan.lower(params, x, pad, pm, sched, key, giv, cfg=cfg_used,
                                                             scfg=scfg, return_history=False).compile()
                C.block(comps["gated"](params, x, pad, pm, sched, key, giv))
                me2, mg, g_ratios = C.measure_pair(lambda: comps["edit"](params, x, pad, pm, sched, key, ivs["edit"]),
                                                   lambda: comps["gated"](params, x, pad, pm, sched, key, giv),
                                                   want=args.repeats, deadline=j_deadline)
                no_step_s = res["no_edit"]["steady_s"] / args.steps
                # (a) one denoising step: the plain edit vs the gated memory with its latch primed
                # (the per-step work of the latch default: the select on the latch)
                prime = jax.jit(lambda p, t, e: model_lib.prime_edit(p, t, cfg_used, pad, sched.gen_mask, e))
                piv = C.block(prime(params, x, giv))
                step_fn = jax.jit(lambda p, t, e: sampler.denoise_step(p, cfg_used, scfg, t, pad, pm, sched,
                                                                       jnp.int32(0), key, e)[0])
                C.block(step_fn(params, x, ivs["edit"]))
                C.block(step_fn(params, x, piv))
                se, sg, s_ratios = C.measure_pair(lambda: step_fn(params, x, ivs["edit"]), lambda: step_fn(params, x, piv),
                                                  want=max(args.repeats, 5), deadline=j_deadline)
                # (b) the probe (`model.prime_edit`: layers 0..l on the canvas + the sequence score), once
                # per generation, and amortised over its steps
                pr = C.measure(lambda: prime(params, x, giv), want=max(args.repeats, 5), deadline=j_deadline)
                res["gated"] = {**C.strip(mg), "step_ms": 1e3 * mg["steady_s"] / args.steps,
                                "memory_analysis": C.memory_analysis(comps["gated"]),
                                "memory": {"kind": "latch default (pipeline.install): sequence latch, no per-token gate",
                                           "token_gate": bool(gmem.gate.token), "tau_seq": float(gmem.gate.tau_seq),
                                           "whitening_rank": int(gmem.gate.P.shape[0])},
                                "one_step": {"edit": C.strip(se), "gated_primed": C.strip(sg)},
                                "probe": {**C.strip(pr), "probe_ms": 1e3 * pr["steady_s"]}}
                # whole generations (probe included)
                res["gate_overhead_pct_over_edit"] = 100 * (mg["steady_s"] / me2["steady_s"] - 1)
                res["gate_overhead_pct_over_edit_paired_median"] = 100 * (float(np.median(g_ratios)) - 1) if g_ratios else None
                res["gate_overhead_pct_of_step"] = 100 * (mg["steady_s"] - me2["steady_s"]) / res["no_edit"]["steady_s"]
                # (a) per step, probe excluded
                res["gate_step_overhead_pct_over_edit"] = 100 * (sg["steady_s"] / se["steady_s"] - 1)
                res["gate_step_overhead_pct_over_edit_paired_median"] = (
                    100 * (float(np.median(s_ratios)) - 1) if s_ratios else None)
                res["gate_step_overhead_pct_of_step"] = 100 * (sg["steady_s"] - se["steady_s"]) / no_step_s
                # (b) the probe, in % of one no-edit step and amortised over the generation's steps
                res["probe_pct_of_step"] = 100 * pr["steady_s"] / no_step_s
                res["probe_amortised_pct_of_step"] = res["probe_pct_of_step"] / args.steps
            res["peak_bytes_so_far"] = C.jax_peak_bytes()
            per_b[str(B)]["jax"] = res

            d = rd["batches"][str(B)]
            d["jax"] = {"no_edit": ma["no_edit"], "edit": ma["edit"]}
            if ma["no_edit"] and ma["edit"]:
                add = {k: ma["edit"][k] - ma["no_edit"][k] for k in ma["edit"] if k in ma["no_edit"]}
                d["jax"]["added"] = add
                d["jax"]["added_argument_minus_edit_bytes"] = add.get("argument_size_in_bytes", 0) - edit_bytes
                d["jax"]["added_temp_over_edit_bytes"] = add.get("temp_size_in_bytes", 0) / edit_bytes
                # "adds no more than its own arrays": the arguments grow by the edit arrays the
                # forward reads (no more than the edit's own) and the working memory by at most as much
                read = C.tree_bytes((mem.W, mem.Dm, mem.active))
                d["met"] = {"arguments_grow_by_edit_arrays_only":
                            read - 64 <= add.get("argument_size_in_bytes", 0) <= edit_bytes + 64,
                            "temp_growth_at_most_edit_bytes": add.get("temp_size_in_bytes", 0) <= edit_bytes}
            rd.save()

        if up is not None:
            comps, wall = compile_unstacked(cfg_used, key)
            rc["unstacked_compile_wall_s"] = wall
            for B in args.batches:
                x, pad, pm, sched = canv[B]
                per_b[str(B)]["jax_unstacked"] = unstacked_rows(B, comps, x, pad, pm, sched, key, j_deadline)
                rc.save()

    with rc.section("jax"):
        C.with_attn_fallback(rc, cfg, jax_part)
    rd["attn_impl_used"] = rc.data.get("attn_impl_used")

    met = {}
    for B in args.batches:
        r = per_b[str(B)]
        agree = {}
        for name in ("no_edit", "edit"):
            if ("jax", name, B) in toks and ("torch", name, B) in toks:
                a, b = toks[("jax", name, B)], toks[("torch", name, B)]
                agree[name] = {"tokens_equal_fraction": float(np.mean(a == b)),
                               "rows_identical": int(np.sum(np.all(a == b, 1))), "rows": int(a.shape[0])}
            if ("jax", name, B) in toks:
                g = toks[("jax", name, B)][:, -args.gen_len:]
                agree.setdefault("jax_masks_left", {})[name] = int(np.sum(g == cfg.mask_token_id))
            if ("jax", name, B) in toks and ("official", name, B) in toks:
                agree.setdefault("official_tokens_equal_fraction", {})[name] = float(
                    np.mean(toks[("jax", name, B)] == toks[("official", name, B)]))
            if ("jax", name, B) in toks and ("jax_unstacked", name, B) in toks:
                agree.setdefault("unstacked_tokens_equal_fraction", {})[name] = float(
                    np.mean(toks[("jax", name, B)] == toks[("jax_unstacked", name, B)]))
        if ("jax", "edit", B) in toks and ("jax", "no_edit", B) in toks:
            agree["jax_edit_changed_tokens_fraction"] = float(np.mean(
                toks[("jax", "edit", B)][:, -args.gen_len:] != toks[("jax", "no_edit", B)][:, -args.gen_len:]))
        r["agreement"] = agree
        if "jax" in r and "torch" in r:
            r["jax_over_torch_throughput"] = {n: r["torch"][n]["steady_s"] / r["jax"][n]["steady_s"]
                                              for n in ("no_edit", "edit")}
        if "jax" in r:
            thr = r.get("jax_over_torch_throughput")
            met[str(B)] = {"edit_overhead_at_most_1pct": r["jax"]["edit_overhead_pct"] <= 1.0,
                           "faster_than_torch": None if thr is None else min(thr.values()) > 1.0}
            if "jax_unstacked" in r:
                u = r["jax_unstacked"]
                met[str(B)]["unstacked_step_within_1p5x_floor"] = (u["no_edit"]["ratio_to_floor"] or 1e9) <= 1.5
                met[str(B)]["unstacked_edit_overhead_at_most_1pct"] = u["edit_overhead_pct"] <= 1.0
            if "gate_step_overhead_pct_of_step" in r["jax"]:
                j = r["jax"]
                met[str(B)]["gate_overhead_at_most_1pct"] = j["gate_step_overhead_pct_of_step"] <= 1.0
                met[str(B)]["gate_with_amortised_probe_at_most_1pct"] = (
                    j["gate_step_overhead_pct_of_step"] + j["probe_amortised_pct_of_step"] <= 1.0)
    rc["met"] = met
    rc["targets"] = {"edit_overhead_pct_max": 1.0, "jax_over_torch_throughput_min": 1.0}
    out_c = rc.finish()
    rd.data["errors"] = dict(rc.data["errors"])
    out_d = rd.finish()
    for B in args.batches:
        r = out_c["batches"][str(B)]
        j, t = r.get("jax", {}), r.get("torch", {})
        print(f"[c] batch {B}: jax step {j.get('no_edit', {}).get('step_ms')} ms (+edit {j.get('edit_overhead_pct')}%)"
              f"  torch step {t.get('no_edit', {}).get('step_ms')} ms  jax/torch throughput "
              f"{r.get('jax_over_torch_throughput')}", flush=True)
        u = r.get("jax_unstacked")
        if u:
            print(f"[c] batch {B}: jax unstacked step {u['no_edit']['step_ms']} ms "
                  f"({u['no_edit']['ratio_to_floor']}x floor, +edit {u['edit_overhead_pct']}%)", flush=True)
        print(f"[d] batch {B}: {out_d['batches'][str(B)].get('jax', {}).get('added')} edit bytes {edit_bytes}", flush=True)
    return out_c, out_d


if __name__ == "__main__":
    main()
