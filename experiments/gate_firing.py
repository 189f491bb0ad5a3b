"""Gate firing report: where the gated memory's gate opens (share of rows and of tokens).

    PYTHONPATH=$PWD python experiments/gate_firing.py --out results/gate_firing

Packaged target; memory of every forget01 fact at (layer, resid), gate calibrated on TOFU
calibration rows (99.9th percentile). Each set's rows are laid out as the likelihood evaluation
sees them (prompt + answer + eos, answer masked at a per-row ratio t ~ U(0,1), a quarter of rows
fully masked; seed fixed), and separately with the whole answer masked (as generation starts).
Sets: forget01 (its own questions), forget01 paraphrased questions, retain_perturbed, other
fictitious authors (holdout10: rows outside full.json, so disjoint from the calibration rows),
real_authors, world_facts. Writes <out>/gate_firing.{json,md}.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from timerome_jax import pipeline as pl
from timerome_jax.backbone.checkpoint import load_model_with_tokenizer
from timerome_jax.io import write_json, write_text
from timerome_jax.method import capture as cap_lib
from timerome_jax.method import facts as F
from timerome_jax.method import gate as gate_lib
from timerome_jax.method import memory as mem_lib
from timerome_jax.method.trace import Coordinate
from timerome_jax.tofu import data as tofu
from timerome_jax.tofu.models import DEFAULT_MODEL


def sets(limit: int) -> dict:
    f = tofu.load_split("forget01_perturbed", subjects=False)
    para = [{"question": r["paraphrased_question"], "answer": r["answer"]} for r in f if r.get("paraphrased_question")]
    return {"forget01": f[:limit], "forget01 paraphrased questions": para[:limit],
            "retain_perturbed": tofu.load_split("retain_perturbed", subjects=False)[:limit],
            "other fictitious authors (holdout10)": tofu.load_split("holdout10", subjects=False)[:limit],
            "real_authors": tofu.load_split("real_authors_perturbed", subjects=False)[:limit],
            "world_facts": tofu.load_split("world_facts_perturbed", subjects=False)[:limit]}


def firing(params, cfg, tok, mem, rows, layer, full_mask: bool, seed: int = 11) -> dict:
    tokens, pad = gate_lib.masked_inputs(tok, cfg, rows, seed=seed, full_mask_share=1.0 if full_mask else 0.25)
    h = cap_lib.capture_residuals(params, cfg, tokens, pad, layer, "resid")
    fire = mem_lib.gate_scores(mem, h) > float(mem.gate.tau)
    row_of = np.repeat(np.arange(len(rows)), pad.sum(1))
    per_row = np.bincount(row_of, weights=fire, minlength=len(rows)) > 0
    return {"rows": len(rows), "tokens": int(fire.size), "row_share": float(per_row.mean()),
            "token_share": float(fire.mean())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--split", default="forget01")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", default="results/gate_firing")
    a = ap.parse_args(argv)
    t0 = time.time()
    params, cfg, tok = load_model_with_tokenizer(DEFAULT_MODEL)
    facts = F.load_facts(tok, a.split, cfg.eos_token_id)
    mem, info = pl.install(params, cfg, tok, facts, Coordinate(a.layer, -1, 0), 4.0, 4, gate=True)
    report = {}
    for name, rows in sets(a.limit).items():
        report[name] = {"eval-like masking": firing(params, cfg, tok, mem, rows, a.layer, False),
                        "answer fully masked": firing(params, cfg, tok, mem, rows, a.layer, True)}
        print(name, report[name], flush=True)
    s = {"split": a.split, "n_facts": len(facts), "layer": a.layer, "tau": info["tau"],
         "percentile": info["percentile"], "sets": report, "wall_s": time.time() - t0}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gate_firing.json", s)
    lines = [f"Gate firing, {a.split} memory ({len(facts)} facts), layer {a.layer}, tau {info['tau']:.4f} "
             f"(99.9th percentile of calibration retain tokens)", "",
             "| set | rows | rows firing (eval masking) | tokens firing | rows firing (answer fully masked) | tokens firing |",
             "|---|---|---|---|---|---|"]
    for name, r in report.items():
        e, g = r["eval-like masking"], r["answer fully masked"]
        lines.append(f"| {name} | {e['rows']} | {e['row_share']:.1%} | {e['token_share']:.2%} | "
                     f"{g['row_share']:.1%} | {g['token_share']:.2%} |")
    write_text(out / "gate_firing.md", "\n".join(lines) + "\n")
    return s


if __name__ == "__main__":
    main()
