"""Sequence-latch scores of the gated memory (docs/gated_memory.md, "Sequence latch").

    PYTHONPATH=$PWD python experiments/latch_scores.py --split forget01 --out results/latch_scores

Packaged target; the memory holds every fact of the split (layer 1, resid, default gate: latch,
token gate off). For each set, every row is probed twice: as the ELBO probes it (prompt + answer +
eos, all masked) and as generation does (prompt + `--gen-length` masked slots). Reports the
quantiles of `memory.sequence_scores` and the share of rows above tau_seq, for the split's forget
rows, its paraphrased questions, retain_perturbed (`--limit` rows spread over its authors) and the
held-out calibration threshold rows that set tau_seq. Writes <out>/<split>.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from timerome_jax import pipeline as pl
from timerome_jax.backbone.checkpoint import load_model_with_tokenizer
from timerome_jax.io import write_json
from timerome_jax.method import capture as cap_lib
from timerome_jax.method import facts as F
from timerome_jax.method import gate as gate_lib
from timerome_jax.method import memory as mem_lib
from timerome_jax.method.trace import Coordinate
from timerome_jax.tofu import data as tofu
from timerome_jax.tofu.evaluate import spread_rows
from timerome_jax.tofu.models import DEFAULT_MODEL


def probe_residuals(params, cfg, tok, rows, layer: int, gen_length=None):
    """Residuals [N,T,D] and slots [N,T] of the rows' probes: answer + eos masked (gen_length None)
    or gen_length masked slots after the prompt (generation's canvas, right-padded here)."""
    if gen_length is None:
        toks, pad, slots = gate_lib.probe_inputs(tok, cfg, rows)
    else:
        seqs = [list(tok.encode(tofu.format_prompt(r["question"]))) for r in rows]
        width = -(-(max(len(s) for s in seqs) + gen_length) // 16) * 16
        toks = np.full((len(rows), width), cfg.pad_token_id, np.int32)
        pad = np.zeros(toks.shape, bool)
        slots = np.zeros(toks.shape, bool)
        for i, s in enumerate(seqs):
            toks[i, :len(s)], toks[i, len(s):len(s) + gen_length] = s, cfg.mask_token_id
            pad[i, :len(s) + gen_length], slots[i, len(s):len(s) + gen_length] = True, True
    flat = cap_lib.capture_residuals(params, cfg, toks, pad, layer, "resid")
    h = np.zeros(toks.shape + (flat.shape[1],), np.float32)
    h[pad] = flat
    return h, slots


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="forget01")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--limit", type=int, default=200, help="forget and retain rows (spread over the set)")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--out", default="results/latch_scores")
    a = ap.parse_args(argv)
    t0 = time.time()
    params, cfg, tok = load_model_with_tokenizer(DEFAULT_MODEL)
    facts = F.load_facts(tok, a.split, cfg.eos_token_id)
    calib = gate_lib.calibrate(params, cfg, tok, a.layer, "resid")
    mem, info = pl.install(params, cfg, tok, facts, Coordinate(a.layer, -1, 0), 4.0, 4, gate=True, calibration=calib)
    ts = info["tau_seq"]
    forget = tofu.load_split(f"{a.split}_perturbed", subjects=False)
    retain = tofu.load_split("retain_perturbed", subjects=False)
    sets = {"forget": [forget[i] for i in spread_rows(len(forget), a.limit)],
            "forget, paraphrased questions": [{"question": r["paraphrased_question"], "answer": r["answer"]}
                                              for r in forget if r.get("paraphrased_question")][: a.limit],
            "retain_perturbed": [retain[i] for i in spread_rows(len(retain), a.limit)]}
    report = {"held-out calibration rows (answer masked)": _stats(
        mem_lib.sequence_scores(mem, calib.h_probe, calib.probe_slots), ts)}
    for name, rows in sets.items():
        for layout, g in (("answer masked", None), (f"{a.gen_length}-slot canvas", a.gen_length)):
            h, slots = probe_residuals(params, cfg, tok, rows, a.layer, g)
            report[f"{name} ({layout})"] = _stats(mem_lib.sequence_scores(mem, h, slots), ts)
    out = {"split": a.split, "n_facts": len(facts), "layer": a.layer, "tau_seq": ts, "sets": report,
           "wall_s": time.time() - t0}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out) / f"{a.split}.json", out)
    print(json.dumps(out, indent=1))
    return out


def _stats(s: np.ndarray, tau_seq: float) -> dict:
    q = np.percentile(s, [0, 5, 50, 95, 100])
    return {"n_rows": int(s.size), "latched_share": float(np.mean(s > tau_seq)),
            "quantiles_0_5_50_95_100": [round(float(x), 4) for x in q]}


if __name__ == "__main__":
    main()
