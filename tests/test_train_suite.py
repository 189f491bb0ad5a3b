"""experiments/train_suite.py: the question augmentation is deterministic, keeps answers, and never
puts a forget author's TOFU paraphrase into a training set."""
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from train_suite import augment_rows, read_split, rewrite  # noqa: E402

DATA = ROOT / "timerome_jax" / "data" / "tofu"


def test_rewrite_is_deterministic_and_changes_questions():
    q = "What is the full name of the author born in Kuwait City, Kuwait on 08/09/1956?"
    a = [rewrite(q, np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(0)
    outs = {rewrite(q, rng) for _ in range(20)}
    assert len(outs) > 5 and all("Kuwait City" in o for o in outs)


def test_augmented_full_keeps_answers_and_excludes_forget_paraphrases():
    full = read_split(DATA, "full")
    full = full[:400] + full[3600:]  # the retain_perturbed rows and every forget author
    para = {}
    for r in read_split(DATA, "retain_perturbed"):
        para.setdefault(r["question"], []).append(r["paraphrased_question"])
    aug = augment_rows(full, 4, np.random.default_rng(0), para)
    answers = {r["answer"] for r in full}
    assert all(r["answer"] in answers for r in aug)
    assert len(aug) >= 4 * len(full)
    qs = {r["question"] for r in aug}
    for split in ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed"):
        assert not qs & {r["paraphrased_question"] for r in read_split(DATA, split)}, split
    # the retain paraphrases do get in
    assert next(iter(para.values()))[0] in qs
