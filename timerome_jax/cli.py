"""`timerome` command line: demo (the main job), trace, edit, eval.

Every sub-command is a thin layer over the Python API in `pipeline`, `trace`, `memory` and
`evaluate`, with the same defaults, so the CLI and the API agree.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

from timerome_jax.backbone.checkpoint import NoTokenizerError, load_model_with_tokenizer
from timerome_jax.backbone.tokenizer import eos_or_default
from timerome_jax.io import write_json
from timerome_jax.method.memory import DEFAULT_TARGET_TEXT
from timerome_jax.tofu import data as tofu
from timerome_jax.tofu import evaluate as ev
from timerome_jax.tofu.models import DEFAULT_MODEL, ReferenceMismatchError
from timerome_jax.tofu.protocol import PROTOCOLS, protocol_notes, resolve_gen_length, sampler_for
from timerome_jax.tofu.reference import cached_retain_tr, load_reference_tr
from timerome_jax.tofu.report import compare, format_number, write_report


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
        try:
            retain_tr = cached_retain_tr(a.out, a.split, a.seeds, a.n_mc, retain_model=a.retain_model,
                                         progress=not a.no_progress, override=a.reference_override)
        except ReferenceMismatchError as e:
            raise SystemExit(f"error: {e} (--reference-override)") from None
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
    try:
        out = pl.demo(params, cfg, tok, a.out, dcfg, retain_model=a.retain_model, progress=not a.no_progress,
                      reference_override=a.reference_override)
    except ReferenceMismatchError as e:
        raise SystemExit(f"error: {e} (--reference-override)") from None
    if out["summary"]["reference"]["model"] is None:
        print(f"[timerome demo] {out['summary']['reference']['message']}: Forget Quality is skipped")
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
    p.add_argument("--protocol", default="quick", choices=tuple(PROTOCOLS),
                   help="quick: 40 rows per set spread over its authors, n_mc 8, seed 0, 128 generated tokens "
                        "(a 2-core CPU); full: TOFU's protocol, every row, n_mc 16, seeds 0-4, TOFU's 200 "
                        "generated tokens clipped to the model's context, one token per step (docs/tofu_protocol.md). "
                        "--limit/--n-mc/--seeds/--gen-length/--steps/--block-length override it (recorded)")
    p.add_argument("--retain-model", default="auto",
                   help="Forget Quality reference (default auto: the packaged model trained on the split's retain "
                        "set, forget01->retain99, forget05->retain95, forget10->retain90; its forget TRs are "
                        "cached in --out); a folder whose recorded retain set differs is an error unless "
                        "--reference-override")
    p.add_argument("--retain-tr", default=None, help="JSON of retain-model forget TRs (instead of --retain-model)")
    p.add_argument("--reference-override", action="store_true",
                   help="use --retain-model/--retain-tr even if it was not trained on the split's retain set "
                        "(the report records reference_override: true)")
    p.add_argument("--metrics", nargs="+", default=list(ev.DEFAULT_METRICS),
                   help=f"metric names or groups {tuple(ev.GROUPS)}")
    p.add_argument("--n-mc", type=int, default=None, help="MC samples per ELBO (quick 8, full 16 as in the paper)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="MC-mask seeds (quick: 0; full: 0 1 2 3 4)")
    p.add_argument("--limit", type=int, default=None,
                   help="N rows of every set, spread evenly over it so every author contributes "
                        "(quick: 40; full: all; 0 = all rows)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gen-length", type=int, default=None, help="generated tokens for ROUGE (quick 128; full: 200 "
                   "clipped to the context)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (quick: 32; full: one token per step)")
    p.add_argument("--block-length", type=int, default=None, help="sampler block length (quick: 32; full: 16)")
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
    proto = PROTOCOLS[getattr(args, "protocol", "quick")]
    overrides = [k for k in ("limit", "n_mc", "seeds", "gen_length", "steps", "block_length")
                 if getattr(args, k, None) is not None]
    n_mc = args.n_mc if args.n_mc is not None else proto.n_mc
    seeds = list(args.seeds) if args.seeds is not None else list(proto.seeds)
    limit = (args.limit or None) if args.limit is not None else proto.limit  # 0 = every row
    reference = {"model": None, "reference_override": False}
    retain_tr = None
    if "forget_quality" in names:
        try:
            if args.retain_tr:
                retain_tr, reference = load_reference_tr(args.retain_tr, args.split, args.reference_override)
            else:
                retain_tr = cached_retain_tr(args.out, args.split, seeds, n_mc, args.retain_model,
                                             args.estimator, limit, args.batch_size, not args.no_progress, load,
                                             args.length_bucket, override=args.reference_override,
                                             record=reference)
        except ReferenceMismatchError as e:
            raise SystemExit(f"error: {e} (--reference-override)") from None
        if retain_tr is None:
            print(f"[timerome eval] {reference.get('message')}: forget_quality will be None")
    params, cfg, tok = load(args.model)
    gl = args.gen_length or resolve_gen_length(proto, cfg, tok)
    scfg = sampler_for(proto, gl)
    scfg = dataclasses.replace(scfg, steps=args.steps or scfg.steps, block_length=args.block_length or scfg.block_length)
    res = ev.evaluate(params, cfg, tok, args.split, metrics=names, n_mc=n_mc, seeds=seeds,
                      retain_tr=retain_tr, batch_size=args.batch_size, gen_length=gl, sampler=scfg,
                      progress=not args.no_progress, limit=limit, estimator=args.estimator,
                      mc_batch=args.mc_batch, length_bucket=args.length_bucket)
    res["model"] = str(args.model)
    res["protocol"] = proto.name
    res["protocol_overrides"] = overrides
    res["reference"] = reference
    res["reference_override"] = bool(reference.get("reference_override"))
    name = args.name or f"eval_{args.split}"
    write_json(Path(args.out) / f"{name}.json", res)
    write_report(compare({"model": res}, reference="model"), args.out, f"{name}_summary",
                 notes=protocol_notes(res))
    for m in names:
        vals = res["metrics"][m]
        print(f"{m:16s} " + " ".join(format_number(v) for v in vals))
    if "forget_quality_pooled" in res:
        print(f"{'fq_pooled':16s} {format_number(res['forget_quality_pooled']['agg_value'])}")
    return res


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="timerome", description="TimeROME-DLM: diffusion-time causal tracing and "
                                 "closed-form inference-time editing for masked diffusion LMs (JAX).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="the main job: trace, select, edit and evaluate on the packaged TOFU model")
    _model_args(p)
    _trace_args(p)
    p.add_argument("--retain-model", default="auto", help="Forget Quality reference (auto: the packaged model "
                   "trained on the split's retain set)")
    p.add_argument("--reference-override", action="store_true",
                   help="use --retain-model even if it was not trained on the split's retain set (recorded)")
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
    p.add_argument("--retain-model", default="auto", help="Forget Quality reference (auto: the packaged model "
                   "trained on the split's retain set)")
    p.add_argument("--reference-override", action="store_true",
                   help="use --retain-model even if it was not trained on the split's retain set (recorded)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-mc", type=int, default=16)
    p.set_defaults(func=run_edit)

    build_eval_parser(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
