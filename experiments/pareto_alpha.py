"""alpha sweep of the paper's Eq. 12 and the gated memory: -ΔForgetLP against ΔRetainLP (Pareto figure).

    PYTHONPATH=$PWD python experiments/pareto_alpha.py --out results/pareto_alpha --docs

Packaged target, forget01 memory (all 40 facts) at (layer, resid, k* = -1), built once by
`pipeline.install(gate=True)` (the library default: sequence latch, no per-token gate;
`--percentile P` adds the token gate); each point is the same memory at another alpha (data only),
gate on ("gated") or off (the paper's Eq. 12, bit for bit). Rows: all 40 forget01 rows and `--limit`
retain_perturbed rows spread over its 20 authors. Δ vs no_edit per row (seed-averaged), paired
bootstrap 95% CI over rows (error bars in both axes, shaded band along each curve). Writes
<out>/pareto_alpha.{json,md,png}; --docs also copies the JSON and Markdown to docs/results/ and the
PNG to docs/figures/.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gated_eval import paired_row_ci, row_values  # noqa: E402

from timerome_jax import pipeline as pl  # noqa: E402
from timerome_jax.backbone.checkpoint import load_model_with_tokenizer  # noqa: E402
from timerome_jax.backbone.intervene import Intervene  # noqa: E402
from timerome_jax.io import atomic_path, write_json, write_text  # noqa: E402
from timerome_jax.method import facts as F  # noqa: E402
from timerome_jax.method import gate as gate_lib  # noqa: E402
from timerome_jax.method import memory as mem_lib  # noqa: E402
from timerome_jax.method.trace import Coordinate  # noqa: E402
from timerome_jax.tofu import evaluate as ev  # noqa: E402
from timerome_jax.tofu.models import DEFAULT_MODEL  # noqa: E402

MET = ("forget_lp", "retain_lp")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--q", type=int, default=4)
    ap.add_argument("--alphas-eq12", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0, 2.0])
    ap.add_argument("--alphas-gated", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--percentile", type=float, default=gate_lib.DEFAULT_PERCENTILE,
                    help="token-gate percentile (default: none, the latch alone)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-mc", type=int, default=8)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--out", default="results/pareto_alpha")
    ap.add_argument("--docs", action="store_true", help="copy JSON/MD to docs/results/, PNG to docs/figures/")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    params, cfg, tok = load_model_with_tokenizer(DEFAULT_MODEL)
    facts = F.load_facts(tok, "forget01", cfg.eos_token_id)
    mem, info = pl.install(params, cfg, tok, facts, Coordinate(a.layer, -1, 0), 1.0, a.q, gate=True,
                           percentile=a.percentile)
    kw = dict(metrics=MET, n_mc=a.n_mc, seeds=a.seeds, limit=a.limit, batch_size=40, progress=False)
    base = ev.evaluate(params, cfg, tok, "forget01", **kw)
    ref = {k: row_values(base, k) for k in MET}
    points = []
    for method, alphas in (("paper_eq12", a.alphas_eq12), ("gated", a.alphas_gated)):
        for alpha in alphas:
            m = mem_lib.with_gate(dataclasses.replace(mem, alpha=np.float32(alpha)), on=method == "gated")
            r = ev.evaluate(params, cfg, tok, "forget01", intervene=Intervene(edit=m), **kw)
            d = {k: paired_row_ci(row_values(r, k), ref[k]) for k in MET}
            points.append({"method": method, "alpha": alpha, **d})
            print(f"[pareto] {method} a={alpha:g}: ΔF {d['forget_lp']['delta']:+.2f} ΔR {d['retain_lp']['delta']:+.3f}",
                  flush=True)
    summary = {"layer": a.layer, "q": a.q, "tau": info["tau"], "tau_seq": info["tau_seq"],
               "token_gate": bool(mem.gate.token), "percentile": a.percentile, "seeds": a.seeds, "n_mc": a.n_mc,
               "limit": a.limit, "rows": {"forget": len(ref["forget_lp"]), "retain": len(ref["retain_lp"])},
               "points": points, "wall_s": time.time() - t0}
    write_json(out / "pareto_alpha.json", summary)
    lines = [f"α sweep, forget01 memory, layer {a.layer}, q {a.q}; gated = "
             f"{'latch + token gate at ' + format(a.percentile, 'g') if a.percentile else 'sequence latch, no token gate'}"
             f" (τ_seq {info['tau_seq']:.3f}); {summary['rows']['forget']} forget01 + {summary['rows']['retain']} "
             f"retain_perturbed rows, seeds {a.seeds}, n_mc {a.n_mc}; paired bootstrap 95% CI over rows", "",
             "| method | alpha | ΔForgetLP [95% CI] | ΔRetainLP [95% CI] |", "|---|---|---|---|"]
    for p in points:
        f, r = p["forget_lp"], p["retain_lp"]
        lines.append(f"| {p['method']} | {p['alpha']:g} | {f['delta']:+.2f} [{f['lo']:+.2f}, {f['hi']:+.2f}] | "
                     f"{r['delta']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] |")
    write_text(out / "pareto_alpha.md", "\n".join(lines) + "\n")
    _plot(points, out / "pareto_alpha.png", summary)
    if a.docs:
        for n, d in (("pareto_alpha.json", "docs/results"), ("pareto_alpha.md", "docs/results"),
                     ("pareto_alpha.png", "docs/figures")):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / n, Path(d) / n)
    return summary


def _plot(points, path, s):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, color in (("paper_eq12", "tab:red"), ("gated", "tab:blue")):
        ps = [p for p in points if p["method"] == method]
        x = np.array([p["retain_lp"]["delta"] for p in ps])
        y = -np.array([p["forget_lp"]["delta"] for p in ps])
        xe = np.array([[p["retain_lp"]["delta"] - p["retain_lp"]["lo"], p["retain_lp"]["hi"] - p["retain_lp"]["delta"]]
                       for p in ps]).T
        ye = np.array([[p["forget_lp"]["hi"] - p["forget_lp"]["delta"], p["forget_lp"]["delta"] - p["forget_lp"]["lo"]]
                       for p in ps]).T
        label = method if method == "paper_eq12" else ("gated (latch + token gate)" if s["token_gate"]
                                                      else "gated (latch default)")
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o-", color=color, capsize=3, label=label)
        ax.fill_between(x, y - ye[0], y + ye[1], color=color, alpha=0.15)
        for p, xi, yi in zip(ps, x, y):
            ax.annotate(f"α={p['alpha']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.axvline(-0.5, ls=":", c="gray")
    ax.set_xlabel("ΔRetainLP vs no_edit (nats, higher = better)")
    ax.set_ylabel("−ΔForgetLP vs no_edit (nats, higher = more forgotten)")
    ax.set_title(f"forget01, layer {s['layer']}, q {s['q']}: α sweep, gated = "
                 f"{'latch' if not s['token_gate'] else 'latch + token gate'} (95% CI over rows)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
