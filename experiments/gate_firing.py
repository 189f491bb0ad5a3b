"""Gate firing report for the default gated memory (sequence latch, no per-token gate).

    PYTHONPATH=$PWD python experiments/gate_firing.py --out results/gate_firing --docs

Packaged target; memory of every forget01 fact at (layer, resid) built by `pipeline.install(gate=True)`
(the library default: tau_seq from the held-out calibration probe rows, token gate off). For each set
the latch is primed exactly as the library does (`model.prime_edit`) in both layouts that use it:

    ELBO        prompt + answer + eos, the whole answer masked (what `likelihood.elbo` probes)
    generation  prompt + `--gen-length` masked slots (the sampler's initial canvas)

A row "fires" when its latch is set; the edit then applies on that row's answer / generation slots,
so the token share is edited tokens / real tokens (prompt + answer). Sets: forget01 (its own
questions), forget01 paraphrased questions, retain_perturbed, other fictitious authors (holdout10:
authors outside full.json, so disjoint from the calibration rows), real_authors, world_facts; at most
`--limit` rows each, spread over the set (`tofu.evaluate.spread_rows`). Also per set: the median and
max sequence score. Writes <out>/gate_firing.{json,md}; --docs copies both to docs/results/.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from timerome_jax import pipeline as pl
from timerome_jax.backbone import model
from timerome_jax.backbone.checkpoint import load_model_with_tokenizer
from timerome_jax.backbone.config import MODULES
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.diffusion import likelihood as LK
from timerome_jax.diffusion import sampler as S
from timerome_jax.io import write_json, write_text
from timerome_jax.method import facts as F
from timerome_jax.method import memory as mem_lib
from timerome_jax.method.trace import Coordinate
from timerome_jax.tofu import data as tofu
from timerome_jax.tofu.evaluate import spread_rows
from timerome_jax.tofu.models import DEFAULT_MODEL


def sets(limit: int) -> dict:
    """{set name: rows with question/answer}, each spread-limited to `limit` rows."""
    pick = lambda rows: [rows[i] for i in spread_rows(len(rows), limit)]
    f = tofu.load_split("forget01_perturbed", subjects=False)
    para = [{"question": r["paraphrased_question"], "answer": r["answer"]} for r in f if r.get("paraphrased_question")]
    return {"forget01": pick(f), "forget01 paraphrased questions": pick(para),
            "retain_perturbed": pick(tofu.load_split("retain_perturbed", subjects=False)),
            "other fictitious authors (holdout10)": pick(tofu.load_split("holdout10", subjects=False)),
            "real_authors": pick(tofu.load_split("real_authors_perturbed", subjects=False)),
            "world_facts": pick(tofu.load_split("world_facts_perturbed", subjects=False))}


def firing(params, cfg, tok, mem, rows, layout: str, gen_length: int, batch: int = 32) -> dict:
    """Prime the latch of `mem` on `rows` in `layout` ("elbo" | "generation") -> shares and scores."""
    eos = cfg.eos_token_id
    prime = jax.jit(lambda p, t, pad, slots, e: model.prime_edit(p, t, cfg, pad, slots, Intervene(edit=e)).edit)
    fired, edited, real, slot_n, scores = [], 0, 0, 0, []
    for i in range(0, len(rows), batch):
        rs = rows[i:i + batch]
        prompts = [list(tok.encode(tofu.format_prompt(r["question"]))) for r in rs]
        if layout == "elbo":
            answers = [list(tok.encode(r["answer"])) + [eos] for r in rs]
            width = min(-(-max(len(p) + len(a) for p, a in zip(prompts, answers)) // 32) * 32, cfg.max_seq_len)
            t, slots, pad = LK.make_qa_batch(prompts, answers, cfg, max_len=width)
            probe = jnp.where(slots, cfg.mask_token_id, t)
        else:
            width = -(-max(len(p) for p in prompts) // 32) * 32 + gen_length
            probe, pad, pm = S.make_canvas(prompts, gen_length, cfg, max_len=width)
            slots = jnp.asarray(pad) & ~jnp.asarray(pm)
        latch = np.asarray(prime(params, probe, pad, slots, mem).gate.latch)
        fired.append(latch.any(1))
        edited += int(latch.sum())
        real += int(np.asarray(pad).sum())
        slot_n += int(np.asarray(slots).sum())
        h = np.asarray(model.run(params, jnp.asarray(probe), cfg, jnp.asarray(pad),
                                 Intervene(read_pos=jnp.broadcast_to(jnp.arange(probe.shape[1]), probe.shape)),
                                 stop_layer=mem.layer).acts[MODULES[mem.module]][mem.layer])
        scores.append(mem_lib.sequence_scores(mem, h, np.asarray(slots)))
    fired, scores = np.concatenate(fired), np.concatenate(scores)
    return {"rows": len(rows), "row_share": float(fired.mean()), "token_share": edited / real,
            "slot_share": edited / max(slot_n, 1), "rows_firing": int(fired.sum()),
            "score_median": float(np.median(scores)), "score_max": float(scores.max())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--split", default="forget01")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--out", default="results/gate_firing")
    ap.add_argument("--docs", action="store_true", help="copy the JSON and Markdown to docs/results/")
    a = ap.parse_args(argv)
    t0 = time.time()
    params, cfg, tok = load_model_with_tokenizer(DEFAULT_MODEL)
    facts = F.load_facts(tok, a.split, cfg.eos_token_id)
    mem, info = pl.install(params, cfg, tok, facts, Coordinate(a.layer, -1, 0), 4.0, 4, gate=True)
    report = {}
    for name, rows in tqdm(list(sets(a.limit).items()), desc="gate firing"):
        report[name] = {lay: firing(params, cfg, tok, mem, rows, lay, a.gen_length) for lay in ("elbo", "generation")}
        tqdm.write(f"{name}: {report[name]}")
    s = {"split": a.split, "n_facts": len(facts), "layer": a.layer, "memory": "latch default (no per-token gate)",
         "token_gate": bool(mem.gate.token), "tau_seq": info["tau_seq"], "gen_length": a.gen_length, "sets": report,
         "wall_s": time.time() - t0}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gate_firing.json", s)
    lines = [f"Gate firing, {a.split} memory ({len(facts)} facts), layer {a.layer}, default gate: sequence latch "
             f"(τ_seq {info['tau_seq']:.3f}), no per-token gate. A row fires when its probe latches; tokens = "
             f"edited tokens / real tokens (prompt + answer). ELBO layout: answer + eos fully masked; generation: "
             f"{a.gen_length} masked slots.", "",
             "| set | rows | rows firing (ELBO) | tokens edited (ELBO) | rows firing (generation) | "
             "tokens edited (generation) | sequence score median / max (ELBO) |", "|---|---|---|---|---|---|---|"]
    for name, r in report.items():
        e, g = r["elbo"], r["generation"]
        lines.append(f"| {name} | {e['rows']} | {e['row_share']:.1%} | {e['token_share']:.2%} | "
                     f"{g['row_share']:.1%} | {g['token_share']:.2%} | {e['score_median']:.3f} / {e['score_max']:.3f} |")
    write_text(out / "gate_firing.md", "\n".join(lines) + "\n")
    if a.docs:
        Path("docs/results").mkdir(parents=True, exist_ok=True)
        for n in ("gate_firing.json", "gate_firing.md"):
            shutil.copyfile(out / n, Path("docs/results") / n)
    return s


if __name__ == "__main__":
    main()
