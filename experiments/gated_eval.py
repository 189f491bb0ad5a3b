"""The gated edit memory's "done when" measurement (issue 9): Δ vs no_edit with paired 95% CIs.

    PYTHONPATH=$PWD python experiments/gated_eval.py --split forget01 --out results/gated_eval

Packaged target model; the memory holds every fact of the split at (layer, resid, k* = -1); methods:
no_edit, paper Eq. 12 and the gated memory at the same (alpha, q). Log-probabilities
(forget/retain/real-author/world-fact LP) on `--limit` rows of each set (forget01 has 40;
retain_perturbed's first 200 rows are 10 authors), `--seeds` MC-mask seeds, `--n-mc` samples.
Optionally (--rouge) greedy generation ROUGE-L recall on forget and retain (`--rouge-limit` rows,
seed 0) with a few examples.

Two CIs per Δ: `tofu.report.compare` (paired bootstrap over seeds) and a paired bootstrap over rows
(each row's value averaged over seeds; 2000 resamples), which is what varies most at 3 seeds.
Writes <out>/<name>.json and <name>.md (and the evaluate() outputs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from timerome_jax import pipeline as pl
from timerome_jax.backbone.checkpoint import load_model_with_tokenizer
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.io import write_json, write_text
from timerome_jax.method import facts as F
from timerome_jax.method import gate as gate_lib
from timerome_jax.method import memory as mem_lib
from timerome_jax.method.trace import Coordinate
from timerome_jax.tofu import evaluate as ev
from timerome_jax.tofu.models import DEFAULT_MODEL
from timerome_jax.tofu.report import compare

LP = ("forget_lp", "retain_lp", "ra_lp", "wf_lp")


def row_values(res: dict, metric: str) -> dict:
    """{row index: value averaged over seeds} of one evaluate() result."""
    per = {}
    for s, d in res["per_seed"].items():
        for i, v in (d.get(metric, {}).get("value_by_index") or {}).items():
            v = v.get("ll", v.get("rouge_recall")) if isinstance(v, dict) else v
            if v is not None:
                per.setdefault(str(i), []).append(float(v))
    return {i: float(np.mean(v)) for i, v in per.items()}


def paired_row_ci(a: dict, b: dict, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Δ = mean(a - b) over shared rows with a paired bootstrap 95% CI over rows."""
    keys = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] for k in keys])
    if d.size == 0:
        return {"n_rows": 0, "delta": None, "lo": None, "hi": None}
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, (n_resamples, d.size))].mean(1)
    return {"n_rows": int(d.size), "delta": float(d.mean()), "lo": float(np.percentile(boots, 2.5)),
            "hi": float(np.percentile(boots, 97.5))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="forget01")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--q", type=int, default=4)
    ap.add_argument("--percentile", type=float, default=gate_lib.DEFAULT_PERCENTILE,
                    help="token-gate percentile (default: token gate off, the sequence latch alone)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-mc", type=int, default=8)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=40)
    ap.add_argument("--methods", nargs="+", default=["no_edit", "eq12", "gated"])
    ap.add_argument("--skip-subjectless", action="store_true", help="leave facts without a subject out of the memory")
    ap.add_argument("--tau", type=float, default=None, help="token-gate threshold (overrides --percentile; "
                    "1 = the token gate never fires, the sequence latch alone)")
    ap.add_argument("--no-latch", action="store_true", help="token gate alone (no sequence latch: tau_seq = +inf)")
    ap.add_argument("--rouge", action="store_true")
    ap.add_argument("--no-edit-json", default=None, help="reuse a no_edit result written by an earlier run with the "
                    "same split/seeds/n_mc/limit (its <name>_no_edit.json) instead of recomputing it")
    ap.add_argument("--no-lp", action="store_true", help="ROUGE only (with --rouge): skip the log-probabilities")
    ap.add_argument("--rouge-limit", type=int, default=40)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--out", default="results/gated_eval")
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = a.name or f"{a.split}_L{a.layer}_a{a.alpha:g}_q{a.q}"
    t0 = time.time()
    params, cfg, tok = load_model_with_tokenizer(DEFAULT_MODEL)
    facts = F.load_facts(tok, a.split, cfg.eos_token_id)
    if a.skip_subjectless:
        facts = [f for f in facts if f.key_source == "subject"]
    coord = Coordinate(a.layer, -1, 0)
    mem, info = pl.install(params, cfg, tok, facts, coord, a.alpha, a.q, gate=True, percentile=a.percentile,
                           latch=not a.no_latch)
    if a.tau is not None:
        mem = mem_lib.with_gate(mem, tau=a.tau)
        info["tau"], info["percentile"] = a.tau, None
    methods = {"no_edit": None, "eq12": Intervene(edit=mem_lib.with_gate(mem, on=False)),
               "gated": Intervene(edit=mem)}
    methods = {k: v for k, v in methods.items() if k in a.methods}
    results = {}
    if a.no_edit_json:
        results["no_edit"] = json.loads(Path(a.no_edit_json).read_text())
        methods.pop("no_edit", None)
    for m, iv in (() if a.no_lp else methods.items()):
        print(f"[gated_eval] {m} ...", flush=True)
        results[m] = ev.evaluate(params, cfg, tok, a.split, metrics=LP, n_mc=a.n_mc, seeds=a.seeds, intervene=iv,
                                 limit=a.limit, batch_size=a.batch_size, progress=False)
        write_json(out / f"{name}_{m}.json", results[m])
    rows = compare(results, reference="no_edit") if results else []
    deltas = {}
    for m in results:
        if m == "no_edit":
            continue
        deltas[m] = {k: paired_row_ci(row_values(results[m], k), row_values(results["no_edit"], k)) for k in LP}
    summary = {"split": a.split, "coordinate": info["coordinate"], "install": info, "alpha": a.alpha, "q": a.q,
               "percentile": a.percentile, "latch": not a.no_latch, "seeds": a.seeds, "n_mc": a.n_mc, "limit": a.limit,
               "n_facts": len(facts), "skip_subjectless": a.skip_subjectless,
               "n_rows": {k: len(results["no_edit"]["per_seed"][str(a.seeds[0])][k]["value_by_index"])
                          if "no_edit" in results else 0 for k in LP},
               "compare_seed_bootstrap": rows, "delta_row_bootstrap": deltas}
    if a.rouge:
        gen = {}
        for m in ("no_edit", "gated"):
            print(f"[gated_eval] rouge {m} ...", flush=True)
            r = ev.evaluate(params, cfg, tok, a.split, metrics=("forget_rouge", "retain_rouge"), n_mc=1, seeds=[0],
                            intervene=Intervene(edit=mem) if m == "gated" else None,
                            limit=a.rouge_limit, batch_size=a.batch_size, gen_length=a.gen_length, progress=False)
            write_json(out / f"{name}_rouge_{m}.json", r)
            gen[m] = {k: r["metrics"][k][0] for k in ("forget_rouge", "retain_rouge")}
            g = r.get("generations") or {}
            gen[m]["examples"] = g.get("shared") or g.get("0") or {}
        summary["rouge"] = {m: {k: v for k, v in g.items() if k != "examples"} for m, g in gen.items()}
        summary["rouge_examples"] = _examples(gen)
    summary["wall_s"] = time.time() - t0
    write_json(out / f"{name}.json", summary)
    write_text(out / f"{name}.md", _markdown(summary))
    print(json.dumps({k: summary[k] for k in ("split", "alpha", "q", "delta_row_bootstrap", "wall_s")}, indent=1))
    return summary


def _examples(gen: dict, k: int = 4) -> list:
    ex = []
    g0, g1 = gen["no_edit"].get("examples") or {}, gen["gated"].get("examples") or {}
    for which in ("forget", "retain"):
        a, b = g0.get(which) or [], g1.get(which) or []
        for x, y in list(zip(a, b))[:k]:
            ex.append({"set": which, "no_edit": x, "gated": y})
    return ex


def _fmt(d):
    return "n/a" if d["delta"] is None else f"{d['delta']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def _markdown(s: dict) -> str:
    lines = [f"# Gated edit memory: {s['split']} ({s['n_facts']} facts), layer {s['coordinate']['layer']}, "
             f"alpha {s['alpha']:g}, q {s['q']}, percentile {s['percentile']}",
             "", f"seeds {s['seeds']}, n_mc {s['n_mc']}, rows per set {s['n_rows']}; tau = {s['install'].get('tau')}",
             "", "Δ vs no_edit, mean over rows (seed-averaged), paired bootstrap 95% CI over rows:", "",
             "| method | " + " | ".join(LP) + " |", "|---|" + "---|" * len(LP)]
    for m, d in s["delta_row_bootstrap"].items():
        lines.append(f"| {m} | " + " | ".join(_fmt(d[k]) for k in LP) + " |")
    lines += ["", "Δ vs no_edit with `tofu.report.compare` (bootstrap over seeds):", "",
              "| method | metric | mean | Δ | Δ CI |", "|---|---|---|---|---|"]
    for r in s["compare_seed_bootstrap"]:
        d = "" if r["delta"] is None else f"{r['delta']:+.2f}"
        ci = "" if r["delta_ci_lo"] is None else f"[{r['delta_ci_lo']:+.2f}, {r['delta_ci_hi']:+.2f}]"
        lines.append(f"| {r['method']} | {r['metric']} | {r['mean']:.2f} | {d} | {ci} |")
    if "rouge" in s:
        lines += ["", "ROUGE-L recall (greedy, seed 0):", "", "| method | forget | retain |", "|---|---|---|"]
        for m, g in s["rouge"].items():
            lines.append(f"| {m} | {g['forget_rouge']:.3f} | {g['retain_rouge']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
    sys.exit(0)
