"""Sequential insertion (paper Table V / Fig. 3) with the default gated memory (sequence latch).

    PYTHONPATH=$PWD python experiments/sequential.py --out results/sequential --docs

Packaged target. The first `--n` forget05 facts are inserted one at a time (`memory.insert` with the
fact's slot key and n_slots) into an empty latch-default memory (no per-token gate) of capacity n at
(layer, resid, k* = -1), whitened with TOFU calibration rows (`gate.calibrate`). After every insert the
latch threshold tau_seq is re-set with `memory.calibrate_tau_seq` on the calibration probe rows
(held-out rows only, as `pipeline.install` does). At 0 and after every `--every`-th insert the memory
is evaluated: ForgetLP on all forget05 rows (reported over the facts inserted so far, and over the
ones not inserted yet, which should not move), RetainLP and RealAuthLP on `--limit` rows of
retain_perturbed / real_authors (spread over the set, `tofu.evaluate.spread_rows`). Each as Δ vs
no_edit with a paired bootstrap 95% CI over rows (row values averaged over seeds); the share of
forget rows whose probe latches (ELBO layout) is recorded too. Writes
<out>/sequential.{json,md,png}; --docs copies the JSON and Markdown to docs/results/ and the PNG to
docs/figures/.
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
from tqdm import tqdm  # noqa: E402

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
from timerome_jax.tofu import data as tofu  # noqa: E402
from timerome_jax.tofu import evaluate as ev  # noqa: E402
from timerome_jax.tofu.models import DEFAULT_MODEL  # noqa: E402

OTHER = ("retain_lp", "ra_lp")


def probe_residuals(params, cfg, tok, rows, layer):
    """Probe layout (prompt + fully masked answer + eos) of `rows` -> h [N,T,D], slots [N,T]."""
    ptok, ppad, pslots = gate_lib.probe_inputs(tok, cfg, rows)
    flat = cap_lib.capture_residuals(params, cfg, ptok, ppad, layer, "resid")
    h = np.zeros(ptok.shape + (flat.shape[1],), np.float32)
    h[ppad] = flat
    return h, pslots


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--q", type=int, default=4)
    ap.add_argument("--split", default="forget05")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--limit", type=int, default=100, help="retain_perturbed / real_authors rows (spread)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-mc", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--out", default="results/sequential")
    ap.add_argument("--docs", action="store_true", help="copy JSON/MD to docs/results/, PNG to docs/figures/")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    params, cfg, tok = load_model_with_tokenizer(DEFAULT_MODEL)
    facts = F.load_facts(tok, a.split, cfg.eos_token_id)[: a.n]
    if len(facts) < a.n:
        raise ValueError(f"sequential: {a.split} has only {len(facts)} usable facts, --n is {a.n}")
    calib = gate_lib.calibrate(params, cfg, tok, a.layer, "resid")
    cb = F.cloze_batch(facts, tok, cfg, pl.DEFAULT_TARGET)
    u, v_o, v_t = (np.asarray(x) for x in cap_lib.capture(params, cfg, cb, a.layer, "resid"))
    keys = np.asarray(cap_lib.capture_slot_keys(params, cfg, cb, a.layer, "resid"))
    n_slots = np.asarray(cb.obj_valid).sum(1).astype(np.int32)
    lam = pl.default_lam(u)
    by_index = {r["index"]: r for r in tofu.load_split(a.split, subjects=False)}
    h_f, slots_f = probe_residuals(params, cfg, tok, [by_index[f.index] for f in facts], a.layer)
    kw_f = dict(metrics=("forget_lp",), n_mc=a.n_mc, seeds=a.seeds, limit=None, batch_size=a.batch_size,
                progress=False)
    kw_o = dict(metrics=OTHER, n_mc=a.n_mc, seeds=a.seeds, limit=a.limit, batch_size=a.batch_size, progress=False)
    ref = {"forget_lp": row_values(ev.evaluate(params, cfg, tok, a.split, **kw_f), "forget_lp")}
    base_o = ev.evaluate(params, cfg, tok, a.split, **kw_o)
    ref.update({k: row_values(base_o, k) for k in OTHER})
    # latch default: no per-token gate (tau = TAU_OFF), capacity n so no insert changes the shape
    mem = mem_lib.empty(cfg.d_model, a.n, lam, a.alpha, a.q, a.layer, "resid", whitening=calib.whitening,
                        tau=gate_lib.TAU_OFF)
    assert not mem.gate.token
    steps = []
    bar = tqdm(range(a.n + 1), desc="sequential", mininterval=30)
    for i in bar:
        if i > 0:
            mem = mem_lib.insert(mem, u[i - 1], v_t[i - 1] - v_o[i - 1], gate_key=keys[i - 1], n_slots=n_slots[i - 1])
            mem = mem_lib.with_gate(mem, tau_seq=mem_lib.calibrate_tau_seq(mem, calib.h_probe, calib.probe_slots))
        if i % a.every:
            continue
        if i == 0:
            vals = ref
        else:
            iv = Intervene(edit=mem)
            vals = {"forget_lp": row_values(ev.evaluate(params, cfg, tok, a.split, intervene=iv, **kw_f), "forget_lp")}
            r = ev.evaluate(params, cfg, tok, a.split, intervene=iv, **kw_o)
            vals.update({k: row_values(r, k) for k in OTHER})
        inserted = {str(f.index) for f in facts[:i]}
        ts = float(mem.gate.tau_seq)
        seq = mem_lib.sequence_scores(mem, h_f, slots_f) if i else np.full(a.n, -np.inf)
        latched = seq > ts
        sel = lambda keep: {k: v for k, v in vals["forget_lp"].items() if keep(k)}
        row = {"n_inserted": i, "tau_seq": ts if np.isfinite(ts) else None,
               "latch_share_inserted": float(latched[:i].mean()) if i else None,
               "latch_share_not_inserted": float(latched[i:].mean()) if i < a.n else None,
               "forget_lp_inserted": paired_row_ci(sel(lambda k: k in inserted), ref["forget_lp"]),
               "forget_lp_not_inserted": paired_row_ci(sel(lambda k: k not in inserted), ref["forget_lp"]),
               **{k: paired_row_ci(vals[k], ref[k]) for k in OTHER}}
        steps.append(row)
        tqdm.write(f"[sequential] {i}: tau_seq {ts:.3f} ΔF(inserted) {row['forget_lp_inserted']['delta']} "
                   f"ΔF(not inserted) {row['forget_lp_not_inserted']['delta']:+.4f} "
                   f"ΔR {row['retain_lp']['delta']:+.4f} ΔRA {row['ra_lp']['delta']:+.4f}")
    worst = min(r["retain_lp"]["lo"] for r in steps)
    s = {"split": a.split, "layer": a.layer, "alpha": a.alpha, "q": a.q, "n": a.n, "every": a.every, "lam": lam,
         "memory": "latch default (sequence latch, no per-token gate)", "seeds": a.seeds, "n_mc": a.n_mc,
         "rows": {"forget": len(ref["forget_lp"]), "retain_perturbed": len(ref["retain_lp"]),
                  "real_authors": len(ref["ra_lp"]), "selection": f"forget: all; others: {a.limit} spread"},
         "retain_bar": {"bar": "RetainLP within 0.5 nats of no_edit at every evaluated step",
                        "worst_delta": min(r["retain_lp"]["delta"] for r in steps), "worst_ci_lo": worst,
                        "met": bool(all(abs(r["retain_lp"]["delta"]) <= 0.5 for r in steps))},
         "steps": steps, "wall_s": time.time() - t0}
    write_json(out / "sequential.json", s)
    fmt = lambda d: "n/a" if d["delta"] is None else f"{d['delta']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"
    pct = lambda x: "n/a" if x is None else f"{x:.0%}"
    lines = [f"Sequential insertion, {a.split} facts 1..{a.n}, latch default, layer {a.layer}, α {a.alpha:g}, "
             f"q {a.q}; seeds {a.seeds}, n_mc {a.n_mc}; Δ vs no_edit, paired bootstrap 95% CI over rows", "",
             "| inserted | τ_seq | latched (inserted / not) | ΔForgetLP (inserted) | ΔForgetLP (not inserted) | "
             "ΔRetainLP | ΔRealAuthLP |", "|---|---|---|---|---|---|---|"]
    for r in steps:
        lines.append(f"| {r['n_inserted']} | {'∞' if r['tau_seq'] is None else format(r['tau_seq'], '.3f')} | "
                     f"{pct(r['latch_share_inserted'])} / {pct(r['latch_share_not_inserted'])} | "
                     f"{fmt(r['forget_lp_inserted'])} | {fmt(r['forget_lp_not_inserted'])} | "
                     f"{fmt(r['retain_lp'])} | {fmt(r['ra_lp'])} |")
    write_text(out / "sequential.md", "\n".join(lines) + "\n")
    _plot(steps, out / "sequential.png", s)
    if a.docs:
        for n, d in (("sequential.json", "docs/results"), ("sequential.md", "docs/results"),
                     ("sequential.png", "docs/figures")):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / n, Path(d) / n)
    print({"retain_bar": s["retain_bar"], "wall_s": round(s["wall_s"], 1)})
    return s


def _plot(steps, path, s):
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    x = [r["n_inserted"] for r in steps]
    for ax, key, title in zip(axes, ("forget_lp_inserted", "retain_lp", "ra_lp"),
                              ("ΔForgetLP (facts inserted so far)", "ΔRetainLP", "ΔRealAuthLP")):
        pts = [(xi, r[key]) for xi, r in zip(x, steps) if r[key]["delta"] is not None]
        xs = np.array([p[0] for p in pts])
        y = np.array([p[1]["delta"] for p in pts])
        ax.plot(xs, y, "o-")
        ax.fill_between(xs, [p[1]["lo"] for p in pts], [p[1]["hi"] for p in pts], alpha=0.2)
        if key != "forget_lp_inserted":
            ax.axhline(-0.5, ls=":", c="gray")
            ax.axhline(0.5, ls=":", c="gray")
            ax.set_ylim(-1, 1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("facts inserted")
    fig.suptitle(f"sequential insertion, latch-default memory ({s['split']}, layer {s['layer']}, α {s['alpha']:g}, "
                 f"q {s['q']}); Δ vs no_edit, 95% CI over rows", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
