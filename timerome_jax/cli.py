"""`timerome` command line: demo (the main job), trace, edit, eval, compare.

Every sub-command is a thin layer over the Python API in `pipeline`, `trace`, `memory` and
`evaluate`, with the same defaults, so the CLI and the API agree.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from timerome_jax.backbone.checkpoint import NoTokenizerError, load_model_with_tokenizer
from timerome_jax.backbone.tokenizer import eos_or_default
from timerome_jax.diffusion.sampler import SamplerConfig
from timerome_jax.io import write_json
from timerome_jax.method.memory import DEFAULT_TARGET_TEXT
from timerome_jax.tofu import data as tofu
from timerome_jax.tofu import evaluate as ev
from timerome_jax.tofu.models import DEFAULT_MODEL, DEFAULT_RETAIN_MODEL
from timerome_jax.tofu.reference import cached_retain_tr
from timerome_jax.tofu.report import compare, format_number, write_report
from timerome_jax.tofu.truth_ratios import load_retain_tr


def _load(path, dtype=None, attn_impl="xla", layer_unroll=1):
    try:
        return load_model_with_tokenizer(path, dtype, attn_impl, layer_unroll)
    except (FileNotFoundError, NoTokenizerError) as e:
        raise SystemExit(f"error: {e}") from None


def _model_args(p):
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF or converted folder (default: packaged TOFU target)")
    p.add_argument("--dtype", default=None, choices=(None, "float32", "bfloat16"))
    p.add_argument("--attn-impl", default="xla", choices=("xla", "cudnn"))
    p.add_argument("--layer-unroll", type=int, default=1, help="layers per iteration of the layer loop (1: rolled lax.scan, fastest compile; >= the model's layers: unrolled, static indices: on an H100, 1.9x faster batch-1 forwards at 8B)")
    p.add_argument("--split", default="forget01", choices=tofu.FORGET_SPLITS)
    p.add_argument("--out", default="results")
    p.add_argument("--no-progress", action="store_true")


def _trace_args(p):
    from timerome_jax.method.trace import TraceConfig

    d = TraceConfig()
    p.add_argument("--n-trace", type=int, default=8, help="facts traced (the validation set F_v)")
    p.add_argument("--steps", type=int, default=d.steps, help="denoising steps K")
    p.add_argument("--noise-scale", type=float, default=d.noise_scale, help="sigma / std(embeddings)")
    p.add_argument("--n-noise", type=int, default=d.n_noise)
    p.add_argument("--tau", type=float, default=d.tau)
    p.add_argument("--chunk", type=int, default=d.chunk, help="candidate lanes vmapped at once")


def _tcfg(a):
    from timerome_jax.method.trace import TraceConfig

    return TraceConfig(steps=a.steps, noise_scale=a.noise_scale, n_noise=a.n_noise, tau=a.tau, chunk=a.chunk)


def run_trace(a):
    from timerome_jax.method import facts as F
    from timerome_jax import pipeline as pl
    from timerome_jax.method import trace as tr

    params, cfg, tok = _load(a.model, a.dtype, a.attn_impl, a.layer_unroll)
    eos = eos_or_default(tok, cfg)
    facts = F.load_facts(tok, a.split, eos, limit=a.n_trace, require_subject=True)
    tcfg = _tcfg(a)
    res = pl.trace_facts(params, cfg, facts, tcfg, batch=a.n_trace, progress=not a.no_progress)
    coord, score = tr.select(res.tie_bar, modules=tuple(a.modules), k_star=None if a.single_step else -1)
    paths = pl.save_trace(res, coord, facts, tcfg, a.out, f"TIE_bar, {len(facts)} {a.split} facts")
    print(json.dumps({"coordinate": coord._asdict(), "max_mean_abs_tie": float(score.max()), **paths}, indent=1))


def run_edit(a):
    from timerome_jax.method import facts as F
    from timerome_jax.method import memory as mem_lib
    from timerome_jax import pipeline as pl
    from timerome_jax.backbone.config import MODULES
    from timerome_jax.backbone.intervene import Intervene
    from timerome_jax.method.trace import Coordinate

    params, cfg, tok = _load(a.model, a.dtype, a.attn_impl, a.layer_unroll)
    if a.layer is None:
        npz = Path(a.trace)
        if not npz.is_file():
            raise SystemExit(f"error: no --layer given and no trace result at {npz} (run `timerome trace` first)")
        import numpy as np

        c = np.load(npz)["coordinate"]
        coord = Coordinate(int(c[0]), int(c[1]), int(c[2]))
    else:
        coord = Coordinate(a.layer, a.step, MODULES.index(a.module))
    eos = eos_or_default(tok, cfg)
    facts = F.load_facts(tok, a.split, eos, limit=a.limit)
    target = a.target_text
    if a.idk_targets:
        idk = tofu.load_split("idontknow")
        target = [idk[i % len(idk)]["text"] for i in range(len(facts))]
    memory, info = pl.install(params, cfg, tok, facts, coord, a.alpha, a.q, a.lam, target)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    mem_path = Path(a.out) / "memory.npz"
    mem_lib.save(memory, mem_path, {"split": a.split, "target_text": a.target_text if not a.idk_targets else "idontknow",
                                    "fact_index": [f.index for f in facts]})
    print(json.dumps({**info, "memory": str(mem_path)}, indent=1))
    if a.evaluate:
        retain_tr = cached_retain_tr(a.out, a.split, a.seeds, a.n_mc, retain_model=a.retain_model,
                                        progress=not a.no_progress)
        rows, _ = pl.evaluate_methods(params, cfg, tok, {"no_edit": None, "timerome": Intervene(edit=memory)},
                                      a.split, retain_tr, a.out, "edit_table", n_mc=a.n_mc, seeds=a.seeds,
                                      metrics=("forget_lp", "retain_lp", "ra_lp", "wf_lp", "forget_tr",
                                               "forget_quality"), progress=not a.no_progress)
        pl.print_rows(rows)


def run_demo(a):
    from timerome_jax import pipeline as pl

    params, cfg, tok = _load(a.model, a.dtype, a.attn_impl, a.layer_unroll)
    d = pl.DemoConfig()
    dcfg = pl.DemoConfig(split=a.split, n_trace=a.n_trace, trace=_tcfg(a), seeds=tuple(a.seeds), n_mc=a.n_mc,
                         limit=a.limit, lam=a.lam, target_text=a.target_text,
                         batch_size=a.batch_size if a.batch_size else d.batch_size)
    retain = a.retain_model if Path(a.retain_model).is_dir() else None
    if retain is None:
        print(f"[timerome demo] no retain model at {a.retain_model}: Forget Quality is skipped")
    out = pl.demo(params, cfg, tok, a.out, dcfg, retain_model=retain, progress=not a.no_progress)
    s = out["summary"]
    print(f"\ncoordinate: layer {s['coordinate']['layer']}, module {s['coordinate']['module']}, "
          f"step {s['coordinate']['step']} (every step)  |  install {s['install']['install_s']:.2f} s "
          f"(capture {s['install']['capture_s']:.2f} s, solve {s['install']['solve_s']:.3f} s) for "
          f"{s['n_facts']} facts  |  total {s['total_s']:.0f} s")
    pl.print_rows(out["rows"])
    print(f"\nwrote {a.out}/: heatmap.png, tie.npz, table.md, table.json, memory.npz, demo.json")


def build_eval_parser(subparsers=None) -> argparse.ArgumentParser:
    """Add the `eval` sub-command to `subparsers` (or build a stand-alone parser when None)."""
    kw = dict(description="Evaluate a masked diffusion LM on TOFU (paper Table I metrics + TOFU FQ/MU).")
    p = subparsers.add_parser("eval", help="TOFU evaluation", **kw) if subparsers is not None \
        else argparse.ArgumentParser(prog="timerome eval", **kw)
    p.add_argument("--split", default="forget01", choices=tofu.FORGET_SPLITS)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (default: packaged TOFU target)")
    p.add_argument("--retain-model", default=str(DEFAULT_RETAIN_MODEL),
                   help="retain model folder for Forget Quality (its forget TRs are cached in --out)")
    p.add_argument("--retain-tr", default=None, help="JSON of retain-model forget TRs (instead of --retain-model)")
    p.add_argument("--metrics", nargs="+", default=list(ev.DEFAULT_METRICS),
                   help=f"metric names or groups {tuple(ev.GROUPS)}")
    p.add_argument("--n-mc", type=int, default=8, help="MC samples per ELBO (the paper uses 16)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--limit", type=int, default=40,
                   help="only the first N rows of every set (default 40, sized for a 2-core CPU; 0 = all rows)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gen-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: gen length / 4)")
    p.add_argument("--block-length", type=int, default=None, help="sampler block length (default: 32)")
    p.add_argument("--estimator", default="auto")
    p.add_argument("--mc-batch", type=int, default=None)
    p.add_argument("--length-bucket", type=int, default=32, help="round batch lengths up to a multiple of this")
    p.add_argument("--dtype", default=None, choices=(None, "float32", "bfloat16"),
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--attn-impl", default="xla", choices=("xla", "cudnn"), help="attention kernel (cudnn: GPU, bf16)")
    p.add_argument("--layer-unroll", type=int, default=1, help="layers per iteration of the layer loop (1: rolled lax.scan, fastest compile; >= the model's layers: unrolled, static indices: on an H100, 1.9x faster batch-1 forwards at 8B)")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--name", default=None, help="file stem of the outputs (default eval_<split>)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_eval)
    return p


def run_eval(args, loader=None) -> dict:
    """Run `timerome eval` from parsed args; writes <out>/<name>.json (full result) and
    <out>/<name>_summary.{json,md}; returns the result."""
    load = loader or functools.partial(load_model_with_tokenizer, dtype=args.dtype, attn_impl=args.attn_impl,
                                      layer_unroll=args.layer_unroll)
    names = ev.expand_metrics(args.metrics)
    gl = args.gen_length
    args.limit = args.limit or None  # 0 = every row
    scfg = ev.default_sampler(gl) if args.steps is None and args.block_length is None else SamplerConfig(
        steps=args.steps or max(1, gl // 4), block_length=args.block_length or min(32, gl), temperature=0.0,
        remasking="low_confidence")
    retain_tr = None
    if "forget_quality" in names:
        if args.retain_tr:
            retain_tr = load_retain_tr(args.retain_tr)
        else:
            retain_tr = cached_retain_tr(args.out, args.split, args.seeds, args.n_mc, args.retain_model,
                                         args.estimator, args.limit, args.batch_size, not args.no_progress, load,
                                         args.length_bucket)
            if retain_tr is None:
                print(f"[timerome eval] no retain model at {args.retain_model}: forget_quality will be None")
    params, cfg, tok = load(args.model)
    res = ev.evaluate(params, cfg, tok, args.split, metrics=names, n_mc=args.n_mc, seeds=args.seeds,
                   retain_tr=retain_tr, batch_size=args.batch_size, gen_length=gl, sampler=scfg,
                   progress=not args.no_progress, limit=args.limit, estimator=args.estimator,
                   mc_batch=args.mc_batch, length_bucket=args.length_bucket)
    res["model"] = str(args.model)
    name = args.name or f"eval_{args.split}"
    write_json(Path(args.out) / f"{name}.json", res)
    write_report(compare({"model": res}, reference="model"), args.out, f"{name}_summary")
    for m in names:
        vals = res["metrics"][m]
        print(f"{m:16s} " + " ".join(format_number(v) for v in vals))
    return res


def run_compare_cmd(args):
    """`timerome compare`: every method on the same split/seeds/masks -> Table I (see `compare.py`)."""
    from timerome_jax import compare as cmp

    params, cfg, tok = _load(args.model, args.dtype, args.attn_impl, args.layer_unroll)
    ccfg = cmp.CompareConfig(split=args.split, seeds=tuple(args.seeds), n_mc=args.n_mc, limit=args.limit or None,
                             batch_size=args.batch_size, mu=not args.no_mu, mu_limit=args.mu_limit or None,
                             mu_gen_length=args.mu_gen_length)
    if args.full_protocol:
        ccfg = ccfg.full_protocol()
    specs = list(args.methods or cmp.DEFAULT_METHODS)
    try:
        for s in specs:
            cmp.parse_method(s)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    retain_tr = cached_retain_tr(args.out, args.split, ccfg.seeds, ccfg.n_mc, retain_model=args.retain_model,
                                 limit=ccfg.limit, batch_size=ccfg.batch_size, progress=not args.no_progress)
    res = cmp.run_compare(params, cfg, tok, specs, args.out, ccfg, retain_tr, progress=not args.no_progress)
    print(Path(res["files"]["table_md"]).read_text())
    return res


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="timerome", description="TimeROME-DLM: diffusion-time causal tracing and "
                                 "closed-form inference-time editing for masked diffusion LMs (JAX).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="the main job: trace, select, edit and evaluate on the packaged TOFU model")
    _model_args(p)
    _trace_args(p)
    p.add_argument("--retain-model", default=str(DEFAULT_RETAIN_MODEL))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="MC-mask seeds (= DemoConfig.seeds)")
    p.add_argument("--n-mc", type=int, default=4, help="MC samples per ELBO (= DemoConfig.n_mc)")
    p.add_argument("--limit", type=int, default=40, help="rows of each evaluation set")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--lam", type=float, default=None, help="ridge lambda (default 0.1 * mean ||u||^2)")
    p.add_argument("--target-text", default=DEFAULT_TARGET_TEXT)
    p.set_defaults(func=run_demo)

    p = sub.add_parser("trace", help="Stage 1-2: TIE heatmaps and the selected coordinate")
    _model_args(p)
    _trace_args(p)
    p.add_argument("--modules", nargs="+", default=["resid"], choices=("resid", "attn", "mlp"))
    p.add_argument("--single-step", action="store_true", help="select k* too (default k* = -1: every step)")
    p.set_defaults(func=run_trace)

    p = sub.add_parser("edit", help="Stage 3: build, save (and evaluate) the edit memory")
    _model_args(p)
    p.add_argument("--trace", default="results/tie.npz", help="trace result giving the coordinate")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--module", default="resid", choices=("resid", "attn", "mlp"))
    p.add_argument("--step", type=int, default=-1, help="-1 = every denoising step")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--q", type=int, default=2, help="TopQ sparsity (0 = dense)")
    p.add_argument("--lam", type=float, default=None)
    p.add_argument("--limit", type=int, default=None, help="first N facts of the split")
    p.add_argument("--target-text", default=DEFAULT_TARGET_TEXT)
    p.add_argument("--idk-targets", action="store_true", help="targets from TOFU idontknow.jsonl")
    p.add_argument("--evaluate", action="store_true", help="also evaluate no_edit vs the edit")
    p.add_argument("--retain-model", default=str(DEFAULT_RETAIN_MODEL))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-mc", type=int, default=16)
    p.set_defaults(func=run_edit)

    p = sub.add_parser("compare", help="every method (baselines + TimeROME) on the same masks: Table I")
    _model_args(p)
    p.set_defaults(out="results/compare")
    p.add_argument("--methods", nargs="+", default=None,
                   help="method specs name[:key=value,...] (default: all, see compare.DEFAULT_METHODS)")
    p.add_argument("--retain-model", default=str(DEFAULT_RETAIN_MODEL))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n-mc", type=int, default=4)
    p.add_argument("--limit", type=int, default=40, help="rows of each evaluation set (0 = all)")
    p.add_argument("--batch-size", type=int, default=40)
    p.add_argument("--no-mu", action="store_true", help="skip Model Utility (its ROUGE generations are the slow part)")
    p.add_argument("--mu-limit", type=int, default=16, help="rows per set for Model Utility (0 = all)")
    p.add_argument("--mu-gen-length", type=int, default=64)
    p.add_argument("--full-protocol", action="store_true", help="all rows, n_mc 16, seeds 0-4, MU on all rows")
    p.set_defaults(func=run_compare_cmd)

    build_eval_parser(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
