"""TOFU's full evaluation protocol for the packaged target and its Forget Quality references, on
forget01 / forget05 / forget10, in one command (sized for one GPU; docs/tofu_protocol.md).

    python experiments/full_protocol.py --out results/full_protocol

Per split: the reference trained on the split's retain set (`tofu.models.retain_model_for`:
forget01 -> retain99, forget05 -> retain95, forget10 -> retain90; or the folder given with
`--reference forget05=PATH`, checked against the retain set recorded in its
`timerome_reference.json`: a mismatch is an error unless --reference-override, which the summary
records) is evaluated first, with every
metric; its per-row forget truth ratios are the FQ reference of the target, evaluated next. A
split without a packaged reference is still evaluated, with FQ None and the reason recorded.
Protocol (`tofu.protocol.FULL`): every row, n_mc 16, seeds 0-4, greedy generation of TOFU's 200
tokens clipped to the model's context, one token per step.

Writes into --out:
  <split>_<model>.json            the full `evaluate` result (per-sample values, generations)
  <split>.json / <split>.md       the table of target and reference (`tofu.report`)
  references/<folder>/reference/retain_forget_tr_<split>_nmc<n>_auto.json
                                  the reference's forget TRs in the packaged format (copy the
                                  folder into timerome_jax/assets/<folder>/ to ship them)
  summary.json / summary.md       every number of the run, and the settings
and prints summary.json (also rewritten after every split). --budget-s: an evaluation is not
started when the time so far plus 1.3x the previous evaluation's would pass it (recorded as skipped);
a SIGINT or SIGTERM (e.g. `timeout -s INT 560 python ...`) stops the evaluation in flight and still
writes the summary of what finished.
--limit/--n-mc/--seeds/--gen-length shrink it for a smoke test (recorded as overrides).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import signal
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from timerome_jax.backbone.checkpoint import load_model_with_tokenizer  # noqa: E402
from timerome_jax.io import write_json, write_text  # noqa: E402
from timerome_jax.tofu import data as tofu  # noqa: E402
from timerome_jax.tofu import evaluate as ev  # noqa: E402
from timerome_jax.tofu.models import DEFAULT_MODEL  # noqa: E402
from timerome_jax.tofu.protocol import FULL, protocol_notes, resolve_gen_length, sampler_for  # noqa: E402
from timerome_jax.tofu.models import ReferenceMismatchError  # noqa: E402
from timerome_jax.tofu.reference import resolve_reference, retain_tr_cache_path  # noqa: E402
from timerome_jax.tofu.report import compare, format_number, write_report  # noqa: E402
from timerome_jax.tofu.truth_ratios import forget_tr_by_index  # noqa: E402

TABLE = ("forget_prob", "forget_tr", "forget_rouge", "forget_quality", "model_utility", "forget_lp", "retain_lp",
         "ra_lp", "wf_lp", "retain_prob", "retain_tr", "retain_rouge")


def summarise(res: dict) -> dict:
    """{metric: mean over seeds} for everything but FQ; FQ as per-seed values and the pooled one."""
    out = {}
    for m, vals in res["metrics"].items():
        if m == "forget_quality":
            out["forget_quality_per_seed"] = vals
            out["forget_quality_pooled"] = res.get("forget_quality_pooled", {}).get("agg_value")
        else:
            v = [x for x in vals if x is not None]
            out[m] = sum(v) / len(v) if v else None
    return out


def markdown_summary(summary: dict) -> str:
    """One table: a row per (split, model), TOFU's numbers as means over seeds, FQ pooled + per seed."""
    cols = [c for c in TABLE if c != "forget_quality"]
    head = "| split | model | trained on | FQ pooled (per seed) | " + " | ".join(cols) + " |\n"
    head += "|---|---|---|---|" + "---|" * len(cols) + "\n"
    lines = []
    for split, d in summary["splits"].items():
        for role in ("target", "reference"):
            r = d.get(role)
            if not r or "metrics" not in r:
                continue
            m = r["metrics"]
            if role == "target":
                fq = (f"{format_number(m.get('forget_quality_pooled'))} "
                      f"({', '.join(format_number(v) for v in m.get('forget_quality_per_seed', []))})")
            else:
                fq = "1 (it is the reference)"
            lines.append(f"| {split} | {role}: {Path(r['model']).name} | {r.get('trained_on') or '?'} | {fq} | "
                         + " | ".join(format_number(m.get(c)) for c in cols) + " |")
    return head + "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict, t_start: float) -> None:
    """Write summary.json and summary.md (the numbers so far and the settings)."""
    summary["total_s"] = time.perf_counter() - t_start
    lim = summary["limit"]
    scfg = summary["sampler"]
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", "# TOFU full protocol\n\n"
               f"- model {summary['model']}; device {summary['device']}; dtype {summary['dtype'] or 'checkpoint'}; "
               f"attention {summary['attn_impl']}; total {summary['total_s']:.0f} s\n"
               f"- {'every row' if lim is None else f'{lim} rows per set (smoke test)'}; n_mc {summary['n_mc']}; "
               f"seeds {summary['seeds']}; greedy generation of {summary['gen_length']} tokens "
               f"({scfg['steps']} steps, blocks of {scfg['block_length']})"
               + (f"; overrides: {', '.join(summary['protocol_overrides'])}" if summary["protocol_overrides"] else "")
               + "\n- numbers are means over seeds; FQ is never averaged: the pooled KS p-value (per-row "
               "geometric-mean TR over seeds) and the per-seed p-values\n\n" + markdown_summary(summary))


def parse_references(items) -> dict:
    """["forget05=PATH", ...] -> {split: PATH}; a clear error for a bad split, a repeated split or a
    folder that does not exist."""
    refs = {}
    for item in items or []:
        split, sep, path = item.partition("=")
        if not sep or split not in tofu.FORGET_SPLITS:
            raise SystemExit(f"--reference {item!r}: expected SPLIT=FOLDER with SPLIT one of {tofu.FORGET_SPLITS}")
        if split in refs:
            raise SystemExit(f"--reference: {split} given twice")
        if not (Path(path) / "config.json").is_file():
            raise SystemExit(f"--reference {item!r}: {path} is not a model folder (no config.json)")
        refs[split] = path
    return refs


class Stop(Exception):
    """SIGTERM (or SIGINT) received: stop the evaluation in flight, keep what finished."""


def _stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/full_protocol")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="the evaluated target (default: packaged)")
    ap.add_argument("--splits", nargs="+", default=list(tofu.FORGET_SPLITS), choices=tofu.FORGET_SPLITS)
    ap.add_argument("--no-references", action="store_true", help="evaluate the target only (FQ None)")
    ap.add_argument("--reference", action="append", default=[], metavar="SPLIT=FOLDER",
                    help="the FQ reference of SPLIT (repeatable; default: the packaged one); its recorded "
                         "retain set (timerome_reference.json) must match SPLIT's unless --reference-override")
    ap.add_argument("--reference-override", action="store_true",
                    help="accept a --reference not recorded as trained on the split's retain set (the summary "
                         "records reference_override: true)")
    ap.add_argument("--dtype", default=None, choices=(None, "float32", "bfloat16"))
    ap.add_argument("--attn-impl", default="xla", choices=("xla", "cudnn"))
    ap.add_argument("--batch-size", type=int, default=64, help="ELBO batch (x n_mc sequences per forward)")
    ap.add_argument("--gen-batch-size", type=int, default=256, help="generation batch")
    ap.add_argument("--budget-s", type=float, default=540.0, help="start no evaluation after this many seconds")
    ap.add_argument("--limit", type=int, default=None, help="smoke tests only: rows per set (spread)")
    ap.add_argument("--n-mc", type=int, default=None, help="smoke tests only")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="smoke tests only")
    ap.add_argument("--gen-length", type=int, default=None, help="smoke tests only")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    explicit = parse_references(a.reference)
    if explicit and a.no_references:
        raise SystemExit("--reference and --no-references exclude each other")
    try:  # check every explicit reference before any work
        chosen = {s: resolve_reference(s, explicit.get(s, "auto"), a.reference_override) for s in a.splits}
    except ReferenceMismatchError as e:
        raise SystemExit(f"error: {e}") from None
    for s in explicit:
        if s not in a.splits:
            raise SystemExit(f"--reference {s}=...: {s} is not among --splits {a.splits}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [k for k in ("limit", "n_mc", "seeds", "gen_length") if getattr(a, k) is not None]
    n_mc = a.n_mc or FULL.n_mc
    seeds = list(a.seeds or FULL.seeds)
    limit = a.limit or FULL.limit
    models = {}

    def load(path):
        if path not in models:
            models[path] = load_model_with_tokenizer(path, a.dtype, a.attn_impl)
        return models[path]

    params, cfg, tok = load(a.model)
    gl = a.gen_length or resolve_gen_length(FULL, cfg, tok)
    scfg = sampler_for(FULL, gl)
    kw = dict(n_mc=n_mc, seeds=seeds, limit=limit, batch_size=a.batch_size, gen_batch_size=a.gen_batch_size,
              gen_length=gl, sampler=scfg,
              progress=not a.no_progress, metrics=ev.DEFAULT_METRICS)
    summary = {"protocol": "full", "protocol_overrides": overrides, "n_mc": n_mc, "seeds": seeds, "limit": limit,
               "gen_length": gl, "tofu_gen_length": 200, "sampler": dataclasses.asdict(scfg),
               "model": a.model, "dtype": a.dtype, "attn_impl": a.attn_impl, "batch_size": a.batch_size,
               "gen_batch_size": a.gen_batch_size,
               "device": str(jax.devices()[0]), "jax": jax.__version__, "host": platform.node(),
               "budget_s": a.budget_s, "splits": {}}

    last = [0.0]  # seconds of the latest evaluation: the next one (a larger or equal split) takes about as long

    def over_budget():
        return time.perf_counter() - t_start + 1.3 * last[0] > a.budget_s

    def run(path, split, retain_tr, stem, extra):
        t0 = time.perf_counter()
        p, c, t = load(path)
        res = ev.evaluate(p, c, t, split, retain_tr=retain_tr, **kw)
        res.update(model=str(path), protocol="full", protocol_overrides=overrides, **extra)
        write_json(out / f"{stem}.json", res)
        last[0] = time.perf_counter() - t0
        return res, last[0]

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        for split in a.splits:
            entry = summary["splits"][split] = {}
            ref = chosen[split] if not a.no_references else \
                {"model": None, "message": "--no-references", "reference_override": False}
            ref["explicit"] = split in explicit
            entry["reference_choice"] = ref
            results, retain_tr = {}, None
            if ref["model"] is not None:
                if over_budget():
                    entry["reference"] = {"model": ref["model"], "skipped": "budget"}
                else:
                    rres, secs = run(ref["model"], split, None, f"{split}_reference",
                                     {"reference_of": split, "trained_on": ref["retain_split"]})
                    retain_tr = forget_tr_by_index(rres)
                    folder = Path(ref["model"]).name
                    tr_path = out / "references" / folder / "reference" / retain_tr_cache_path(".", split, n_mc).name
                    write_json(tr_path, {"kind": "timerome_retain_forget_tr", "model": ref["model"] if ref["explicit"] else f"packaged:{folder}",
                                         "split": split, "n_mc": n_mc, "estimator": "auto", "limit": limit,
                                         "row_selection": rres["row_selection"], "retain_split": ref["retain_split"],
                                         "by_seed": retain_tr})
                    entry["reference"] = {"model": ref["model"], "trained_on": ref["retain_split"], "seconds": secs,
                                          "metrics": summarise(rres), "tr_file": str(tr_path)}
                    results[f"reference ({ref['retain_split']})"] = rres
            if over_budget():
                entry["target"] = {"model": a.model, "skipped": "budget"}
                continue
            tres, secs = run(a.model, split, retain_tr, f"{split}_target",
                             {"reference": ref, "reference_override": bool(ref.get("reference_override"))})
            entry["target"] = {"model": a.model, "trained_on": "full", "seconds": secs, "metrics": summarise(tres)}
            results = {"target": tres, **results}
            write_report(compare(results, reference="target"), out, split, reference="target",
                         notes=protocol_notes(tres))
            write_summary(out, summary, t_start)  # after every split: a run stopped later keeps these
            print(f"[full_protocol] {split}: target {secs:.0f} s, FQ pooled "
                  f"{format_number(entry['target']['metrics'].get('forget_quality_pooled'))}", flush=True)
    except Stop as e:  # whatever finished is on disk; say where it stopped
        summary["stopped"] = {"signal": str(e), "at_s": round(time.perf_counter() - t_start, 1)}
        print(f"[full_protocol] stopped by {e}; writing the summary of what finished", flush=True)
    write_summary(out, summary, t_start)
    print(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
