"""Ablation sweep of the edit memory on the packaged target model: for each layer (resid) and each
(alpha, q, lambda-scale), ForgetLP and RetainLP (MC ELBO, same masks) relative to no_edit.

    python experiments/sweep_edit.py --out results/sweep --layers 0 1 2 3 4 --alphas 0.5 1 2

Writes sweep.json and a Markdown table. Small by default (first --limit rows, one seed).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timerome_jax.tofu import evaluate as ev  # noqa: E402
from timerome_jax.tofu.models import DEFAULT_MODEL  # noqa: E402
from timerome_jax.method import facts as F  # noqa: E402
from timerome_jax import pipeline as pl  # noqa: E402
from timerome_jax.backbone.checkpoint import load_model  # noqa: E402
from timerome_jax.backbone.intervene import Intervene  # noqa: E402
from timerome_jax.io import write_json, write_text  # noqa: E402
from timerome_jax.method.trace import Coordinate  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--split", default="forget01")
    ap.add_argument("--out", default="results/sweep")
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--module", default="resid")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 2.0])
    ap.add_argument("--qs", type=int, nargs="+", default=[2])
    ap.add_argument("--lam-rel", type=float, nargs="+", default=[0.1])
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--n-mc", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    a = ap.parse_args(argv)
    params, cfg, tok = load_model(a.model)
    facts = F.load_facts(tok, a.split, tok.eos_id)
    kw = dict(metrics=("forget_lp", "retain_lp", "ra_lp"), n_mc=a.n_mc, seeds=a.seeds, limit=a.limit,
              batch_size=a.limit, progress=False)
    base = ev.evaluate(params, cfg, tok, a.split, **kw)["metrics"]
    ref = {k: float(np.mean(v)) for k, v in base.items()}
    print("no_edit", ref, flush=True)
    rows = []
    from timerome_jax.backbone.config import MODULES

    for layer in a.layers:
        coord = Coordinate(layer, -1, MODULES.index(a.module))
        mem, info = pl.install(params, cfg, tok, facts, coord, alpha=1.0, q=2)
        u2 = info["lam"] / 0.1
        # the capture depends on the layer only: one install per lam, alpha and q are data
        by_lam = {lr: mem if lr == 0.1 else pl.install(params, cfg, tok, facts, coord, alpha=1.0, q=2,
                                                       lam=lr * u2)[0] for lr in a.lam_rel}
        for alpha, q, lr in itertools.product(a.alphas, a.qs, a.lam_rel):
            m = pl.with_hparams(by_lam[lr], alpha, q)
            t = time.time()
            r = ev.evaluate(params, cfg, tok, a.split, intervene=Intervene(edit=m), **kw)["metrics"]
            row = {"layer": layer, "alpha": alpha, "q": q, "lam_rel": lr,
                   **{f"d_{k}": float(np.mean(v)) - ref[k] for k, v in r.items()}}
            rows.append(row)
            print(row, f"{time.time() - t:.0f}s", flush=True)
    out = Path(a.out)
    write_json(out / "sweep.json", {"no_edit": ref, "rows": rows, "args": vars(a)})
    head = "| layer | alpha | q | lam_rel | ΔForgetLP | ΔRetainLP | ΔRealAuth |\n|---|---|---|---|---|---|---|\n"
    body = "".join(f"| {r['layer']} | {r['alpha']} | {r['q']} | {r['lam_rel']} | {r['d_forget_lp']:.2f} | "
                   f"{r['d_retain_lp']:.2f} | {r['d_ra_lp']:.2f} |\n" for r in rows)
    write_text(out / "sweep.md", f"no_edit: {json.dumps(ref)}\n\n" + head + body)


if __name__ == "__main__":
    main()
