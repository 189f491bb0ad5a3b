"""Sequential insertion (paper Table V / Fig. 3) with the gated memory.

    PYTHONPATH=$PWD python experiments/sequential.py --out results/sequential

Packaged target. The first `--n` forget05 facts are inserted one at a time (`memory.insert`, gate
key included) into an empty gated memory at (layer, resid, k* = -1), whitened with TOFU calibration
rows; after each insert tau is re-set to the 99.9th percentile of the calibration threshold rows
(calibration data only). Every `--every` inserts (and at 0) the memory is evaluated on the first
`--n` rows of forget05 / retain_perturbed / real_authors: ForgetLP over the facts inserted so far
and over all n, RetainLP, RealAuth LP, each as Δ vs no_edit with a paired bootstrap 95% CI over
rows. Writes <out>/sequential.{json,md,png}; --docs copies the JSON and PNG to docs/figures/.
"""
from __future__ import annotations

import argparse
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
from timerome_jax.method import capture as cap_lib  # noqa: E402
from timerome_jax.method import facts as F  # noqa: E402
from timerome_jax.method import gate as gate_lib  # noqa: E402
from timerome_jax.method import memory as mem_lib  # noqa: E402
from timerome_jax.tofu import evaluate as ev  # noqa: E402
from timerome_jax.tofu.models import DEFAULT_MODEL  # noqa: E402

MET = ("forget_lp", "retain_lp", "ra_lp")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--q", type=int, default=4)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--n-mc", type=int, default=4)
    ap.add_argument("--out", default="results/sequential")
    ap.add_argument("--docs", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    params, cfg, tok = load_model_with_tokenizer(DEFAULT_MODEL)
    facts = F.load_facts(tok, "forget05", cfg.eos_token_id)[: a.n]
    calib = gate_lib.calibrate(params, cfg, tok, a.layer, "resid")
    cb = F.cloze_batch(facts, tok, cfg, pl.DEFAULT_TARGET)
    u, v_o, v_t = (np.asarray(x) for x in cap_lib.capture(params, cfg, cb, a.layer, "resid"))
    keys = np.asarray(cap_lib.capture_slot_keys(params, cfg, cb, a.layer, "resid"))
    lam = pl.default_lam(u)
    kw = dict(metrics=MET, n_mc=a.n_mc, seeds=a.seeds, limit=a.n, batch_size=50, progress=False)
    base = ev.evaluate(params, cfg, tok, "forget05", **kw)
    ref = {k: row_values(base, k) for k in MET}
    mem = mem_lib.empty(cfg.d_model, 8, lam, a.alpha, a.q, a.layer, "resid", whitening=calib.whitening)
    steps = []
    for i in range(a.n + 1):
        if i > 0:
            mem = mem_lib.insert(mem, u[i - 1], v_t[i - 1] - v_o[i - 1], gate_key=keys[i - 1])
            mem = mem_lib.with_gate(mem, tau=mem_lib.calibrate_tau(mem, calib.h_thresh))
        if i % a.every:
            continue
        r = ev.evaluate(params, cfg, tok, "forget05", intervene=Intervene(edit=mem), **kw) if i else base
        vals = {k: row_values(r, k) for k in MET}
        inserted = {str(f.index) for f in facts[:i]}
        row = {"n_inserted": i, "tau": float(mem.gate.tau),
               "forget_lp_inserted": paired_row_ci({k: v for k, v in vals["forget_lp"].items() if k in inserted},
                                                   ref["forget_lp"]),
               **{k: paired_row_ci(vals[k], ref[k]) for k in MET}}
        steps.append(row)
        print(f"[sequential] {i}: ΔF(inserted) {row['forget_lp_inserted']['delta']} ΔR {row['retain_lp']['delta']:+.3f} "
              f"ΔRA {row['ra_lp']['delta']:+.3f}", flush=True)
    s = {"layer": a.layer, "alpha": a.alpha, "q": a.q, "n": a.n, "lam": lam, "seeds": a.seeds, "n_mc": a.n_mc,
         "steps": steps, "wall_s": time.time() - t0}
    write_json(out / "sequential.json", s)
    fmt = lambda d: "n/a" if d["delta"] is None else f"{d['delta']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"
    lines = ["| inserted | tau | ΔForgetLP (inserted facts) | ΔForgetLP (all 50) | ΔRetainLP | ΔRealAuthLP |",
             "|---|---|---|---|---|---|"]
    for r in steps:
        lines.append(f"| {r['n_inserted']} | {r['tau']:.3f} | {fmt(r['forget_lp_inserted'])} | {fmt(r['forget_lp'])} | "
                     f"{fmt(r['retain_lp'])} | {fmt(r['ra_lp'])} |")
    write_text(out / "sequential.md", "\n".join(lines) + "\n")
    _plot(steps, out / "sequential.png", s)
    if a.docs:
        dst = Path("docs/figures")
        dst.mkdir(parents=True, exist_ok=True)
        for n in ("sequential.json", "sequential.png"):
            shutil.copyfile(out / n, dst / n)
    return s


def _plot(steps, path, s):
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    x = [r["n_inserted"] for r in steps]
    for ax, key, title in zip(axes, ("forget_lp_inserted", "retain_lp", "ra_lp"),
                              ("ΔForgetLP (inserted facts)", "ΔRetainLP", "ΔRealAuthLP")):
        pts = [(xi, r[key]) for xi, r in zip(x, steps) if r[key]["delta"] is not None]
        xs = np.array([p[0] for p in pts])
        y = np.array([p[1]["delta"] for p in pts])
        ax.plot(xs, y, "o-")
        ax.fill_between(xs, [p[1]["lo"] for p in pts], [p[1]["hi"] for p in pts], alpha=0.2)
        if key != "forget_lp_inserted":
            ax.axhline(-0.5, ls=":", c="gray")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("facts inserted")
    fig.suptitle(f"sequential insertion, gated memory (layer {s['layer']}, α {s['alpha']:g}, q {s['q']}); "
                 f"Δ vs no_edit, 95% CI over rows", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
