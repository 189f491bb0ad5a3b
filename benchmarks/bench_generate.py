"""Figures c and d: denoising generation with and without an |F| = 400, q = 4 edit memory.

    python benchmarks/bench_generate.py --out benchmarks/results
    python benchmarks/bench_generate.py --out /tmp/r --tiny          # CPU, seconds

c (fig_c_generate.json): prompt 64 random tokens + 64 generated tokens (canvas 128), 64 denoising
steps (one block, LLaDA low-confidence remasking, temperature 0), batch 1 and 32, LLaDA-8B shape,
random bf16 weights. Edit: `memory.build` from random keys/values, |F| = 400 facts, q = 4, at layer
19 resid, every step (k* = -1).
JAX (`jax` rows, the ones the verdicts use): the unstacked layer layout (`model.unstack`: one array
per layer, an unrolled layer loop; what `load_model(layout="auto")` gives on a GPU),
`sampler.generate` (one jitted scan over the steps, its GEMMs on cuBLAS, attention unmasked: the
canvases have no padding) with `Intervene(edit=memory)`; every program is compiled ahead
(--compile-order: in parallel threads, XLA compiles without the GIL, or one after another); at
batch 1 each runs once untimed before the timing (at larger batch sizes the first round is timed,
--first-run-untimed). No edit, edit and (--gate) the gated edit are timed in interleaved rounds
(each program once per round, in an order drawn from --seed, after --idle-gap-s of idle):
--repeats-b1 rounds at batch 1 (a generation there is well under a second and the 1 % bar is small
against the run-to-run noise), --repeats rounds at the other batch sizes. The
edit's overhead is reported from the medians and as the median of the per-round ratios.
JAX stacked (`jax_stacked` rows, --stacked 1; off by default): no edit and edit in the stacked
layout (one [L, ...] array per weight, a layer `lax.scan`), --repeats interleaved pairs, tokens
compared with the unstacked run.
PyTorch: a Python loop of forward + `torch_ref.trace.commit` (the same low-confidence rule) with
`hooks.EditHook(TorchEditMemory)`, same weights (DLPack views), no attention mask (no padding: SDPA
may pick its flash kernel); no edit and edit in --torch-repeats (default --repeats) interleaved
pairs (each run also records its peak memory, figure d).
Official (`official` rows, --official-dir PATH): the official LLaDA modeling code from PATH
(modeling_llada.py + configuration_llada.py, as a checkpoint's auto_map names them), same weights
(DLPack), its forward (--repeats runs) and the same sampler loop around it (--official-repeats
generations); absent files are recorded, not fatal.
Reported: steady time per generation (median), per step, the edit's overhead in % of the step time,
new tokens/s and the JAX/torch throughput ratio.

d (fig_d_memory.json): what the edit adds to memory. JAX: the compiled (unstacked) programs' memory
analysis (argument / temp / output bytes) with and without the edit, against the edit's own arrays
(U, Dm, G, W, active). The forward reads W = G U, Dm and active (U and G stay in the memory for
insert, remove and save; jit passes the program only what it reads), so its arguments grow by
those. PyTorch: peak allocated bytes during a generation with and without the hook.
"""
from __future__ import annotations

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


def overhead(res: dict, base: str, other: str, ratios: list, prefix: str = "edit_overhead_pct") -> dict:
    """`other`'s time over `base`'s in %, from the medians (prefix) and the median per-round ratio."""
    o = C.overhead_pct(res[base], res[other], ratios)
    return {prefix: o["of_medians"], prefix + "_paired_median": o["paired_median"], prefix + "_n_pairs": o["n_pairs"]}


def kernel_profile(fns: dict, trace_dir: str, steps: int) -> dict:
    """Trace one call of each zero-argument generation in fns (name -> fn) under trace_dir/name and
    return per name its device kernels per step (count, summed time, the top 20) and, when there
    is a "no_edit" entry, the kernels whose summed time each other variant changes most."""
    summaries, out = {}, {}
    for name, fn in fns.items():
        summaries[name] = C.traced_kernels(fn, os.path.join(trace_dir, name), top=400)
        out[name] = C.kernels_per_step(summaries[name], steps, top=20)
        print(f"[c] kernels of {name}: {out[name]['kernels_per_step']:.0f} per step, "
              f"{out[name]['kernel_us_per_step']:.1f} us per step", flush=True)
    if "no_edit" in summaries:
        for name in summaries:
            if name != "no_edit":
                out[f"diff_{name}_vs_no_edit"] = [
                    {**d, "us_per_step_change": round((d["us_other"] - d["us_base"]) / steps, 2)}
                    for d in C.kernel_diff(summaries["no_edit"], summaries[name], top=15)]
    return out


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
            fwd = C.measure(lambda m=omodel, x=x0: m(x).logits, want=args.repeats, deadline=deadline,
                            sync=lambda _: C.torch_sync())
        gen = C.measure(lambda m=omodel, x=x0: official_generate(m, x, args.steps, cfg.mask_token_id),
                        want=args.official_repeats, deadline=deadline, sync=lambda _: C.torch_sync())
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
    ap.add_argument("--compile-order", choices=("parallel", "no-edit-first", "sequential"), default="parallel",
                    help="how the JAX programs compile: parallel (default: all at once in threads; XLA autotunes "
                         "each GEMM shape once per process, timing the candidates on a GPU the other compiles keep "
                         "busy), no-edit-first (each batch size's no-edit program alone, then the rest in parallel) "
                         "or sequential (one after another, each autotuned on an idle GPU)")
    ap.add_argument("--kernel-profile", default=None, metavar="DIR",
                    help="after the batch-1 rounds, trace one generation of each variant there and record its "
                         "device kernels per step and the kernels the edit changes most (default: not run)")
    ap.add_argument("--prompt-len", type=int, default=None, help="64; --tiny 8")
    ap.add_argument("--gen-len", type=int, default=None, help="64; --tiny 8")
    ap.add_argument("--steps", type=int, default=None, help="64; --tiny 8")
    ap.add_argument("--edit-facts", type=int, default=None, help="|F| of the edit memory (400; --tiny 16)")
    ap.add_argument("--q", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--layer", type=int, default=None, help="19; --tiny 1")
    ap.add_argument("--module", default="resid")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed rounds (interleaved no edit / edit [/ gated]) at batch sizes above 1, torch pairs "
                         "at every batch size, official forwards")
    ap.add_argument("--torch-repeats", type=int, default=None,
                    help="interleaved torch no edit / edit pairs per batch size (default: --repeats)")
    ap.add_argument("--repeats-b1", type=int, default=11,
                    help="timed interleaved JAX rounds at batch 1 (default 11: the edit-overhead bar is 1 %%)")
    ap.add_argument("--first-run-untimed", choices=("b1", "all"), default="b1",
                    help="which JAX programs run once untimed before their rounds: b1 (default: batch 1 only; above, "
                         "a generation takes seconds and its first execution's one-time costs are a small part of the "
                         "first round, which is timed and kept in times_s, and the medians are over all rounds) or all")
    ap.add_argument("--idle-gap-s", type=float, default=0.05,
                    help="untimed idle seconds before each timed JAX generation, and each round's order drawn from "
                         "--seed (default 0.05: back-to-back batch-1 generations slow down every third call or so "
                         "on an H200, which a fixed round order pins on one program; docs/performance.md)")
    ap.add_argument("--official-repeats", type=int, default=1,
                    help="timed generations of the official code per batch size (default 1; not a verdict)")
    ap.add_argument("--official-dir", default=None, metavar="PATH",
                    help="folder with the official LLaDA modeling_llada.py + configuration_llada.py: time its forward "
                         "and generation step beside the library, weights shared (default: not run)")
    ap.add_argument("--stacked", type=int, default=0, choices=(0, 1),
                    help="also time the stacked layer layout (1 = yes; default 0: the verdict rows are unstacked)")
    ap.add_argument("--gate", action="store_true", help="also time the gated memory (same facts, the latch default "
                    "as pipeline.install builds it, random whitened keys): its per-step overhead over the ungated "
                    "edit, the per-generation probe (model.prime_edit) and that probe amortised over the steps")
    args = ap.parse_args(argv)
    C.fill_sizes(args, (("batches", "1,32", "1,4"), ("prompt_len", 64, 8), ("gen_len", 64, 8),
                        ("steps", 64, 8), ("edit_facts", 400, 16), ("layer", 19, 1)))
    args.batches = [int(b) for b in str(args.batches).split(",") if b.strip()]
    if args.torch_repeats is None:
        args.torch_repeats = args.repeats
    return args


def compile_all(programs: dict, first=()) -> tuple[dict, float]:
    """name -> zero-argument function returning a compiled program: compile the names in `first` one
    after another, then the rest in parallel threads (XLA compiles without the GIL). Returns ({name:
    (compiled, wall s, compile s of its thread)}, wall s of the whole)."""
    watch = C.CompileWatch.get()

    def one(item):
        name, make = item
        mark, t0 = watch.mark(), time.perf_counter()
        c = make()
        return name, (c, time.perf_counter() - t0, watch.since(mark, this_thread=True)[1])

    t0 = time.perf_counter()
    done = dict(one((k, programs[k])) for k in first)
    rest = {k: v for k, v in programs.items() if k not in done}
    with ThreadPoolExecutor(max_workers=max(1, len(rest))) as pool:
        done.update(pool.map(one, rest.items()))
    return done, time.perf_counter() - t0


def main(argv=None):
    args = parse(argv)
    cfg, std, deadline, ceiling = C.start(args)
    rc = C.Record(os.path.join(args.out, "fig_c_generate.json"), "c", "generation with / without the edit", args)
    rd = C.Record(os.path.join(args.out, "fig_d_memory.json"), "d", "memory the edit adds", args)
    t0 = time.perf_counter()
    params = C.init_params(jax.random.key(args.seed), cfg, std)
    # the verdict layout: one array per layer; the stacked tree is kept only when its rows are asked for
    up = model_lib.unstack(params, consume=not args.stacked)
    if not args.stacked:
        params = None
    rc["init_s"] = time.perf_counter() - t0
    rc["jax_layout"] = "unstacked"
    mem = make_memory(cfg, args.edit_facts, args.q, args.alpha, args.layer, args.module, args.seed + 3)
    edit_bytes = C.tree_bytes(mem)
    T = args.prompt_len + args.gen_len
    scfg = sampler.SamplerConfig(steps=args.steps, remasking="low_confidence", temperature=0.0)
    shapes = {**C.shape_info(cfg, up), "prompt_len": args.prompt_len, "gen_len": args.gen_len, "seq_len": T,
              "steps": args.steps, "block_length": None, "batches": args.batches, "layout": "unstacked",
              "rounds": {"batch_1": args.repeats_b1, "other_batches": args.repeats},
              "first_run_untimed": args.first_run_untimed,
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
        # as `sampler.generate` does: the schedule sees the pad mask, attention only where it masks something
        canv[B] = (x, model_lib.attention_mask(pad), pm, sampler.schedule(x, pad, cfg, scfg))
        fl = C.forward_flops(cfg, B * args.steps, T)
        fe = edit_flops(cfg, mem, B * T * args.steps)
        per_b[str(B)] = {"batch": B, "flops": fl, "edit_flops": fe,
                         "floor": C.floor(fl, args.steps * C.weight_bytes(cfg), ceiling),
                         "floor_with_edit": C.floor(fl + fe, args.steps * C.weight_bytes(cfg), ceiling)}
    rc["batches"] = per_b
    rd["batches"] = {str(B): {"edit_bytes": edit_bytes} for B in args.batches}
    rc.save()
    toks = {}

    def rounds_for(B):
        return args.repeats_b1 if B == 1 else args.repeats

    # optional repeats: torch (first) gets half of the budget, JAX what is left but at least the other half
    t_deadline = deadline.half_of_rest()
    if not args.skip_torch:
        with rc.section("torch"):
            import torch

            from timerome_jax.torch_ref.hooks import TorchEditMemory

            tmodel, dev = C.shared_torch_model(up, cfg, rc)
            base = C.torch_allocated()
            tedit = TorchEditMemory.from_jax(mem, device=dev)
            t_edit_bytes = sum(t.numel() * t.element_size() for t in (tedit.U, tedit.D, tedit.G, tedit.active))
            rd["torch_edit_bytes"] = t_edit_bytes
            for B in args.batches:
                x0 = torch.as_tensor(np.array(canv[B][0]), device=dev).long()
                # warm-up: two sampler steps with and without the edit hook, so the first timed
                # generation does not pay the first use of the hook and the commit's kernels
                torch_generate(tmodel, x0, 2, cfg.mask_token_id, None)
                torch_generate(tmodel, x0, 2, cfg.mask_token_id, tedit)
                C.torch_sync()
                peaks = {"no_edit": [], "edit": []}

                def run(name, ed):
                    """One generation; its peak memory above the start is recorded (figure d)."""
                    C.torch_reset_peak()
                    before = C.torch_allocated()
                    out = torch_generate(tmodel, x0, args.steps, cfg.mask_token_id, ed)
                    C.torch_sync()
                    peak = C.torch_peak_bytes()
                    peaks[name].append((peak, None if peak is None or before is None else peak - before))
                    return out

                # timed alternately, so the overhead is not a drift between two blocks of runs
                ms, rounds = C.measure_rounds({"no_edit": lambda: run("no_edit", None),
                                               "edit": lambda: run("edit", tedit)},
                                              want=args.torch_repeats, deadline=t_deadline,
                                              sync=lambda _: C.torch_sync())
                res = {}
                for name in ("no_edit", "edit"):
                    m = ms[name]
                    pk = [p for p in peaks[name] if p[0] is not None]
                    toks[("torch", name, B)] = m["out"].cpu().numpy()
                    res[name] = {**C.strip(m), "step_ms": 1e3 * m["steady_s"] / args.steps,
                                 "new_tokens_per_s": B * args.gen_len / m["steady_s"],
                                 "peak_bytes": max((p[0] for p in pk), default=None),
                                 "peak_above_start_bytes": max((p[1] for p in pk if p[1] is not None), default=None)}
                res.update(overhead(res, "no_edit", "edit", C.round_ratios(rounds, "edit", "no_edit")))
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

    if args.official_dir is not None and not args.skip_torch:
        with rc.section("official"):
            official_part(args, up, cfg, canv, per_b, toks, t_deadline, rc)

    def jax_part(cfg_used):
        j_deadline = deadline.at_least((deadline.budget_s or 0) / 2)
        key = jax.random.key(args.seed + 5)
        ive = Intervene(edit=mem)
        gmem = giv = None
        if args.gate:
            gmem = with_latch_gate(mem, args.seed + 6, probe_len=T, max_slots=args.gen_len)
            giv = Intervene(edit=gmem)
        variants = {"no_edit": None, "edit": ive}
        if giv is not None:
            variants["gated"] = giv
        # the gated rows' probe and single step, compiled as the library compiles them inside generation
        opts = sampler.GENERATION_COMPILER_OPTIONS
        prime = jax.jit(lambda p, t, pad, gm, e: model_lib.prime_edit(p, t, cfg_used, pad, gm, e), compiler_options=opts)
        step_fn = jax.jit(lambda p, t, pad, pm, sched, e: sampler.denoise_step(p, cfg_used, scfg, t, pad, pm, sched,
                                                                               jnp.int32(0), key, e)[0],
                          compiler_options=opts)

        def gen_program(p, B, iv):
            x, pad, pm, sched = canv[B]
            return lambda: sampler.generate_scan.lower(p, x, pad, pm, sched, key, iv, cfg=cfg_used, scfg=scfg,
                                                       return_history=False).compile()

        # every program of every batch size, compiled ahead in parallel threads
        programs = {(B, name): gen_program(up, B, iv) for B in args.batches for name, iv in variants.items()}
        if giv is not None:
            for B in args.batches:
                x, pad, pm, sched = canv[B]
                programs[(B, "prime")] = (lambda x=x, pad=pad, sched=sched: prime.lower(
                    up, x, pad, sched.gen_mask, giv).compile())
                programs[(B, "step_edit")] = (lambda x=x, pad=pad, pm=pm, sched=sched: step_fn.lower(
                    up, x, pad, pm, sched, ive).compile())
                primed = jax.eval_shape(prime, up, x, pad, sched.gen_mask, giv)
                programs[(B, "step_gated")] = (lambda x=x, pad=pad, pm=pm, sched=sched, primed=primed: step_fn.lower(
                    up, x, pad, pm, sched, primed).compile())
        if args.stacked:
            programs.update({(B, "stacked_" + name): gen_program(params, B, iv) for B in args.batches
                             for name, iv in (("no_edit", None), ("edit", ive))})
        first = {"parallel": [], "no-edit-first": [(B, "no_edit") for B in args.batches],
                 "sequential": list(programs)}[args.compile_order]
        comps, wall = compile_all(programs, first=first)
        rc["compile"] = {"order": args.compile_order, "wall_s_all_programs": wall}
        rc["programs_compiled"] = len(programs)

        for B in args.batches:
            x, pad, pm, sched = canv[B]
            res, first = {}, {}
            untimed_first = B == 1 or args.first_run_untimed == "all"
            for name, iv in variants.items():  # the first execution, untimed (see --first-run-untimed)
                if untimed_first:
                    t0 = time.perf_counter()
                    C.block(comps[(B, name)][0](up, x, pad, pm, sched, key, iv))
                    first[name] = time.perf_counter() - t0
            fns = {name: (lambda c=comps[(B, name)][0], iv=iv: c(up, x, pad, pm, sched, key, iv))
                   for name, iv in variants.items()}
            # the verdict rows: past the soft budget still at least 9 rounds at batch 1, 3 above
            ms, rounds = C.measure_rounds(fns, want=rounds_for(B), deadline=j_deadline, at_least=9 if B == 1 else 3,
                                          gap_s=args.idle_gap_s, shuffle_seed=args.seed + B)
            ma = {name: C.memory_analysis(comps[(B, name)][0]) for name in variants}
            for name in variants:
                m = ms[name]
                toks[("jax", name, B)] = np.asarray(m["out"])
                res[name] = {**C.strip(m), "compile_wall_s": comps[(B, name)][1],
                             "compile_s": comps[(B, name)][2], "first_run_untimed_s": first.get(name),
                             "first_round_timed": not untimed_first,
                             "step_ms": 1e3 * m["steady_s"] / args.steps,
                             "new_tokens_per_s": B * args.gen_len / m["steady_s"], "memory_analysis": ma[name],
                             "ratio_to_floor": C.ratio(m["steady_s"], per_b[str(B)]["floor" if name == "no_edit"
                                                                                   else "floor_with_edit"]["floor_s"])}
            res.update(overhead(res, "no_edit", "edit", C.round_ratios(rounds, "edit", "no_edit")))
            if args.kernel_profile and B == 1:
                res["kernel_profile"] = kernel_profile(fns, args.kernel_profile, args.steps)
            if args.profile and B == max(args.batches):
                with C.maybe_profile(args.profile):
                    C.block(fns["edit"]())
                rc["profile"] = {"dir": os.path.abspath(args.profile), "what": f"generate with the edit, batch {B}"}
            if giv is not None:
                g = overhead(res, "edit", "gated", C.round_ratios(rounds, "gated", "edit"),
                             prefix="gate_overhead_pct_over_edit")
                no_step_s = res["no_edit"]["steady_s"] / args.steps
                # (a) one denoising step: the plain edit vs the gated memory with its latch primed
                # (the per-step work of the latch default: the select on the latch)
                piv = C.block(comps[(B, "prime")][0](up, x, pad, sched.gen_mask, giv))
                s_edit, s_gated = comps[(B, "step_edit")][0], comps[(B, "step_gated")][0]
                C.block(s_edit(up, x, pad, pm, sched, ive))
                C.block(s_gated(up, x, pad, pm, sched, piv))
                se, sg, s_ratios = C.measure_pair(lambda: s_edit(up, x, pad, pm, sched, ive),
                                                  lambda: s_gated(up, x, pad, pm, sched, piv),
                                                  want=max(args.repeats, 5), deadline=j_deadline,
                                                  gap_s=args.idle_gap_s, shuffle_seed=args.seed + B)
                # (b) the probe (`model.prime_edit`: layers 0..l on the canvas + the sequence score), once
                # per generation, and amortised over its steps
                pr = C.measure(lambda: comps[(B, "prime")][0](up, x, pad, sched.gen_mask, giv),
                               want=max(args.repeats, 5), deadline=j_deadline)
                res["gated"].update({"memory": {"kind": "latch default (pipeline.install): sequence latch, "
                                                "no per-token gate", "token_gate": bool(gmem.gate.token),
                                                "tau_seq": float(gmem.gate.tau_seq),
                                                "whitening_rank": int(gmem.gate.P.shape[0])},
                                     "one_step": {"edit": C.strip(se), "gated_primed": C.strip(sg)},
                                     "probe": {**C.strip(pr), "probe_ms": 1e3 * pr["steady_s"]}})
                # whole generations (probe included), from the same interleaved rounds
                res.update(g)
                res["gate_overhead_pct_of_step"] = 100 * (res["gated"]["steady_s"] - res["edit"]["steady_s"]) / \
                    res["no_edit"]["steady_s"]
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
            rc.save()

            d = rd["batches"][str(B)]
            d["jax"] = {"layout": "unstacked", "no_edit": ma["no_edit"], "edit": ma["edit"]}
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

        if args.stacked:  # the stacked layer layout beside it (not a verdict)
            for B in args.batches:
                x, pad, pm, sched = canv[B]
                fns = {name: (lambda c=comps[(B, "stacked_" + name)][0], iv=iv: c(params, x, pad, pm, sched, key, iv))
                       for name, iv in (("no_edit", None), ("edit", ive))}
                for f in fns.values():
                    C.block(f())  # first execution
                ms, rounds = C.measure_rounds(fns, want=args.repeats, deadline=j_deadline, gap_s=args.idle_gap_s,
                                              shuffle_seed=args.seed + B)
                res = {}
                for name, m in ms.items():
                    toks[("jax_stacked", name, B)] = np.asarray(m["out"])
                    res[name] = {**C.strip(m), "compile_wall_s": comps[(B, "stacked_" + name)][1],
                                 "step_ms": 1e3 * m["steady_s"] / args.steps,
                                 "new_tokens_per_s": B * args.gen_len / m["steady_s"],
                                 "ratio_to_floor": C.ratio(m["steady_s"], per_b[str(B)]["floor" if name == "no_edit"
                                                                                       else "floor_with_edit"]["floor_s"])}
                res.update(overhead(res, "no_edit", "edit", C.round_ratios(rounds, "edit", "no_edit")))
                per_b[str(B)]["jax_stacked"] = res
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
            if ("jax", name, B) in toks and ("jax_stacked", name, B) in toks:
                agree.setdefault("stacked_tokens_equal_fraction", {})[name] = float(
                    np.mean(toks[("jax", name, B)] == toks[("jax_stacked", name, B)]))
        if ("jax", "edit", B) in toks and ("jax", "no_edit", B) in toks:
            agree["jax_edit_changed_tokens_fraction"] = float(np.mean(
                toks[("jax", "edit", B)][:, -args.gen_len:] != toks[("jax", "no_edit", B)][:, -args.gen_len:]))
        r["agreement"] = agree
        if "jax" in r and "torch" in r:
            r["jax_over_torch_throughput"] = {n: r["torch"][n]["steady_s"] / r["jax"][n]["steady_s"]
                                              for n in ("no_edit", "edit")}
        if "jax" in r:
            j, thr = r["jax"], r.get("jax_over_torch_throughput")
            paired = j.get("edit_overhead_pct_paired_median")
            met[str(B)] = {"edit_overhead_at_most_1pct": j["edit_overhead_pct"] <= 1.0,
                           "edit_overhead_paired_median_at_most_1pct": None if paired is None else paired <= 1.0,
                           "faster_than_torch": None if thr is None else min(thr.values()) > 1.0,
                           "step_within_1p5x_floor": (j["no_edit"]["ratio_to_floor"] or 1e9) <= 1.5}
            if "gate_step_overhead_pct_of_step" in j:
                met[str(B)]["gate_overhead_at_most_1pct"] = j["gate_step_overhead_pct_of_step"] <= 1.0
                met[str(B)]["gate_with_amortised_probe_at_most_1pct"] = (
                    j["gate_step_overhead_pct_of_step"] + j["probe_amortised_pct_of_step"] <= 1.0)
    rc["met"] = met
    rc["targets"] = {"edit_overhead_pct_max": 1.0, "jax_over_torch_throughput_min": 1.0, "step_over_floor_max": 1.5}
    out_c = rc.finish()
    rd.data["errors"] = dict(rc.data["errors"])
    out_d = rd.finish()
    for B in args.batches:
        r = out_c["batches"][str(B)]
        j, t = r.get("jax", {}), r.get("torch", {})
        print(f"[c] batch {B}: jax (unstacked) step {j.get('no_edit', {}).get('step_ms')} ms (+edit "
              f"{j.get('edit_overhead_pct')}%, paired {j.get('edit_overhead_pct_paired_median')}%)  torch step "
              f"{t.get('no_edit', {}).get('step_ms')} ms  jax/torch throughput {r.get('jax_over_torch_throughput')}",
              flush=True)
        s_ = r.get("jax_stacked")
        if s_:
            print(f"[c] batch {B}: jax stacked step {s_['no_edit']['step_ms']} ms "
                  f"({s_['no_edit']['ratio_to_floor']}x floor, +edit {s_['edit_overhead_pct']}%)", flush=True)
        print(f"[d] batch {B}: {out_d['batches'][str(B)].get('jax', {}).get('added')} edit bytes {edit_bytes}", flush=True)
    return out_c, out_d


if __name__ == "__main__":
    main()
