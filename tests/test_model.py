"""model.py properties: scan == unrolled loop, interventions as data (compile once, vmap), no-op
patches, early stopping and the activations read at read_pos."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timerome_jax.backbone import model
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene, Patch

B, T, S = 2, 12, 3


def _moe_cfg():
    return ModelConfig(family="llada_moe", vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                       head_dim=8, d_ff=0, rope_theta=5e4, qk_norm=True, n_experts=4, n_experts_per_tok=2,
                       d_expert=16, mask_token_id=1, pad_token_id=0, eos_token_id=0, max_seq_len=128)


def _dream_cfg():
    return ModelConfig(family="dream", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=8, d_ff=64, rope_theta=1e6, qkv_bias=True, logits_shift=True,
                       mask_token_id=1, pad_token_id=0, eos_token_id=0, max_seq_len=128)


@pytest.fixture(scope="module")
def models(tiny_llada):
    params, cfg, _ = tiny_llada
    out = {"llada": (params, cfg)}
    for name, c in (("moe", _moe_cfg()), ("dream", _dream_cfg())):
        p = model.init_params(jax.random.PRNGKey(len(name)), c, std=0.3)
        # random (not unit) norm weights so a mixed-up norm would show
        p = jax.tree_util.tree_map_with_path(
            lambda path, x: x * (1 + 0.1 * jax.random.normal(jax.random.PRNGKey(7), x.shape))
            if "norm" in jax.tree_util.keystr(path) else x, p)
        out[name] = (p, c)
    return out


def _tokens(cfg, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(2, cfg.vocab_size, size=(B, T)), jnp.int32)


def _read_pos():
    return jnp.asarray([[0, 5, 11], [2, 3, 9]], jnp.int32)


def unrolled(params, tokens, cfg, pad_mask=None, read_pos=None):
    """The same forward as `model.run`, written as a plain Python loop over layers (no scan).

    It calls the library's own `embed`, `rope_tables`, `attn_block`, `mlp_block` and `head`, so it
    checks the layer loop (scan, stacked-weight indexing, residual adds, activation reads), not what a
    block computes. The block math is checked independently against the HF/PyTorch models in
    test_hf.py (`test_parity_*`) and, for LLaDA, against a NumPy forward in
    test_trace.py::test_tie_by_hand_numpy."""
    x = model.embed(params, tokens, cfg)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    cos, sin = model.rope_tables(pos, cfg.rot_dim, cfg.rope_theta)
    acts = {"resid": [], "attn": [], "mlp": []}
    rows = jnp.arange(tokens.shape[0])[:, None]
    for l in range(cfg.n_layers):
        lp = jax.tree.map(lambda a: a[l], params["layers"])
        a = model.attn_block(lp, x, cos, sin, pad_mask, cfg)
        x = x + a
        m = model.mlp_block(lp, x, cfg)
        x = x + m
        if read_pos is not None:
            for k, v in (("resid", x), ("attn", a), ("mlp", m)):
                acts[k].append(v[rows, read_pos])
    return model.head(params, x, cfg), {k: jnp.stack(v) for k, v in acts.items()} if read_pos is not None else None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llada", "moe", "dream"])
def test_scan_equals_unrolled_loop(models, name):
    params, cfg = models[name]
    tok = _tokens(cfg)
    pad = jnp.asarray(np.arange(T)[None] >= np.array([[0], [4]]))  # row 1 left-padded by 4
    rp = _read_pos()
    with jax.default_matmul_precision("highest"):
        out = jax.jit(model.run, static_argnums=2)(params, tok, cfg, pad, Intervene(read_pos=rp))
        ref_logits, ref_acts = jax.jit(unrolled, static_argnums=2)(params, tok, cfg, pad, rp)
    np.testing.assert_allclose(out.logits, ref_logits, rtol=1e-5, atol=1e-5)
    for k in ("resid", "attn", "mlp"):
        assert out.acts[k].shape == (cfg.n_layers, B, S, cfg.d_model)  # documented [L, B, S, D]
        np.testing.assert_allclose(out.acts[k], ref_acts[k], rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(out.logits)).max() > 0.1  # not a degenerate all-zero comparison


@pytest.mark.slow
@pytest.mark.parametrize("unroll", [2, 99])
def test_layer_unroll_changes_no_number(models, unroll):
    """cfg.layer_unroll (partly / fully unrolled layer loop) is a speed knob: same logits and reads,
    with and without an edit memory splitting the layers at its (static) layer."""
    from timerome_jax.method import memory as M

    params, cfg = models["moe"]  # 3 layers
    tok = _tokens(cfg, 2)
    rng = np.random.default_rng(0)
    u = rng.normal(size=(3, cfg.d_model))
    mem = M.build(u, np.zeros_like(u), rng.normal(size=(3, cfg.d_model)), lam=1.0, alpha=1.0, q=2,
                  layer=1, module="mlp")
    for iv in (Intervene(read_pos=_read_pos()), Intervene(read_pos=_read_pos(), edit=mem)):
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(model.run, static_argnums=2)(params, tok, cfg, None, iv)
            got = jax.jit(model.run, static_argnums=2)(params, tok, cfg.replace(layer_unroll=unroll), None, iv)
        np.testing.assert_allclose(got.logits, ref.logits, rtol=1e-6, atol=1e-6)
        for k in ("resid", "attn", "mlp"):
            assert got.acts[k].shape == ref.acts[k].shape == (cfg.n_layers, B, S, cfg.d_model)
            np.testing.assert_allclose(got.acts[k], ref.acts[k], rtol=1e-6, atol=1e-6)
    plain = jax.jit(model.forward, static_argnums=2)(params, tok, cfg)
    assert np.abs(np.asarray(ref.logits - plain)).max() > 1e-3  # the edit really acted


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llada", "dream"])
def test_zero_noise_is_identity(models, name):
    params, cfg = models[name]
    tok = _tokens(cfg, 1)
    f = jax.jit(model.forward, static_argnums=2)
    plain = f(params, tok, cfg)
    noisy = f(params, tok, cfg, None, Intervene(noise=jnp.zeros((B, T, cfg.d_model))))
    np.testing.assert_array_equal(noisy, plain)
    some = f(params, tok, cfg, None, Intervene(noise=jnp.full((B, T, cfg.d_model), 0.5)))
    assert np.abs(np.asarray(some - plain)).max() > 1e-3


def _patch(layer, module, value, step=0, pos=None):
    return Patch(layer=jnp.int32(layer), step=jnp.int32(step), module=jnp.int32(module),
                 pos=_read_pos() if pos is None else pos, valid=jnp.ones((B, S), bool), value=value)


@pytest.mark.slow
def test_patches_compile_once_and_batch(models):
    params, cfg = models["llada"]
    tok = _tokens(cfg, 2)
    chex.clear_trace_counter()

    # (chex matches "vmap." in the function's qualified name, hence the test's name without it)
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(patch):
        return model.forward(params, tok, cfg, intervene=Intervene(patch=patch), step=0)

    key = jax.random.PRNGKey(0)
    patches = [_patch(l, m, jax.random.normal(jax.random.fold_in(key, 3 * l + m), (B, S, cfg.d_model)))
               for l, m in ((0, 0), (1, 1), (0, 2), (1, 0))]
    with jax.default_matmul_precision("highest"):
        loop = [f(p) for p in patches]  # 4 different patches, one trace (assert_max_traces raises otherwise)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *patches)
        batched = jax.jit(jax.vmap(lambda p: model.forward(params, tok, cfg, intervene=Intervene(patch=p))))(stacked)
    # a different *shape* is new structure and does retrace: the counter is really armed
    two = Patch(layer=jnp.int32(0), step=jnp.int32(0), module=jnp.int32(0), pos=_read_pos()[:, :2],
                valid=jnp.ones((B, 2), bool), value=jnp.zeros((B, 2, cfg.d_model)))
    with pytest.raises(AssertionError, match="traced"):
        f(two)
    for i, want in enumerate(loop):
        np.testing.assert_allclose(batched[i], want, rtol=1e-5, atol=1e-5)
    # the patches really act (and differently)
    plain = model.forward(params, tok, cfg)
    assert all(np.abs(np.asarray(x - plain)).max() > 1e-3 for x in loop)
    assert np.abs(np.asarray(loop[0] - loop[1])).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("module", [0, 1, 2])
def test_patch_with_own_clean_value_is_noop(models, module):
    params, cfg = models["moe"]
    tok, rp = _tokens(cfg, 3), _read_pos()
    run = jax.jit(model.run, static_argnums=2)
    clean = run(params, tok, cfg, None, Intervene(read_pos=rp))
    names = ("resid", "attn", "mlp")

    def patched(layer, value, step):
        return run(params, tok, cfg, None, Intervene(patch=_patch(layer, module, value)), step).logits

    for layer in range(cfg.n_layers):
        own = clean.acts[names[module]][layer]
        same = patched(layer, own, 0)
        off = patched(layer, own, 1)  # same program, patch aimed at another step: not applied
        np.testing.assert_array_equal(same, off)
        np.testing.assert_allclose(same, clean.logits, rtol=1e-6, atol=1e-6)
    other = clean.acts[names[module]][0] + 1.0
    assert np.abs(np.asarray(patched(1, other, 0) - clean.logits)).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("stop", [0, 1, 2])
def test_stop_layer_acts_equal_full_run(models, stop):
    params, cfg = models["moe"]
    tok, rp = _tokens(cfg, 4), _read_pos()
    iv = Intervene(read_pos=rp)
    full = jax.jit(model.run, static_argnums=2)(params, tok, cfg, None, iv)
    part = jax.jit(model.run, static_argnums=(2, 6))(params, tok, cfg, None, iv, 0, stop)
    assert part.logits is None
    for k in ("resid", "attn", "mlp"):
        assert part.acts[k].shape == (stop + 1, B, S, cfg.d_model)
        np.testing.assert_allclose(part.acts[k], full.acts[k][: stop + 1], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_read_pos_semantics(models):
    """resid = block output, attn/mlp = sub-layer outputs before the residual add, gathered per row."""
    params, cfg = models["llada"]
    tok, rp = _tokens(cfg, 5), _read_pos()
    out = model.run(params, tok, cfg, intervene=Intervene(read_pos=rp))
    assert set(out.acts) == {"resid", "attn", "mlp"}
    full = model.run(params, tok, cfg, intervene=Intervene(read_pos=jnp.tile(jnp.arange(T)[None], (B, 1))))
    for k in out.acts:
        assert full.acts[k].shape == (cfg.n_layers, B, T, cfg.d_model)
        np.testing.assert_array_equal(out.acts[k], jnp.take_along_axis(full.acts[k], rp[None, :, :, None], axis=2))
    # resid of layer l = resid of layer l-1 + attn + mlp of layer l
    r, a, m = full.acts["resid"], full.acts["attn"], full.acts["mlp"]
    np.testing.assert_allclose(r[1], r[0] + a[1] + m[1], rtol=1e-5, atol=1e-5)
    emb = model.embed(params, tok, cfg)
    np.testing.assert_allclose(r[0], emb + a[0] + m[0], rtol=1e-5, atol=1e-5)
    assert model.run(params, tok, cfg).acts is None


@pytest.mark.parametrize("rot_dim", [8, 4])
def test_rope_equals_hf_rotate_half(rot_dim):
    """`apply_rope` writes rotate_half as the halves reversed times (-1, 1): bit-equal to HF's
    concatenate form, full and partial rotary (the rest of each head passes through)."""
    x = jax.random.normal(jax.random.PRNGKey(3), (B, T, 4, 8), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = model.rope_tables(pos, rot_dim, 1e4)
    xr, half = x[..., :rot_dim], rot_dim // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    want = jnp.concatenate([xr * cos[:, :, None] + rotated * sin[:, :, None], x[..., rot_dim:]], axis=-1)
    np.testing.assert_array_equal(model.apply_rope(x, cos, sin, rot_dim), want)


def test_attention_mask_drops_a_mask_that_masks_nothing(models):
    """`attention_mask` hands None for an all-True mask (and None), the mask itself otherwise; the
    forward without a mask equals the one with the all-True mask."""
    params, cfg = models["llada"]
    full = np.ones((B, T), bool)
    padded = full.copy()
    padded[1, :3] = False
    assert model.attention_mask(full) is None and model.attention_mask(None) is None
    assert model.attention_mask(padded) is padded
    tok = _tokens(cfg, 6)
    np.testing.assert_array_equal(model.forward(params, tok, cfg, None), model.forward(params, tok, cfg, jnp.asarray(full)))
