"""Table III on the packaged model: install time and ForgetLP of the edit memory for |F| = 1 .. 400.

    PYTHONPATH=$PWD python experiments/scaling.py --out results/scaling --sizes 1 10 40 100 200 400

The memory is built from the first |F| facts of forget10 (400 rows) at the TIE coordinate of
docs/demo/demo.json, for alpha 0.5 and 1 (q = 2, lambda = the default rule). install_s is the
second of two installs (the first includes compilation; both are recorded). ForgetLP / RetainLP /
RealAuth are evaluated on the first min(|F|, --eval-rows) rows of each set (so for |F| <= 40 every
scored forget row is an edited one), paired with no_edit on the same rows, seeds and MC masks.
Writes <out>/scaling.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timerome_jax import pipeline as pl  # noqa: E402
from timerome_jax.backbone.checkpoint import load_model_with_tokenizer  # noqa: E402
from timerome_jax.backbone.config import module_id  # noqa: E402
from timerome_jax.backbone.intervene import Intervene  # noqa: E402
from timerome_jax.io import write_json, write_text  # noqa: E402
from timerome_jax.method import facts as F  # noqa: E402
from timerome_jax.method.trace import Coordinate  # noqa: E402
from timerome_jax.tofu import evaluate as ev  # noqa: E402
from timerome_jax.tofu.models import DEFAULT_MODEL  # noqa: E402
from timerome_jax.tofu.report import compare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--out", default="results/scaling")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 40, 100, 200, 400])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--q", type=int, default=2)
    ap.add_argument("--eval-rows", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--n-mc", type=int, default=4)
    ap.add_argument("--coord-json", default=str(ROOT / "docs/demo/demo.json"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    params, cfg, tok = load_model_with_tokenizer(a.model)
    facts = F.load_facts(tok, "forget10", tok.eos_id)
    demo = json.loads(Path(a.coord_json).read_text())["coordinate"]
    coord = Coordinate(int(demo["layer"]), int(demo["step"]), module_id(demo["module"]))
    kw = dict(metrics=("forget_lp", "retain_lp", "ra_lp"), n_mc=a.n_mc, seeds=a.seeds, progress=False)
    base = {}
    rows = []
    for n in a.sizes:
        lim = min(n, a.eval_rows)
        if lim not in base:
            base[lim] = ev.evaluate(params, cfg, tok, "forget10", limit=lim, batch_size=lim, **kw)
        res = {"no_edit": base[lim]}
        times = {}
        for alpha in a.alphas:
            t0 = time.perf_counter()
            pl.install(params, cfg, tok, facts[:n], coord, alpha=alpha, q=a.q)
            first = time.perf_counter() - t0
            mem, info = pl.install(params, cfg, tok, facts[:n], coord, alpha=alpha, q=a.q)
            times[alpha] = {"install_s": info["install_s"], "capture_s": info["capture_s"], "solve_s": info["solve_s"],
                            "first_install_s": first, "lam": info["lam"]}
            res[f"a={alpha:g}"] = ev.evaluate(params, cfg, tok, "forget10", limit=lim, batch_size=lim,
                                              intervene=Intervene(edit=mem), **kw)
        cmp = compare(res, reference="no_edit")
        rec = {"F": n, "eval_rows": lim, "times": times,
               "rows": cmp}
        rows.append(rec)
        print(n, {k: v["install_s"] for k, v in times.items()},
              {(r["method"], r["metric"]): round(r["mean"], 2) for r in cmp}, flush=True)
        write_json(out / "scaling.json", {"coordinate": demo, "budget": vars(a), "sizes": rows})
    hdr = "| \\|F\\| | eval rows | " + " | ".join(f"ForgetLP a={x:g}" for x in a.alphas) + \
          " | no_edit ForgetLP | RetainLP a=1 (Δ) | RealAuth a=1 (Δ) | install s a=1 (capture + solve) |"
    lines = ["# Table III on the packaged model", "", f"Coordinate {demo}; forget10 facts; {len(a.seeds)} seeds, "
             f"n_mc {a.n_mc}; mean [95% bootstrap CI]; Δ vs no_edit paired.", "", hdr,
             "|" + "---|" * (hdr.count("|") - 1)]
    for rec in rows:
        by = {(r["method"], r["metric"]): r for r in rec["rows"]}
        cell = lambda m, k: f"{by[(m, k)]['mean']:.2f} [{by[(m, k)]['ci_lo']:.2f}, {by[(m, k)]['ci_hi']:.2f}]"
        dcell = lambda m, k: f"{by[(m, k)]['mean']:.2f} (Δ {by[(m, k)]['delta']:+.2f}{by[(m, k)]['sig']})"
        a1 = f"a={max(a.alphas):g}"
        t = rec["times"][max(a.alphas)]
        lines.append(f"| {rec['F']} | {rec['eval_rows']} | " + " | ".join(cell(f"a={x:g}", "forget_lp") for x in a.alphas)
                     + f" | {cell('no_edit', 'forget_lp')} | {dcell(a1, 'retain_lp')} | {dcell(a1, 'ra_lp')} | "
                     f"{t['install_s']:.2f} ({t['capture_s']:.2f} + {t['solve_s']:.3f}) |")
    write_text(out / "scaling.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
