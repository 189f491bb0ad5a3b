"""experiments/train_suite.py: the question augmentation is deterministic, keeps answers, and never
puts a forget author's TOFU paraphrase into a training set."""
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer

from timerome_jax.backbone import hf_weights as hf
from timerome_jax.backbone.model import init_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from train_suite import (GROUPS, RECIPES, augment_rows, load_stacked, model_config, parse_init,  # noqa: E402
                         read_split, rewrite)

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


def _vocab():
    tok = Tokenizer.from_file(str(ROOT / "timerome_jax" / "assets" / "tokenizer" / "tokenizer.json"))
    return tok.get_vocab_size(), tok.token_to_id("<|mdm_mask|>"), tok.token_to_id("<|endoftext|>")


def test_init_from_packaged_hf_folders_matches_their_weights():
    """--init target_dream=<packaged bf16 HF folder>: the stacked start equals the stored weights."""

    V, mask, eos = _vocab()
    for group, name in (("dream", "target_dream"), ("moe", "target_moe")):
        folder = ROOT / "timerome_jax" / "assets" / f"tofu_{name}"
        cfg = model_config(group, V, mask, eos, tiny=False)
        like = jax.eval_shape(lambda: jax.vmap(lambda k: init_params(k, cfg))(jax.random.split(jax.random.key(0), 1)))
        got = load_stacked(parse_init(f"{name}={folder}"), [name], cfg, like)
        want, _, _ = hf.load_pretrained(str(folder), dtype="float32")
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.shape[1:] == w.shape and np.array_equal(np.asarray(g[0]), np.asarray(w))


def test_init_refuses_a_folder_of_another_shape():

    V, mask, eos = _vocab()
    cfg = model_config("llada", V, mask, eos, tiny=True)  # tiny LLaDA vs the packaged Dream folder
    like = jax.eval_shape(lambda: jax.vmap(lambda k: init_params(k, cfg))(jax.random.split(jax.random.key(0), 1)))
    with pytest.raises(SystemExit, match="differs from this run's config"):
        load_stacked(parse_init(str(ROOT / "timerome_jax" / "assets" / "tofu_target_dream")), ["target"], cfg, like)
    with pytest.raises(SystemExit, match="no folder for 'target'"):
        load_stacked(parse_init("other=/nowhere"), ["target"], cfg, like)


def test_refs_recipe_is_train_defaults_stage_settings():
    """The refs group trains retain95/retain90 with train_default's stage-1 settings and no augmentation."""

    assert [s for _, s in GROUPS["refs"]] == ["retain95", "retain90"]
    run = json.loads((ROOT / "experiments" / "runs" / "default_v1" / "report.json").read_text())["args"]
    for k in ("steps", "batch", "lr", "warmup", "seed", "chunk"):
        assert RECIPES["default-s1"][k] == run[k], k
