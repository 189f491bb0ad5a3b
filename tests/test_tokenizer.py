"""tokenizer.py: the HF fast-tokenizer wrapper, mask-id agreement, the context-length check."""
from __future__ import annotations

import os

import pytest
from conftest import make_tiny_tokenizer

from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.tokenizer import (PromptTooLongError, TokenizerError, check_length, load_tokenizer)


def _cfg(**kw):
    base = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, d_ff=128,
                mask_token_id=1, eos_token_id=0, pad_token_id=0, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def test_ids_and_round_trip(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert (tok.mask_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 0, 0, 300)
    text = "The quick brown fox writes in the French literature genre."
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids) and 0 not in ids and 1 not in ids  # nothing added
    assert tok.decode(ids) == text
    # special tokens are skipped on decode
    assert tok.decode([1] + ids + [0, 0]) == text
    assert tok.token_to_id("<|mdm_mask|>") == 1 and tok.token_to_id("no-such-token") is None


def test_unseen_text_round_trips(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    text = "Zürich 1234 — ünïcödé?!"  # byte-level BPE: nothing is out of vocabulary
    assert tok.decode(tok.encode(text)) == text


def test_mask_agreement_with_config(tiny_tokenizer_dir, tmp_path):
    assert load_tokenizer(tiny_tokenizer_dir, _cfg()).mask_id == 1
    with pytest.raises(TokenizerError, match=r"'<\|mdm_mask\|>' with id 1.*mask_token_id=5"):
        load_tokenizer(tiny_tokenizer_dir, _cfg(mask_token_id=5))
    # a tokenizer without a mask token cannot check the id, but an id outside the vocab is caught
    p = make_tiny_tokenizer(str(tmp_path / "nomask"), mask_as_special=False, mask_token="<|reserved|>")
    with pytest.raises(TokenizerError, match="mask_token_id=400 is outside the model vocab"):
        load_tokenizer(p, _cfg(mask_token_id=400))


def test_mask_found_by_name_or_taken_from_config(tmp_path):
    # the mask string is in the vocab but not declared as mask_token (as in some LLaDA tokenizers)
    p = make_tiny_tokenizer(str(tmp_path / "byname"), mask_as_special=False)
    tok = load_tokenizer(p)
    assert tok.hf.mask_token is None and tok.mask_id == 1
    with pytest.raises(TokenizerError, match="mask_token_id=3"):
        load_tokenizer(p, _cfg(mask_token_id=3))
    # no mask token at all (LLaMA / DiffuLLaMA): the config's id is used
    p = make_tiny_tokenizer(str(tmp_path / "none"), mask_as_special=False, mask_token="<|reserved|>")
    assert load_tokenizer(p).mask_id is None
    assert load_tokenizer(p, _cfg(mask_token_id=7)).mask_id == 7


def test_missing_or_broken_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    os.makedirs(tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="cannot load the tokenizer"):
        load_tokenizer(str(tmp_path / "bad"))


def test_save_copies_files(tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    out = tmp_path / "copy"
    out.mkdir()
    tok.save(str(out))
    for name in os.listdir(tiny_tokenizer_dir):
        assert (out / name).read_bytes() == open(os.path.join(tiny_tokenizer_dir, name), "rb").read()
    again = load_tokenizer(str(out))
    assert again.encode("lazy dog") == tok.encode("lazy dog") and again.mask_id == tok.mask_id


def test_check_length():
    cfg = _cfg(max_seq_len=64)
    check_length(64, cfg)
    with pytest.raises(PromptTooLongError, match=r"65 tokens.*max_seq_len\) is 64"):
        check_length(65, cfg)
    with pytest.raises(PromptTooLongError, match="canvas has 100 tokens"):
        check_length(100, cfg, what="canvas")
