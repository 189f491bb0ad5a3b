"""`timerome` command line: demo (the main job), trace, edit, eval, compare.

Every sub-command is a thin layer over the Python API in `pipeline`, `method.trace`,
`method.memory_file` and `tofu.evaluate`, with the same defaults, so the CLI and the API agree.

Layout, kept simple so that new sub-commands merge easily: one `add_<name>(sub)` that builds the
sub-command's parser and one `run_<name>(args)` that does the work; `main` parses, runs, and turns
a known error (`KNOWN_ERRORS`) into one line `error: ...` on stderr and exit status 1 (`--debug`
re-raises it with its traceback). A bad command line exits with status 2, also in one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import numpy as np

from timerome_jax import compare_methods as cmp
from timerome_jax import pipeline as pl
from timerome_jax.backbone.checkpoint import NoTokenizerError, OrbaxCheckpointError, load_model_with_tokenizer
from timerome_jax.backbone.model import LAYOUTS
from timerome_jax.backbone.config import MODULES
from timerome_jax.backbone.hf_config import HFConfigError
from timerome_jax.backbone.hf_weights import CheckpointError
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.backbone import validate as V
from timerome_jax.backbone.tokenizer import TokenizerError, eos_or_default
from timerome_jax.io import atomic_path, write_json
from timerome_jax.method import facts as F
from timerome_jax.method import memory_file
from timerome_jax.method.capture import DEFAULT_TARGET_TEXT, model_fingerprint
from timerome_jax.method import screen as sc
from timerome_jax.method import trace as tr
from timerome_jax.tofu import data as tofu
from timerome_jax.tofu import evaluate as ev
from timerome_jax.tofu.models import DEFAULT_MODEL, MissingReferenceError, ReferenceMismatchError
from timerome_jax.tofu.protocol import PROTOCOLS, protocol_notes, resolve_gen_length, sampler_for
from timerome_jax.tofu.reference import cached_retain_tr, load_reference_tr
from timerome_jax.tofu.report import compare, format_number, write_report


class CLIError(Exception):
    """A request the parser cannot reject by itself (e.g. `edit` with neither --layer nor a trace file)."""


# Errors with a message written for people: printed as one line, no traceback (unless --debug).
KNOWN_ERRORS = (CLIError, FileNotFoundError, NotADirectoryError, HFConfigError, CheckpointError,
                OrbaxCheckpointError, TokenizerError, NoTokenizerError, memory_file.MemoryFileError,
                memory_file.ModelMismatchError, memory_file.CoordinateMismatchError, ReferenceMismatchError,
                MissingReferenceError, V.ValidationError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" unless the help text already states the default itself."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h:
            return h
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (`error: ...`) instead of the usage block."""

    def error(self, message):
        sys.stderr.write(f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _subparser(sub, name: str, help: str, description: str = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the Python traceback of an error (default: one line)")
    return p


# -------------------------------------------------------------------------------------------------
# shared options
# -------------------------------------------------------------------------------------------------
def _model_args(p, with_split: bool = True):
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="model folder: Hugging Face (config.json + *.safetensors) or converted Orbax "
                        "(default: the packaged TOFU target model)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="params and compute dtype (default: the checkpoint's dtype)")
    p.add_argument("--attn-impl", default="xla", choices=("xla", "cudnn"),
                   help="attention kernel; cudnn needs a GPU and bfloat16")
    p.add_argument("--layer-unroll", type=int, default=1,
                   help="layers per iteration of the layer loop: 1 = rolled lax.scan (fastest compile), "
                        ">= the model's layers = fully unrolled; only used with the stacked layout")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="params layout of the layers: stacked = one [L, ...] array per weight run by a "
                        "layer lax.scan (fastest compile); unstacked = separate arrays per layer, an "
                        "unrolled loop (about 2x faster batch-1 generation on GPU, longer compile); "
                        "auto (default) = unstacked on GPU, stacked on CPU/TPU")
    if with_split:
        p.add_argument("--split", default="forget01", choices=tofu.FORGET_SPLITS, help="TOFU forget split")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _trace_args(p):
    d = tr.TraceConfig()
    p.add_argument("--n-trace", type=int, default=8, help="facts traced (the validation set F_v), facts")
    p.add_argument("--steps", type=int, default=d.steps, help="denoising steps K of the traced trajectory")
    p.add_argument("--noise-scale", type=float, default=d.noise_scale,
                   help="corruption noise sigma, in units of the std of the embedding matrix")
    p.add_argument("--n-noise", type=int, default=d.n_noise, help="noise draws per fact")
    p.add_argument("--tau", type=float, default=d.tau, help="decay of the step weights in TIE_bar, in steps")
    p.add_argument("--chunk", type=int, default=d.chunk, help="candidate lanes vmapped at once (memory vs speed)")


def _reference_args(p):
    p.add_argument("--retain-model", default="auto",
                   help="Forget Quality reference model folder (default: auto = the packaged model trained on the "
                        "split's retain set: forget01->retain99, forget05->retain95, forget10->retain90); a folder "
                        "whose recorded retain set differs is an error unless --reference-override")
    p.add_argument("--reference-override", action="store_true",
                   help="accept a --retain-model/--retain-tr not trained on the split's retain set (default: off; "
                        "the report records reference_override: true)")


def _tcfg(a) -> tr.TraceConfig:
    return tr.TraceConfig(steps=a.steps, noise_scale=a.noise_scale, n_noise=a.n_noise, tau=a.tau, chunk=a.chunk)


def _load(a, path=None):
    return load_model_with_tokenizer(path or a.model, a.dtype, a.attn_impl, a.layer_unroll, a.layout)


# -------------------------------------------------------------------------------------------------
# demo
# -------------------------------------------------------------------------------------------------
def add_demo(sub):
    d = pl.DemoConfig()
    p = _subparser(sub, "demo", "the main job: trace, select, edit and evaluate on the packaged TOFU model")
    _model_args(p)
    _trace_args(p)
    _reference_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="MC-mask seeds")
    p.add_argument("--n-mc", type=int, default=d.n_mc, help="Monte-Carlo samples per ELBO")
    p.add_argument("--limit", type=int, default=d.limit, help="rows of each evaluation set")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per scoring batch")
    p.add_argument("--lam", type=float, default=None, help="ridge lambda (default: 0.1 * mean ||u||^2 of the keys)")
    p.add_argument("--target-text", default=d.target_text, help="what the edited model should say instead")
    p.set_defaults(func=run_demo)


def run_demo(a):
    params, cfg, tok = _load(a)
    dcfg = pl.DemoConfig(split=a.split, n_trace=a.n_trace, trace=_tcfg(a), seeds=tuple(a.seeds), n_mc=a.n_mc,
                         limit=a.limit, lam=a.lam, target_text=a.target_text, batch_size=a.batch_size)
    out = pl.demo(params, cfg, tok, a.out, dcfg, retain_model=a.retain_model, progress=not a.no_progress,
                  reference_override=a.reference_override)
    if out["summary"]["reference"]["model"] is None:
        print(f"[timerome demo] {out['summary']['reference']['message']}: Forget Quality is skipped")
    s = out["summary"]
    print(f"\ncoordinate: layer {s['coordinate']['layer']}, module {s['coordinate']['module']}, "
          f"step {s['coordinate']['step']} (every step)  |  install {s['install']['install_s']:.2f} s "
          f"(capture {s['install']['capture_s']:.2f} s, solve {s['install']['solve_s']:.3f} s) for "
          f"{s['n_facts']} facts  |  total {s['total_s']:.0f} s")
    pl.print_rows(out["rows"])
    print(f"\nwrote {a.out}/: heatmap.png, tie.npz, table.md, table.json, memory.npz, demo.json")


# -------------------------------------------------------------------------------------------------
# trace
# -------------------------------------------------------------------------------------------------
def add_trace(sub):
    p = _subparser(sub, "trace", "Stage 1-2: TIE heatmaps and the selected coordinate")
    _model_args(p)
    _trace_args(p)
    p.add_argument("--modules", nargs="+", default=["resid"], choices=MODULES, help="modules the selection may pick")
    p.add_argument("--single-step", action="store_true",
                   help="select the step k* too (default: off, k* = -1 = every step)")
    p.add_argument("--screen", action="store_true", help="first-order TIE screen of every candidate, then exact "
                   "TIE on the top --top-frac of each module's cells only (default: off, the full exact sweep)")
    p.add_argument("--top-frac", type=float, default=0.05,
                   help="with --screen: fraction of each module's (layer, step) cells traced exactly (default 0.05)")
    p.set_defaults(func=run_trace)


def run_trace(a):
    params, cfg, tok = _load(a)
    eos = eos_or_default(tok, cfg)
    facts = F.load_facts(tok, a.split, eos, limit=a.n_trace, require_subject=True)
    tcfg = _tcfg(a)
    k_star = None if a.single_step else -1
    extra = {}
    if a.screen:
        st = sc.screen_and_trace(params, cfg, F.fact_batch(facts, cfg), tcfg, top_frac=a.top_frac,
                                 modules=tuple(a.modules))
        res = tr.TraceResult(st.tie, st.merged(), st.clean, st.corrupted)
        coord, score = sc.select_screened(st, modules=tuple(a.modules), k_star=k_star)
        score = score[np.isfinite(score)]
        title = f"TIE_bar (exact on the top {a.top_frac:g}, first-order elsewhere), {len(facts)} {a.split} facts"
        extra = {"screen_npz": str(Path(a.out) / "screen.npz"), "n_exact_candidates": int(len(st.candidates))}
    else:
        res = pl.trace_facts(params, cfg, facts, tcfg, batch=a.n_trace, progress=not a.no_progress)
        coord, score = tr.select(res.tie_bar, modules=tuple(a.modules), k_star=k_star)
        title = f"TIE_bar, {len(facts)} {a.split} facts"
    paths = pl.save_trace(res, coord, facts, tcfg, a.out, title)
    if a.screen:
        with atomic_path(extra["screen_npz"]) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, estimate=st.estimate, tie_bar_exact=st.tie_bar, candidates=st.candidates)
    print(json.dumps({"coordinate": coord._asdict(), "max_mean_abs_tie": float(score.max()), **paths, **extra},
                     indent=1))


# -------------------------------------------------------------------------------------------------
# validate
# -------------------------------------------------------------------------------------------------
def add_validate(sub):
    p = _subparser(sub, "validate", "compare the library with the checkpoint's own PyTorch code (logits and every "
                   "hidden state, padded and unpadded); exit 1 above the tolerance")
    p.add_argument("--model", required=True, help="HF checkpoint folder (with its auto_map modeling files, or a "
                   "Dream/DiffuLLaMA folder for transformers' built-in Qwen2/Llama classes)")
    p.add_argument("--dtype", dest="compute_dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype of both sides, not the checkpoint's (default: float32 on CPU, bfloat16 on a GPU)")
    p.add_argument("--tol", type=float, default=None, help="max error relative to each tensor's max |value| "
                   "(default: 1e-4 in float32, 5e-2 in bfloat16)")
    p.add_argument("--torch-impl", default="auto", choices=("auto", "remote", "builtin"),
                   help="PyTorch side: the folder's auto_map files (remote), transformers' Qwen2/Llama (builtin), "
                   "or remote when the files exist (default: auto)")
    p.add_argument("--cases", nargs="+", default=["unpadded", "padded"], choices=("unpadded", "padded"),
                   help="inputs to compare: unpadded (no padding mask) and/or padded (left padding + mask); default both")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="params layout of the library side: stacked, unstacked, or auto (default) = unstacked "
                        "on a GPU, stacked elsewhere, as the other commands load it")
    p.add_argument("--out", default=None, help="also write the JSON report here (default: none)")
    p.set_defaults(func=run_validate)


def run_validate(a):
    report = V.validate(a.model, a.compute_dtype, tol=a.tol, impl=a.torch_impl, cases=tuple(a.cases),
                        layout=a.layout)
    print("\n".join(V.summary_lines(report)))
    if a.out:
        V.write_report(report, a.out)
    if not report["passed"]:
        raise SystemExit(1)


# -------------------------------------------------------------------------------------------------
# edit
# -------------------------------------------------------------------------------------------------
def add_edit(sub):
    p = _subparser(sub, "edit", "Stage 3: build, save (and evaluate) the edit memory")
    _model_args(p)
    p.add_argument("--trace", default="results/tie.npz", help="trace result (from `timerome trace`) giving the "
                   "coordinate when --layer is not given")
    p.add_argument("--layer", type=int, default=None, help="edit layer (default: the one in --trace)")
    p.add_argument("--module", default="resid", choices=MODULES, help="edited module (with --layer)")
    p.add_argument("--step", type=int, default=-1, help="denoising step of the edit (with --layer); -1 = every step")
    p.add_argument("--alpha", type=float, default=4.0,
                   help="edit strength alpha (the gated memory's default, docs/gated_memory.md)")
    p.add_argument("--q", type=int, default=4, help="TopQ sparsity, facts per query (0 = dense)")
    p.add_argument("--no-gate", action="store_true",
                   help="the paper's ungated Eq. 12 instead of the gated memory (default: gated)")
    p.add_argument("--gate-percentile", type=float, default=None,
                   help="also open the gate per token above this percentile of held-out retain tokens' gate "
                        "scores, percent (default: off; the sequence latch alone decides)")
    p.add_argument("--lam", type=float, default=None, help="ridge lambda (default: 0.1 * mean ||u||^2 of the keys)")
    p.add_argument("--limit", type=int, default=None, help="first N facts of the split (default: all)")
    p.add_argument("--target-text", default=DEFAULT_TARGET_TEXT, help="what the edited model should say instead")
    p.add_argument("--idk-targets", action="store_true", help="targets from TOFU idontknow.jsonl instead of --target-text")
    p.add_argument("--evaluate", action="store_true", help="also evaluate no_edit vs the edit")
    _reference_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="MC-mask seeds with --evaluate")
    p.add_argument("--n-mc", type=int, default=16, help="Monte-Carlo samples per ELBO with --evaluate")
    p.set_defaults(func=run_edit)


def run_edit(a):
    if a.layer is None:
        npz = Path(a.trace)
        if not npz.is_file():
            raise CLIError(f"no --layer given and no trace result at {npz} (run `timerome trace` first)")
        c = np.load(npz)["coordinate"]
        coord = tr.Coordinate(int(c[0]), int(c[1]), int(c[2]))
    else:
        coord = tr.Coordinate(a.layer, a.step, MODULES.index(a.module))
    params, cfg, tok = _load(a)
    eos = eos_or_default(tok, cfg)
    facts = F.load_facts(tok, a.split, eos, limit=a.limit)
    target = a.target_text
    if a.idk_targets:
        idk = tofu.load_split("idontknow")
        target = [idk[i % len(idk)]["text"] for i in range(len(facts))]
    memory, info = pl.install(params, cfg, tok, facts, coord, a.alpha, a.q, a.lam, target, gate=not a.no_gate,
                              percentile=a.gate_percentile)
    mem_path = Path(a.out) / "memory.npz"
    mem_path.parent.mkdir(parents=True, exist_ok=True)
    memory_file.save(memory, mem_path, {"split": a.split, "target_text": a.target_text if not a.idk_targets else "idontknow",
                                    "fact_index": [f.index for f in facts]})
    print(json.dumps({**info, "memory": str(mem_path)}, indent=1))
    if a.evaluate:
        retain_tr = cached_retain_tr(a.out, a.split, a.seeds, a.n_mc, retain_model=a.retain_model,
                                     progress=not a.no_progress, override=a.reference_override)
        rows, _ = pl.evaluate_methods(params, cfg, tok, {"no_edit": None, "timerome": Intervene(edit=memory)},
                                      a.split, retain_tr, a.out, "edit_table", n_mc=a.n_mc, seeds=a.seeds,
                                      metrics=("forget_lp", "retain_lp", "ra_lp", "wf_lp", "forget_tr",
                                               "forget_quality"), progress=not a.no_progress)
        pl.print_rows(rows)


# -------------------------------------------------------------------------------------------------
# eval
# -------------------------------------------------------------------------------------------------
def _eval_args(p):
    _model_args(p)
    p.add_argument("--memory", default=None,
                   help="edit-memory file (memory.npz from `timerome edit`) installed during evaluation; it must "
                        "have been built for --model (default: none, the unedited model)")
    _reference_args(p)
    p.add_argument("--protocol", default="quick", choices=tuple(PROTOCOLS),
                   help="quick: 40 rows per set spread over its authors, n_mc 8, seed 0, 128 generated tokens "
                        "(a 2-core CPU); full: TOFU's protocol, every row, n_mc 16, seeds 0-4, TOFU's 200 "
                        "generated tokens clipped to the model's context, one token per step (docs/tofu_protocol.md); "
                        "--limit/--n-mc/--seeds/--gen-length/--steps/--block-length override it (recorded)")
    p.add_argument("--retain-tr", default=None,
                   help="JSON of retain-model forget truth ratios, instead of --retain-model (default: none)")
    p.add_argument("--metrics", nargs="+", default=list(ev.DEFAULT_METRICS),
                   help=f"metric names or groups {tuple(ev.GROUPS)}")
    p.add_argument("--n-mc", type=int, default=None,
                   help="Monte-Carlo samples per ELBO (default: the protocol's, quick 8, full 16 as in the paper)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="MC-mask and sampling seeds (default: the protocol's, quick 0, full 0 1 2 3 4)")
    p.add_argument("--limit", type=int, default=None,
                   help="rows of every evaluation set, spread evenly over it so every author contributes "
                        "(default: the protocol's, quick 40, full all; 0 = all rows)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    p.add_argument("--gen-length", type=int, default=None,
                   help="generated answer length for ROUGE, tokens (default: the protocol's, quick 128, full 200 "
                        "clipped to the context)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the protocol's, quick gen length / 4, full one token per step)")
    p.add_argument("--block-length", type=int, default=None,
                   help="sampler block length, tokens (default: the protocol's, quick 32, full 16)")
    p.add_argument("--estimator", default="auto", help="ELBO mask estimator (auto: the family's own)")
    p.add_argument("--mc-batch", type=int, default=None,
                   help="MC samples per forward (default: all of --n-mc at once)")
    p.add_argument("--length-bucket", type=int, default=32,
                   help="round batch lengths up to a multiple of this, tokens (fewer compiles)")
    p.add_argument("--name", default=None, help="file stem of the outputs (default: eval_<split>)")


def add_eval(sub):
    p = _subparser(sub, "eval", "TOFU evaluation",
                   "Evaluate a masked diffusion LM on TOFU (paper Table I metrics + TOFU FQ/MU).")
    _eval_args(p)
    p.set_defaults(func=run_eval)


def build_eval_parser() -> argparse.ArgumentParser:
    """A stand-alone parser of the `eval` options (for calling `run_eval` from Python)."""
    p = _Parser(prog="timerome eval", formatter_class=HelpFormatter)
    _eval_args(p)
    return p


def run_eval(args, loader=None) -> dict:
    """Run `timerome eval` from parsed args; writes <out>/<name>.json (full result) and
    <out>/<name>_summary.{json,md}; returns the result. loader(path) -> (params, cfg, tok)."""
    load = loader or functools.partial(load_model_with_tokenizer, dtype=args.dtype, attn_impl=args.attn_impl,
                                       layer_unroll=args.layer_unroll, layout=args.layout)
    names = ev.expand_metrics(args.metrics)
    proto = PROTOCOLS[args.protocol]
    overrides = [k for k in ("limit", "n_mc", "seeds", "gen_length", "steps", "block_length")
                 if getattr(args, k, None) is not None]
    n_mc = args.n_mc if args.n_mc is not None else proto.n_mc
    seeds = list(args.seeds) if args.seeds is not None else list(proto.seeds)
    limit = (args.limit or None) if args.limit is not None else proto.limit  # 0 = every row
    # bad inputs fail now, not after the retain model's scoring
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"model folder {args.model} does not exist")
    if args.memory:
        memory_file.load(args.memory)
    reference = {"model": None, "reference_override": False}
    retain_tr = None
    if "forget_quality" in names:
        if args.retain_tr:
            retain_tr, reference = load_reference_tr(args.retain_tr, args.split, args.reference_override)
        else:
            retain_tr = cached_retain_tr(args.out, args.split, seeds, n_mc, args.retain_model,
                                         args.estimator, limit, args.batch_size, not args.no_progress, load,
                                         args.length_bucket, override=args.reference_override,
                                         record=reference)
        if retain_tr is None:
            print(f"[timerome eval] {reference.get('message')}: forget_quality will be None")
    params, cfg, tok = load(args.model)  # after the retain model: one model in memory at a time
    gl = args.gen_length or resolve_gen_length(proto, cfg, tok)
    scfg = sampler_for(proto, gl)
    scfg = dataclasses.replace(scfg, steps=args.steps or scfg.steps, block_length=args.block_length or scfg.block_length)
    intervene = None
    if args.memory:
        memory, _ = memory_file.load(args.memory, expect_fingerprint=model_fingerprint(params, cfg))
        intervene = Intervene(edit=memory)
    res = ev.evaluate(params, cfg, tok, args.split, metrics=names, n_mc=n_mc, seeds=seeds,
                      retain_tr=retain_tr, batch_size=args.batch_size, gen_length=gl, sampler=scfg,
                      progress=not args.no_progress, limit=limit, estimator=args.estimator,
                      mc_batch=args.mc_batch, length_bucket=args.length_bucket, intervene=intervene)
    res["model"] = str(args.model)
    res["memory"] = args.memory
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


# -------------------------------------------------------------------------------------------------
# compare
# -------------------------------------------------------------------------------------------------
def add_compare(sub):
    p = _subparser(sub, "compare", "every method (baselines + TimeROME) on the same masks and seeds: Table I")
    _model_args(p)
    p.set_defaults(out="results/compare")
    p.add_argument("--methods", nargs="+", default=None,
                   help="method specs name[:key=value,...] (default: all of compare_methods.DEFAULT_METHODS)")
    _reference_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="MC-mask seeds")
    p.add_argument("--n-mc", type=int, default=4, help="Monte-Carlo samples per ELBO")
    p.add_argument("--limit", type=int, default=40, help="rows of each evaluation set (0 = all)")
    p.add_argument("--batch-size", type=int, default=40, help="sequences per scoring batch")
    p.add_argument("--no-mu", action="store_true",
                   help="skip Model Utility (its ROUGE generations are the slow part; default: computed)")
    p.add_argument("--mu-limit", type=int, default=16, help="rows per set for Model Utility (0 = all)")
    p.add_argument("--mu-gen-length", type=int, default=64, help="generated tokens for Model Utility's ROUGE")
    p.add_argument("--full-protocol", action="store_true",
                   help="all rows, n_mc 16, seeds 0-4, Model Utility on all rows (default: the reduced budget)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no method when the time so far plus 1.2x the slowest method would pass this many "
                        "seconds (the rest are listed as skipped; rerunning with the same --out resumes)")
    p.set_defaults(func=run_compare)


def run_compare(a):
    """`timerome compare`: every method on the same split/seeds/masks -> Table I (see `compare_methods.py`)."""
    ccfg = cmp.CompareConfig(split=a.split, seeds=tuple(a.seeds), n_mc=a.n_mc, limit=a.limit or None,
                             batch_size=a.batch_size, mu=not a.no_mu, mu_limit=a.mu_limit or None,
                             mu_gen_length=a.mu_gen_length)
    if a.full_protocol:
        ccfg = ccfg.full_protocol()
    specs = list(a.methods or cmp.DEFAULT_METHODS)
    for s in specs:
        try:
            cmp.parse_method(s)
        except ValueError as e:
            raise CLIError(str(e)) from None
    params, cfg, tok = _load(a)
    retain_tr = cached_retain_tr(a.out, a.split, ccfg.seeds, ccfg.n_mc, retain_model=a.retain_model,
                                 limit=ccfg.limit, batch_size=ccfg.batch_size, progress=not a.no_progress,
                                 override=a.reference_override)
    res = cmp.run_compare(params, cfg, tok, specs, a.out, ccfg, retain_tr, progress=not a.no_progress,
                          budget_s=a.budget_s)
    print(Path(res["files"]["table_md"]).read_text())
    return res


# -------------------------------------------------------------------------------------------------
# entry point
# -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="timerome", formatter_class=HelpFormatter,
                 description="TimeROME-DLM: diffusion-time causal tracing and closed-form inference-time "
                             "editing for masked diffusion LMs (JAX).")
    ap.add_argument("--debug", action="store_true", help="show the Python traceback of an error (default: one line)")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    add_demo(sub)
    add_trace(sub)
    add_edit(sub)
    add_eval(sub)
    add_validate(sub)
    add_compare(sub)
    return ap


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 known error, 2 bad command line)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KNOWN_ERRORS as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__  # one line
        print(f"error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
