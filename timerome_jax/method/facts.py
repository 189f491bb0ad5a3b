"""TOFU rows -> facts (prompt ids, subject token positions, object ids) for tracing and editing.

A fact z = (s, r, o): the prompt is `tofu.format_prompt(question)`, the subject s is the author's
name as it appears in the question (`tofu` derives it), the object o is encode(answer) + [eos].

Questions that do not name their author (2 of forget01's 40, e.g. the "What is the full name of the
author born in ...?" opener) have no subject span. Tracing skips them (`require_subject=True`); the
edit memory keeps them, keyed on the mean over all *question* tokens instead (`key_source` says
which was used), so "build the edit for all 40 forget01 facts" covers every row.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from timerome_jax.tofu import data as tofu
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.method.capture import make_cloze_batch
from timerome_jax.method.trace import make_fact_batch


@dataclasses.dataclass(frozen=True)
class Fact:
    index: int                 # row index within its split
    global_index: Optional[int]  # row index in TOFU full (None for holdout rows)
    question: str
    answer: str
    subject: Optional[str]
    prompt_ids: tuple
    key_pos: tuple             # subject token positions (or question token positions, see key_source)
    key_source: str            # "subject" | "question"
    object_ids: tuple          # encode(answer) + [eos]


def make_facts(tokenizer, rows: Sequence[dict], eos_id: int, require_subject: bool = False,
               limit: Optional[int] = None) -> list[Fact]:
    """Facts from TOFU rows (as returned by `tofu.load_split`, with subjects); the first `limit`
    usable rows when given. The key positions are the subject's tokens, or the whole question's
    when the row has no subject (key_source "question")."""
    facts = []
    for i, r in enumerate(rows):
        if limit and len(facts) == limit:
            break
        q, subj = r["question"], r.get("subject")
        if subj is None and require_subject:
            continue
        span, src = (tofu.subject_span(q, subj), "subject") if subj is not None else ((0, len(q)), "question")
        prompt, pos = tofu.prompt_token_positions(tokenizer, q, span)
        facts.append(Fact(i, r.get("global_index"), r["question"], r["answer"], subj, tuple(prompt), tuple(pos), src,
                          tuple(tokenizer.encode(r["answer"])) + (int(eos_id),)))
    if not facts:
        raise ValueError("no usable facts: the fact set is empty" +
                         (" (no row names its subject in the question)" if require_subject and rows else ""))
    return facts


def load_facts(tokenizer, split: str, eos_id: int, limit: Optional[int] = None, require_subject: bool = False,
               data_root=None) -> list[Fact]:
    """Facts of a TOFU split (first `limit` usable rows)."""
    rows = tofu.load_split(split, root=data_root)
    return make_facts(tokenizer, rows, eos_id, require_subject, limit)


def fact_batch(facts: Sequence[Fact], cfg: ModelConfig):
    """`trace.FactBatch` for a list of facts (the object region is masked)."""
    return make_fact_batch([f.prompt_ids for f in facts], [f.key_pos for f in facts],
                           [f.object_ids for f in facts], cfg)


def cloze_batch(facts: Sequence[Fact], tokenizer, cfg: ModelConfig, target_text):
    """`capture.ClozeBatch` for a list of facts (object = answer + eos, target = target_text + eos)."""
    return make_cloze_batch(tokenizer, [list(f.prompt_ids) for f in facts], [list(f.key_pos) for f in facts],
                            [f.answer for f in facts], target_text, cfg)
