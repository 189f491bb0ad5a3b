"""Unstacked layers (`model.unstack`, fused projections): the same numbers as the stacked tree in every mode of `run`
(plain, patch, shift, read, stop_layer, edit), identical generations with and without an edit, one
compile for a new edit memory, and the same model fingerprint."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timerome_jax.backbone import model
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene, Patch, Shift
from timerome_jax.diffusion import sampler as S
from timerome_jax.method import capture as cap_lib
from timerome_jax.method import memory as mem_lib

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                  mask_token_id=63, pad_token_id=0, eos_token_id=0, max_seq_len=64)
UNROLLED = CFG.replace(layer_unroll=CFG.n_layers)
run = jax.jit(model.run, static_argnames=("cfg", "stop_layer"))


def memory(seed, layer=1, module="resid"):
    rng = np.random.default_rng(seed)
    u, vo, vt = (rng.standard_normal((3, CFG.d_model)).astype(np.float32) for _ in range(3))
    return mem_lib.build(u, vo, vt, lam=1.0, alpha=0.5, q=0, layer=layer, module=module, step=-1)


@pytest.mark.slow
def test_unstack_roundtrip_and_run_identical():
    params = model.init_params(jax.random.key(0), CFG, std=0.3)
    up = model.unstack(params)
    assert isinstance(up["layers"], list) and len(up["layers"]) == CFG.n_layers
    assert model.layer_shapes(up) == model.layer_shapes(params)
    qd, kvd = CFG.n_heads * CFG.head_dim, CFG.n_kv_heads * CFG.head_dim
    assert up["layers"][1]["wqkv"].shape == (CFG.d_model, qd + 2 * kvd) and "wq" not in up["layers"][1]
    assert up["layers"][1]["w_gate_up"].shape == (CFG.d_model, 2 * CFG.d_ff) and "w_up" not in up["layers"][1]
    np.testing.assert_array_equal(up["layers"][1]["wqkv"][:, qd:qd + kvd], params["layers"]["wk"][1])
    np.testing.assert_array_equal(up["layers"][1]["w_gate_up"][:, CFG.d_ff:], params["layers"]["w_up"][1])
    chex.assert_trees_all_equal(model.stack(up), params)
    tok = jax.random.randint(jax.random.key(1), (2, 10), 2, 60)
    pad = jnp.ones((2, 10), bool).at[0, :3].set(False)
    pos = jnp.array([[4, 5], [1, 2]])
    valid = jnp.array([[True, True], [True, False]])
    ivs = [Intervene(),
           Intervene(read_pos=pos, patch=Patch(jnp.int32(1), jnp.int32(0), jnp.int32(2), pos, valid,
                                                jnp.ones((2, 2, 32)))),
           Intervene(shift=Shift(pos, valid, 0.1 * jnp.ones((3, 3, 2, 2, 32)))),
           Intervene(edit=memory(1, layer=0, module="mlp"), read_pos=pos)]
    for iv in ivs:
        a = run(params, tok, UNROLLED, pad, iv, 0)
        b = run(up, tok, CFG, pad, iv, 0)
        chex.assert_trees_all_equal(a, b)  # the unrolled stacked loop: bit-identical
        if iv is ivs[0]:
            plain = b
    c = run(params, tok, CFG, pad, ivs[0], 0)  # the rolled scan: same up to fusion order
    np.testing.assert_allclose(plain.logits, c.logits, rtol=1e-5, atol=1e-5)
    a = run(params, tok, UNROLLED, pad, Intervene(read_pos=pos), 0, stop_layer=1)
    b = run(up, tok, CFG, pad, Intervene(read_pos=pos), 0, stop_layer=1)
    assert b.logits is None
    chex.assert_trees_all_equal(a, b)
    assert cap_lib.model_fingerprint(params, CFG) == cap_lib.model_fingerprint(up, CFG)
    for name in ("wq", "wv", "w_up"):  # a change in any part of a fused matrix changes the id
        w = model.layer_weight(up, name, 2)
        changed = model.with_layer_weight(up, name, 2, w.at[-1].add(1.0))
        assert cap_lib.model_fingerprint(changed, CFG) != cap_lib.model_fingerprint(params, CFG)
    assert cap_lib.model_fingerprint(changed, CFG) != cap_lib.model_fingerprint(params, CFG)


@pytest.mark.slow  # four generate compiles (stacked/unstacked, with/without an edit)
def test_generate_identical_and_one_compile_for_new_memories(monkeypatch):
    params = model.init_params(jax.random.key(2), CFG, std=0.3)
    up = model.unstack(params)
    scfg = S.SamplerConfig(steps=4, remasking="low_confidence", temperature=0.0)
    x, pad, pm = S.make_canvas([[5, 6, 7], [8, 9]], 6, CFG)
    for mem in (None, memory(3)):
        iv = None if mem is None else Intervene(edit=mem)
        a = S.generate(params, UNROLLED, scfg, x, pad, pm, 0, iv)
        b = S.generate(up, CFG, scfg, x, pad, pm, 0, iv)
        np.testing.assert_array_equal(a, b)
    counted = chex.assert_max_traces(S._generate_impl, n=1)
    monkeypatch.setattr(S, "_generate_impl", counted)
    before = S.generate_scan._cache_size()
    for seed in (4, 5, 6):
        S.generate(up, CFG, scfg, x, pad, pm, 0, Intervene(edit=memory(seed, layer=2)))
    assert S.generate_scan._cache_size() == before + 1  # new facts are data, not a new program
    chex.clear_trace_counter()


def test_unstack_fuses_dense_projections_only():
    moe = CFG.replace(family="llada_moe", n_experts=4, n_experts_per_tok=2, d_expert=16, qk_norm=True)
    params = model.init_params(jax.random.key(3), moe, std=0.3)
    up = model.unstack(params)
    lp = up["layers"][0]
    assert "wqkv" in lp and lp["w_gate"].shape == (4, 32, 16) and "w_gate_up" not in lp  # experts stay apart
    assert model.layer_shapes(up) == model.layer_shapes(params)
    chex.assert_trees_all_equal(model.stack(up), params)
    tok = jax.random.randint(jax.random.key(1), (2, 10), 2, 60)
    np.testing.assert_allclose(run(up, tok, moe, None, Intervene(), 0).logits,
                               run(params, tok, moe.replace(layer_unroll=moe.n_layers), None, Intervene(), 0).logits,
                               rtol=1e-6, atol=1e-6)
