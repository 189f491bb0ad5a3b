"""hf.py: cross-framework parity with PyTorch, strict loading, bad inputs, save/load round trips.

Parity metric: rel_err(ours, ref) = max|ours - ref| / max|ref| over all compared logits, float32,
under jax.default_matmul_precision("highest"); bound 1e-5. References are the torch models whose
weights were saved into the folders (torch_ref LLaDA / LLaDA-MoE; transformers Qwen2 (Dream) and
Llama (DiffuLLaMA) with the causal mask replaced by a bidirectional 4D mask). Shift families are
compared against cat(ref[:, :1], ref[:, :-1]), the alignment their samplers use.
"""
from __future__ import annotations

import json
import os
import shutil
import gc
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (diffullama_config_dict, dream_config_dict, llada_config_dict, make_tiny_tokenizer,
                      moe_config_dict, torch_logits)
from safetensors.torch import load_file, save_file

from timerome_jax.backbone import hf_config, hf_weights
from timerome_jax.backbone import model
from timerome_jax.backbone.config import llada_8b
from timerome_jax.backbone.hf_config import HFConfigError
from timerome_jax.backbone.hf_weights import CheckpointError
from timerome_jax.backbone.tokenizer import TokenizerError
from timerome_jax.torch_ref import llada as tref

NAMES = ["llada", "llada_var", "moe", "dream", "diffullama"]
TOL = 1e-5

_fwd = jax.jit(model.forward, static_argnums=2)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def ours(params, ids, cfg, pad_mask=None):
    with jax.default_matmul_precision("highest"):
        pm = None if pad_mask is None else jnp.asarray(pad_mask, bool)
        return np.asarray(_fwd(params, jnp.asarray(ids, jnp.int32), cfg, pm))


@pytest.fixture(scope="module")
def loaded(tiny_torch):
    """name -> (params, cfg, tok, torch_model) for every tiny folder."""
    out = {}
    for name, (m, path) in tiny_torch.items():
        params, cfg, tok = hf_weights.load_pretrained(path)
        out[name] = (params, cfg, tok, m)
    return out


def _ids(cfg, shape, seed):
    return np.random.default_rng(seed).integers(2, cfg.vocab_size, size=shape)


def _copy(src, tmp_path, name="copy"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **kw):
    f = os.path.join(path, "config.json")
    d = json.load(open(f))
    for k, v in kw.items():
        if v is _DEL:
            d.pop(k, None)
        else:
            d[k] = v
    json.dump(d, open(f, "w"))


_DEL = object()


# ------------------------------------------------------------------------------------------------
# parity
# ------------------------------------------------------------------------------------------------
def test_families_and_configs(loaded):
    fam = {n: loaded[n][1].family for n in NAMES}
    assert fam == {"llada": "llada", "llada_var": "llada", "moe": "llada_moe", "dream": "dream",
                   "diffullama": "diffullama"}
    assert [loaded[n][1].logits_shift for n in NAMES] == [False, False, False, True, True]
    c = loaded["llada_var"][1]
    assert (c.n_kv_heads, c.qkv_bias, c.tie_embeddings) == (2, True, True) and "lm_head" not in loaded["llada_var"][0]
    c = loaded["moe"][1]
    assert (c.n_experts, c.n_experts_per_tok, c.d_expert, c.qk_norm, c.norm_topk_prob) == (8, 2, 32, True, False)
    assert loaded["moe"][0]["layers"]["w_gate"].shape == (2, 8, 64, 32)
    c = loaded["dream"][1]
    assert (c.qkv_bias, c.n_kv_heads, c.norm_eps, c.rope_theta) == (True, 2, 1e-6, 1e6)
    assert loaded["diffullama"][1].mask_token_id == 811  # no tokenizer, no config field: the fallback
    assert loaded["diffullama"][2] is None and loaded["llada"][2].mask_id == 1


@pytest.mark.parametrize("T", [7, pytest.param(512, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", NAMES)
def test_parity_unpadded(loaded, name, T):
    params, cfg, _, m = loaded[name]
    ids = _ids(cfg, (2, T), seed=T)
    ref = torch_logits(name, m, ids)
    got = ours(params, ids, cfg)
    assert got.shape == ref.shape == (2, T, cfg.vocab_size)
    assert rel_err(got, ref) <= TOL, rel_err(got, ref)


@pytest.mark.slow
def test_parity_is_sensitive(loaded):
    """The parity check fails loudly for the classic conversion bugs (so it can fail)."""
    params, cfg, _, m = loaded["llada"]
    ids = _ids(cfg, (1, 64), seed=3)
    ref = torch_logits("llada", m, ids)
    lay = params["layers"]
    bugs = {
        "gate/up swapped": dict(lay, w_gate=lay["w_up"], w_up=lay["w_gate"]),
        "wq not transposed": dict(lay, wq=jnp.swapaxes(lay["wq"], 1, 2)),
        "norms swapped": dict(lay, attn_norm=lay["mlp_norm"], mlp_norm=lay["attn_norm"]),
    }
    for what, bad in bugs.items():
        assert rel_err(ours(dict(params, layers=bad), ids, cfg), ref) > 1e-2, what
    # a wrong RoPE layout (interleaved instead of half-split) is caught too
    perm = np.concatenate([np.arange(0, cfg.head_dim, 2), np.arange(1, cfg.head_dim, 2)])
    full = np.concatenate([h * cfg.head_dim + perm for h in range(cfg.n_heads)])
    bad = dict(lay, wq=lay["wq"][:, :, full], wk=lay["wk"][:, :, full])
    assert rel_err(ours(dict(params, layers=bad), ids, cfg), ref) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_attention_is_bidirectional(loaded, name):
    """Changing the last token changes position 1's logits, in torch (so the causal mask is really
    off in the references) and in ours."""
    params, cfg, _, m = loaded[name]
    a = _ids(cfg, (1, 16), seed=11)
    b = a.copy()
    b[0, -1] = 2 + (a[0, -1] - 1) % (cfg.vocab_size - 2)
    assert a[0, -1] != b[0, -1]
    for f in (lambda x: torch_logits(name, m, x), lambda x: ours(params, x, cfg)):
        la, lb = f(a), f(b)
        assert np.abs(la[0, 2] - lb[0, 2]).max() > 1e-3
    if name in ("dream", "diffullama"):  # sanity: the plain HF forward *is* causal
        with torch.no_grad():
            ca = m(input_ids=torch.as_tensor(a)).logits
            cb = m(input_ids=torch.as_tensor(b)).logits
        assert torch.equal(ca[0, :-1], cb[0, :-1])


@pytest.mark.slow
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", NAMES)
def test_padded_rows_equal_unpadded(loaded, name, side):
    """A padded batch with a key-padding mask gives each row's unpadded logits (valid positions),
    and equals the torch reference run with the same key-padding mask."""
    params, cfg, _, m = loaded[name]
    T, lens = 40, (40, 23)
    rows = [_ids(cfg, (1, n), seed=100 + n) for n in lens]
    ids = np.full((2, T), cfg.pad_token_id, np.int64)
    mask = np.zeros((2, T), bool)
    for r, (x, n) in enumerate(zip(rows, lens)):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        ids[r, sl], mask[r, sl] = x[0], True
    got = ours(params, ids, cfg, mask)
    ref_pad = torch_logits(name, m, ids, mask)
    for r, (x, n) in enumerate(zip(rows, lens)):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        alone = ours(params, x, cfg)[0]
        g, rp = got[r, sl], ref_pad[r, sl]
        if cfg.logits_shift and side == "left" and n < T:
            # the first real token's shifted logit comes from a pad position; it predicts position
            # 0 of the prompt, which these families never mask (docs/backbone_facts.md §8 Implications for a Flax port)
            g, rp, alone = g[1:], rp[1:], alone[1:]
        assert rel_err(g, alone) <= TOL
        assert rel_err(g, rp) <= TOL
    # the padded row must not be trivially unaffected by the mask: without it, logits change
    nomask = ours(params, ids, cfg)
    assert np.abs(nomask[1] - got[1]).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# sharded / bf16 / memory
# ------------------------------------------------------------------------------------------------
def _trees_equal(a, b):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, p
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=str(p))


@pytest.mark.parametrize("name", ["llada", "moe"])
def test_sharded_with_and_without_index(loaded, tiny_torch, tmp_path, name):
    m, _ = tiny_torch[name]
    d = m.config_dict
    with_index, no_index = str(tmp_path / "idx"), str(tmp_path / "noidx")
    tref.save_hf_folder(m, d, with_index, n_shards=3)
    assert os.path.isfile(os.path.join(with_index, "model.safetensors.index.json"))
    tref.save_hf_folder(m, d, no_index, n_shards=3)
    os.remove(os.path.join(no_index, "model.safetensors.index.json"))
    for p in (with_index, no_index):
        params, cfg, _ = hf_weights.load_pretrained(p)
        _trees_equal(params, loaded[name][0])


def test_bf16_checkpoint(tiny_torch, tmp_path):
    m, _ = tiny_torch["llada"]
    p = str(tmp_path / "bf16")
    tref.save_hf_folder(m, m.config_dict, p, dtype=torch.bfloat16)
    params, cfg, _ = hf_weights.load_pretrained(p)
    assert cfg.dtype == "bfloat16" and params["embed"].dtype == jnp.bfloat16
    want = m.model.transformer.blocks[1].q_proj.weight.detach().bfloat16().float().numpy().T
    np.testing.assert_array_equal(np.asarray(params["layers"]["wq"][1], np.float32), want)
    p32, c32, _ = hf_weights.load_pretrained(p, dtype="float32")
    assert c32.dtype == "float32" and p32["embed"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(p32["layers"]["wq"][1]), want)


def test_load_never_holds_a_second_full_copy(tmp_path):
    """Host (numpy) memory traced during a sharded load stays below one model size: tensors are
    written into preallocated stacked device arrays one at a time (a load-all-then-stack loader peaks
    at about twice the model size)."""
    d = llada_config_dict(d_model=256, n_layers=4, mlp_hidden_size=512)
    m = tref.LLaDAModelLM(d)
    p = str(tmp_path / "mem")
    tref.save_hf_folder(m, d, p, n_shards=3)
    total = sum(x.numel() * 4 for x in m.parameters())
    hf_weights.load_pretrained(p)  # warm imports/caches
    gc.collect()  # garbage left by earlier tests would otherwise be freed/reallocated inside the window
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        hf_weights.load_pretrained(p)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    # alone this measures ~0.64x; inside the full suite other threads' Python allocations add noise
    # (0.93x seen once). Two full copies would be >= 2x, so 1.25x still separates the two designs.
    assert peak < 1.25 * total, (peak, total)


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------
def test_missing_folder_or_config(tmp_path, tiny_llada_dir):
    with pytest.raises(HFConfigError, match="does not exist"):
        hf_weights.load_pretrained(str(tmp_path / "nope"))
    p = _copy(tiny_llada_dir, tmp_path)
    os.remove(os.path.join(p, "config.json"))
    with pytest.raises(HFConfigError, match="no config.json"):
        hf_weights.load_pretrained(p)
    with open(os.path.join(p, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(HFConfigError, match="not valid JSON"):
        hf_weights.load_pretrained(p)


def test_truncated_and_corrupt_safetensors(tmp_path, tiny_llada_dir):
    p = _copy(tiny_llada_dir, tmp_path, "trunc")
    f = os.path.join(p, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated or corrupt)"):
        hf_weights.load_pretrained(p)
    p = _copy(tiny_llada_dir, tmp_path, "garbage")
    open(os.path.join(p, "model.safetensors"), "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!" + data[16:200])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        hf_weights.load_pretrained(p)


def test_no_safetensors(tmp_path, tiny_llada_dir):
    p = _copy(tiny_llada_dir, tmp_path)
    os.rename(os.path.join(p, "model.safetensors"), os.path.join(p, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors.*\.bin"):
        hf_weights.load_pretrained(p)


def test_tokenizer_mask_disagrees(tmp_path, tiny_llada_dir):
    p = _copy(tiny_llada_dir, tmp_path)
    _edit_config(p, mask_token_id=7)
    with pytest.raises(TokenizerError, match=r"<\|mdm_mask\|>.*id 1.*mask_token_id=7"):
        hf_weights.load_pretrained(p)


def test_unsupported_architecture(tmp_path, tiny_llada_dir):
    p = _copy(tiny_llada_dir, tmp_path)
    _edit_config(p, architectures=["GPT2LMHeadModel"])
    with pytest.raises(HFConfigError, match="GPT2LMHeadModel"):
        hf_weights.load_pretrained(p)
    _edit_config(p, architectures=_DEL)
    with pytest.raises(HFConfigError, match="architectures"):
        hf_weights.load_pretrained(p)


def _rewrite(path, fn):
    f = os.path.join(path, "model.safetensors")
    sd = fn(load_file(f))
    save_file(sd, f, metadata={"format": "pt"})


def test_missing_unexpected_duplicated_misshaped_keys(tmp_path, tiny_llada_dir):
    key = "model.transformer.blocks.1.up_proj.weight"
    p = _copy(tiny_llada_dir, tmp_path, "missing")
    _rewrite(p, lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointError, match=r"missing: 'model\.transformer\.blocks\.1\.up_proj\.weight'"):
        hf_weights.load_pretrained(p)

    p = _copy(tiny_llada_dir, tmp_path, "unexpected")
    _rewrite(p, lambda sd: {**sd, "model.transformer.blocks.0.q_norm.weight": torch.ones(64)})
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.safetensors.*blocks\.0\.q_norm\.weight"):
        hf_weights.load_pretrained(p)

    p = _copy(tiny_llada_dir, tmp_path, "dup")
    sd = load_file(os.path.join(p, "model.safetensors"))
    save_file({key: sd[key]}, os.path.join(p, "extra.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"up_proj\.weight' appears twice: in extra\.safetensors and in model\.safetensors"):
        hf_weights.load_pretrained(p)

    p = _copy(tiny_llada_dir, tmp_path, "shape")
    _rewrite(p, lambda sd: {**sd, key: sd[key][:96]})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.transformer\.blocks\.1\.up_proj\.weight' has shape \[96, 64\], expected \[128, 64\]"):
        hf_weights.load_pretrained(p)

    p = _copy(tiny_llada_dir, tmp_path, "cfgshape")  # config disagrees with every up_proj
    _edit_config(p, mlp_hidden_size=96)
    with pytest.raises(CheckpointError, match=r"has shape \[128, 64\], expected \[96, 64\]"):
        hf_weights.load_pretrained(p)

    p = _copy(tiny_llada_dir, tmp_path, "f64")
    _rewrite(p, lambda sd: {**sd, key: sd[key].double()})
    with pytest.raises(CheckpointError, match=r"up_proj\.weight' has dtype F64"):
        hf_weights.load_pretrained(p)


def test_bad_index(tmp_path, tiny_torch):
    m, _ = tiny_torch["llada"]
    p = str(tmp_path / "idx")
    tref.save_hf_folder(m, m.config_dict, p, n_shards=2)
    idx = os.path.join(p, "model.safetensors.index.json")
    j = json.load(open(idx))
    first = sorted(j["weight_map"])[0]
    j["weight_map"][first] = "model-00009-of-00009.safetensors"
    json.dump(j, open(idx, "w"))
    with pytest.raises(CheckpointError, match=r"to .model-00009-of-00009\.safetensors., which does not exist"):
        hf_weights.load_pretrained(p)


# ------------------------------------------------------------------------------------------------
# config whitelist
# ------------------------------------------------------------------------------------------------
def test_llada_8b_config_parses_to_llada_8b():
    d = llada_config_dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                          vocab_size=126464, embedding_size=126464, max_sequence_length=4096,
                          mask_token_id=126336, eos_token_id=126081, pad_token_id=126081)
    assert hf_config.config_from_hf(d) == llada_8b()
    # writing it back gives the same field values as the real config.json (bookkeeping aside)
    back = hf_config.hf_config_dict(llada_8b(), "bfloat16")
    skip = {"auto_map", "transformers_version"}
    assert {k: v for k, v in back.items() if k not in skip} == {k: v for k, v in d.items() if k not in skip}
    assert hf_config.config_from_hf(back) == llada_8b()
    # the 8B key map covers every leaf exactly once
    kmap = hf_weights.key_map(llada_8b())
    assert len(kmap) == 2 + 1 + 32 * 9
    assert kmap["model.transformer.blocks.31.ff_out.weight"] == (("layers", "w_down"), (31,), True)
    assert kmap["model.transformer.ff_out.weight"] == (("lm_head",), (), True)


def test_config_whitelist_errors():
    with pytest.raises(HFConfigError, match="'use_scheduler_head'=True"):
        hf_config.config_from_hf(llada_config_dict(use_scheduler_head=True))
    hf_config.config_from_hf(llada_config_dict(use_scheduler_head=False))  # unknown but disabled: fine
    hf_config.config_from_hf(llada_config_dict(residual_dropout=0.1, init_std=0.5, use_cache=True))  # irrelevant
    with pytest.raises(HFConfigError, match="'block_type'='sequential'"):
        hf_config.config_from_hf(llada_config_dict(block_type="sequential"))
    with pytest.raises(HFConfigError, match="'attention_layer_norm'=True"):
        hf_config.config_from_hf(llada_config_dict(attention_layer_norm=True))
    with pytest.raises(HFConfigError, match="'rope'"):
        hf_config.config_from_hf({k: v for k, v in llada_config_dict().items() if k != "rope"})
    with pytest.raises(HFConfigError, match="'d_model'"):
        hf_config.config_from_hf({k: v for k, v in llada_config_dict().items() if k != "d_model"})
    with pytest.raises(HFConfigError, match="'moe_layer_freq'"):
        hf_config.config_from_hf(moe_config_dict(moe_layer_freq=[0, 1]))
    with pytest.raises(HFConfigError, match="'clip_qkv'=8"):
        hf_config.config_from_hf(moe_config_dict(clip_qkv=8))
    with pytest.raises(HFConfigError, match="'moe_router_enable_expert_bias'=True"):
        hf_config.config_from_hf(moe_config_dict(moe_router_enable_expert_bias=True))
    with pytest.raises(HFConfigError, match="'use_sliding_window'=True"):
        hf_config.config_from_hf(dream_config_dict(use_sliding_window=True))
    with pytest.raises(HFConfigError, match="'rope_scaling'"):
        hf_config.config_from_hf(diffullama_config_dict(rope_scaling={"type": "linear", "factor": 2.0}))
    with pytest.raises(HFConfigError, match="'attention_bias'=True"):
        hf_config.config_from_hf(diffullama_config_dict(attention_bias=True))


def test_dispatch_on_architectures_not_model_type():
    # LLaDA-MoE ships model_type "llada"; even with LLaDA's architecture name the MoE fields decide
    c = hf_config.config_from_hf(moe_config_dict(architectures=["LLaDAModelLM"], model_type="llada"))
    assert c.family == "llada_moe"
    c = hf_config.config_from_hf(llada_config_dict(architectures=["MMadaModelLM"], model_type="mmada",
                                            vocab_size=400, embedding_size=400, llm_vocab_size=320,
                                            codebook_size=80, num_vq_tokens=16, new_vocab_size=400))
    assert (c.family, c.vocab_size, c.logits_shift) == ("mmada", 400, False)
    assert hf_config.config_from_hf(dream_config_dict(model_type="qwen2")).family == "dream"


def test_transformers5_llama_config_parses():
    from transformers import LlamaConfig

    d = LlamaConfig(vocab_size=832, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, rope_theta=1e4).to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    c = hf_config.config_from_hf(d)
    assert (c.family, c.rope_theta, c.head_dim, c.logits_shift, c.mask_token_id) == ("diffullama", 1e4, 16, True, 811)


def test_diffullama_mask_from_tokenizer(tmp_path, tiny_diffullama_dir):
    p = _copy(tiny_diffullama_dir, tmp_path)
    make_tiny_tokenizer(p, mask_token="[MASK]")
    params, cfg, tok = hf_weights.load_pretrained(p)
    assert cfg.mask_token_id == tok.mask_id == tok.token_to_id("[MASK]") != 811


def test_tokenizer_larger_than_vocab(tmp_path, tiny_llada_dir):
    p = _copy(tiny_llada_dir, tmp_path)
    _edit_config(p, vocab_size=256, embedding_size=256)
    with pytest.raises(TokenizerError, match="300 tokens.*only 256"):
        hf_weights.load_pretrained(p)


# ------------------------------------------------------------------------------------------------
# save_pretrained
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(loaded, tmp_path, name):
    params, cfg, tok, _ = loaded[name]
    out = str(tmp_path / "saved")
    hf_weights.save_pretrained(params, cfg, out, tokenizer=tok)
    p2, c2, t2 = hf_weights.load_pretrained(out)
    _trees_equal(p2, params)
    assert c2 == cfg
    assert (t2 is None) == (tok is None)
    if tok is not None:
        assert t2.encode("the quick fox") == tok.encode("the quick fox")
    assert [n for n in os.listdir(tmp_path) if n != "saved"] == []  # no temp folders left behind


def test_save_llada_layout_and_overwrite(tiny_llada, tmp_path):
    params, cfg, tok = tiny_llada
    out = str(tmp_path / "m")
    os.makedirs(out)
    open(os.path.join(out, "stale.txt"), "w").write("old")
    hf_weights.save_pretrained(params, cfg, out, tokenizer=tok, dtype="bfloat16")
    assert not os.path.exists(os.path.join(out, "stale.txt"))  # replaced as a whole
    d = json.load(open(os.path.join(out, "config.json")))
    assert d["architectures"] == ["LLaDAModelLM"] and d["model_type"] == "llada"
    for k in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size",
              "rope_theta", "rms_norm_eps", "mask_token_id", "weight_tying", "max_sequence_length"):
        assert k in d
    assert (d["d_model"], d["mlp_hidden_size"], d["mask_token_id"]) == (64, 128, 1)
    assert set(os.listdir(out)) >= {"config.json", "model.safetensors", "tokenizer.json"}
    sd = load_file(os.path.join(out, "model.safetensors"))  # readable by safetensors itself
    assert sd["model.transformer.blocks.0.ff_proj.weight"].dtype == torch.bfloat16
    assert set(sd) == set(hf_weights.key_map(cfg))
    # and the torch reference built from the saved folder reproduces our logits
    m = tref.load_hf_folder(out).float()
    p2, c2, _ = hf_weights.load_pretrained(out)
    ids = _ids(c2, (1, 32), seed=5)
    assert rel_err(ours(p2, ids, c2.replace(dtype="float32")), torch_logits("llada", m, ids)) <= TOL


def test_save_rejects_mismatched_params(tiny_llada, tmp_path):
    params, cfg, _ = tiny_llada
    with pytest.raises(CheckpointError, match=r"layers/w_gate has shape \(2, 64, 128\), config expects \(2, 64, 256\)"):
        hf_weights.save_pretrained(params, cfg.replace(d_ff=256), str(tmp_path / "x"))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# torch_ref hook points = our activation semantics
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["llada", "moe"])
def test_torch_hook_points_match_our_acts(loaded, name):
    """Forward hooks on the documented torch_ref modules (LLaDA: attn_out / ff_out / block; LLaDA-MoE:
    self_attn.o_proj / mlp / layer) capture exactly our attn / mlp / resid activations."""
    from timerome_jax.backbone.intervene import Intervene

    params, cfg, _, m = loaded[name]
    ids = _ids(cfg, (2, 24), seed=9)
    rp = np.array([[0, 7, 23], [3, 4, 20]])
    if name == "llada":
        layers = m.model.transformer.blocks
        mods = {"attn": lambda b: b.attn_out, "mlp": lambda b: b.ff_out, "resid": lambda b: b}
    else:
        layers = m.model.layers
        mods = {"attn": lambda b: b.self_attn.o_proj, "mlp": lambda b: b.mlp, "resid": lambda b: b}
    caught, hooks = {k: [] for k in mods}, []
    for blk in layers:
        for k, get in mods.items():
            hooks.append(get(blk).register_forward_hook(lambda mod, inp, out, k=k: caught[k].append(out.detach())))
    try:
        torch_logits(name, m, ids)
    finally:
        for h in hooks:
            h.remove()
    with jax.default_matmul_precision("highest"):
        out = model.run(params, jnp.asarray(ids, jnp.int32), cfg, intervene=Intervene(read_pos=jnp.asarray(rp)))
    for k in mods:
        ref = np.stack([t.numpy()[np.arange(2)[:, None], rp] for t in caught[k]])
        assert ref.shape == out.acts[k].shape == (cfg.n_layers, 2, 3, cfg.d_model)
        assert rel_err(out.acts[k], ref) <= TOL, k
