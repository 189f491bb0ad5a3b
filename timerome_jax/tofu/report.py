"""Tables of several methods' TOFU results: mean, 95% bootstrap CI over seeds and a paired t-test
against a reference method on shared seeds (the paper's statistical protocol), as JSON + Markdown.

Forget Quality is a KS p-value and is never averaged over seeds (TOFU reports one p-value from one
set of truth ratios): its rows carry the per-seed p-values and the pooled p-value of `evaluate`'s
"forget_quality_pooled" (`metrics.pooled_forget_quality`), and no mean, CI or t-test."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from timerome_jax.io import write_json, write_text
from timerome_jax.tofu import metrics as M


P_VALUE_METRICS = ("forget_quality",)  # p-values: per seed + pooled, never a mean over seeds
POOLED_KEY = "forget_quality_pooled"


def _per_seed_values(res) -> dict[str, dict[int, float]]:
    """{metric: {seed: value}} from an `evaluate` result or such a mapping already."""
    if isinstance(res, Mapping) and "per_seed" in res and "seeds" in res:
        out: dict[str, dict[int, float]] = {}
        for m, vals in res["metrics"].items():
            out[m] = {int(s): v for s, v in zip(res["seeds"], vals) if v is not None}
        return out
    if isinstance(res, Mapping):
        return {m: {int(s): v for s, v in vs.items() if v is not None} for m, vs in res.items()
                if isinstance(vs, Mapping)}
    raise ValueError(f"cannot read per-seed metric values from a {type(res).__name__}")


def _pooled_fq(res) -> Optional[float]:
    """The pooled Forget Quality of a result ({"agg_value": p} from `evaluate`, or a bare number)."""
    v = res.get(POOLED_KEY) if isinstance(res, Mapping) else None
    return v.get("agg_value") if isinstance(v, Mapping) else v


def compare(results_by_method: Mapping[str, Any], reference: str = "no_edit", n_resamples: int = 2000,
            level: float = 0.95, seed: int = 0) -> list[dict]:
    """Per (method, metric) rows: mean, std over seeds, bootstrap CI, and a paired t-test vs `reference`.

    results_by_method: {method: evaluate() result, or {metric: {seed: value}}}.
    Row keys: method, metric, n, seeds, values (per seed), mean, std (ddof=1; None for n=1), ci_lo,
    ci_hi, and vs the reference on the seeds both have: n_paired, delta (mean a − ref), delta_ci_lo,
    delta_ci_hi, t, p, sig ('*' p<0.05, '**' p<0.01, '***' p<1e-4). Values that are None are skipped.
    forget_quality (a p-value) rows instead have mean/std/CI/delta None, aggregation "pooled", and
    pooled = the result's "forget_quality_pooled" (None when the result has none).
    """
    vals = {m: _per_seed_values(r) for m, r in results_by_method.items()}
    pooled = {m: _pooled_fq(r) for m, r in results_by_method.items()}
    if reference not in vals:
        raise ValueError(f"reference method {reference!r} is not among {list(vals)}")
    metric_order = list(dict.fromkeys(k for v in vals.values() for k in v))
    rows = []
    for method, per in vals.items():
        for metric in metric_order:
            by_seed = per.get(metric, {})
            if not by_seed:
                continue
            seeds = sorted(by_seed)
            x = np.array([by_seed[s] for s in seeds], np.float64)
            row = {"method": method, "metric": metric, "n": len(x), "seeds": seeds, "values": x.tolist(),
                   "mean": None, "std": None, "ci_lo": None, "ci_hi": None,
                   "n_paired": None, "delta": None, "delta_ci_lo": None, "delta_ci_hi": None,
                   "t": None, "p": None, "sig": ""}
            if metric in P_VALUE_METRICS:
                row.update(aggregation="pooled", pooled=pooled[method])
                rows.append(row)
                continue
            lo, hi = M.bootstrap_ci(x, n_resamples, level, seed)
            row.update(mean=float(x.mean()), std=float(x.std(ddof=1)) if len(x) > 1 else None, ci_lo=lo, ci_hi=hi)
            ref = vals[reference].get(metric, {})
            shared = [s for s in seeds if s in ref]
            if method != reference and shared:
                a = np.array([by_seed[s] for s in shared])
                b = np.array([ref[s] for s in shared])
                t, p = M.paired_t(a, b)
                dlo, dhi = M.diff_ci(a, b, n_resamples, level, seed)
                row.update(n_paired=len(shared), delta=float((a - b).mean()), delta_ci_lo=dlo, delta_ci_hi=dhi,
                           t=None if math.isnan(t) else t, p=None if math.isnan(p) else p, sig=M.significance(p))
            rows.append(row)
    return rows


def format_number(x, nd=3) -> str:
    """A table cell: fixed point with `nd` decimals, scientific for tiny/huge values, – for None."""
    if x is None:
        return "–"
    ax = abs(x)
    if ax != 0 and (ax < 1e-3 or ax >= 1e5):
        return f"{x:.2e}"
    return f"{x:.{nd}f}"


def markdown_table(rows: list[dict], reference: Optional[str] = None) -> str:
    """Two Markdown tables: mean ± std [95% CI] per method × metric; Δ vs `reference` with p."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    cell = {(r["method"], r["metric"]): r for r in rows}
    head = "| method | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    t1, t2 = head, head
    for m in methods:
        c1, c2 = [], []
        for k in metrics:
            r = cell.get((m, k))
            if r is None:
                c1.append("")
                c2.append("")
                continue
            if r["metric"] in P_VALUE_METRICS:
                c1.append(f"{format_number(r['pooled'])} (per seed: {', '.join(format_number(v) for v in r['values'])})")
                c2.append("ref" if m == reference else "not averaged")
                continue
            sd = f" ± {format_number(r['std'])}" if r["std"] is not None else ""
            c1.append(f"{format_number(r['mean'])}{sd} [{format_number(r['ci_lo'])}, {format_number(r['ci_hi'])}]")
            c2.append(f"{format_number(r['delta'])}{r['sig']} [{format_number(r['delta_ci_lo'])}, {format_number(r['delta_ci_hi'])}] "
                      f"(p={format_number(r['p'])}, n={r['n_paired']})"
                      if r["delta"] is not None else ("ref" if m == reference else "–"))
        t1 += f"| {m} | " + " | ".join(c1) + " |\n"
        t2 += f"| {m} | " + " | ".join(c2) + " |\n"
    fq = [k for k in metrics if k in P_VALUE_METRICS]
    note = (f"\n{', '.join(fq)}: a KS p-value, never averaged over seeds. The cell is the pooled p-value "
            "(one ks_2samp on the per-row geometric mean of the truth ratio over seeds, against the "
            "reference's) and, in brackets, the p-value of each seed; – = no pooled value.\n" if fq else "")
    return ("Mean ± std over seeds [95% bootstrap CI, 2000 resamples]\n\n" + t1 + note +
            "\nPaired difference vs reference on shared seeds: Δ [95% bootstrap CI of Δ] (two-tailed paired t p; "
            "* p<0.05, ** p<0.01, *** p<1e-4)\n\n" + t2)


def write_report(rows: list[dict], out_dir, name: str, reference: Optional[str] = None,
                 notes: str = "") -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.json` (the rows) and `<out_dir>/<name>.md` atomically; return both paths.
    reference: the method marked "ref" in the Δ table (default: the one whose rows have no delta).
    notes: Markdown put under the title (e.g. the protocol and the FQ reference)."""
    if reference is None:
        refs = {r["method"] for r in rows} - {r["method"] for r in rows if r["n_paired"] is not None}
        reference = next(iter(refs)) if len(refs) == 1 else None
    out = Path(out_dir)
    js, md = out / f"{name}.json", out / f"{name}.md"
    write_json(js, rows)
    write_text(md, f"# {name}\n\n" + (notes.rstrip() + "\n\n" if notes else "") + markdown_table(rows, reference))
    return js, md
