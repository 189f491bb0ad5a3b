"""Tests for timerome_jax.method.memory (edit memory), .capture, .memory_file (save/load) and torch_ref/hooks.py."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import torch_logits
from hypothesis import given, settings, strategies as st

from timerome_jax.method import capture as CAP
from timerome_jax.method import memory as M
from timerome_jax.method import memory_file as MF
from timerome_jax.backbone import model
from timerome_jax.backbone.config import MODULES, ModelConfig
from timerome_jax.backbone.intervene import Intervene, Patch
from timerome_jax.torch_ref import hooks as H

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, rope_theta=10000.0, mask_token_id=96, pad_token_id=0, eos_token_id=1,
                  max_seq_len=64)
HYP = settings(max_examples=15, deadline=None)


@pytest.fixture(scope="module")
def params():
    # numpy init (faster than eager jax.random per leaf); std 0.2 so that edits and patches
    # visibly move the logits of this tiny model
    rng = np.random.default_rng(0)
    shapes = model.param_shapes(CFG)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.2),
        shapes, is_leaf=lambda s: isinstance(s, tuple))


_fwd = jax.jit(model.forward, static_argnames="cfg")


def fwd(params, tokens, iv=None, step=0):
    return _fwd(params, tokens, CFG, intervene=iv, step=step)


def rand_mem(rng, n, d=32, capacity=None, lam=0.5, alpha=1.0, q=0, layer=1, module=0, step=-1,
             scale=1.0):
    u, vo, vt = (scale * rng.normal(size=(n, d)) for _ in range(3))
    return M.build(u, vo, vt, lam, alpha, q, layer, module, step=step, capacity=capacity)


@jax.jit
def _delta(mem, h):
    return mem.delta(h)


def delta_np(mem, h):
    with jax.default_matmul_precision("highest"):
        return np.asarray(_delta(mem, jnp.asarray(h, jnp.float32)))


# --------------------------------------------------------------------------------------------
# memory algebra
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@HYP
@given(n=st.integers(1, 6), d=st.integers(2, 10), extra=st.integers(0, 3),
       lam=st.floats(0.05, 20.0), seed=st.integers(0, 2**31 - 1))
def test_kernel_form_equals_primal_ridge(n, d, extra, lam, seed):
    rng = np.random.default_rng(seed)
    u, vo, vt = rng.normal(size=(3, n, d))
    mem = M.build(u, vo, vt, lam, 1.0, 0, 0, "resid", capacity=n + extra)
    # primal ridge: M* = argmin sum |M u_z - d_z|^2 + lam |M|_F^2 = D^T U (U^T U + lam I_H)^{-1}
    Dt = (vt - vo).T
    Mstar = Dt @ u @ np.linalg.inv(u.T @ u + lam * np.eye(d))
    h = rng.normal(size=(2, 3, d))
    want = h @ Mstar.T
    got = delta_np(mem, h)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    G = np.asarray(mem.G, np.float64)
    np.testing.assert_allclose(G[:n, :n], np.linalg.inv(u @ u.T + lam * np.eye(n)), rtol=1e-4,
                               atol=1e-5 / lam)
    # inactive rows are decoupled from active ones
    assert np.all(G[:n, n:] == 0) and np.all(G[n:, :n] == 0)


@pytest.mark.slow
@HYP
@given(n=st.integers(1, 6), extra=st.integers(0, 3), q_big=st.integers(0, 5),
       seed=st.integers(0, 2**31 - 1))
def test_topq_zero_and_large_equal_dense(n, extra, q_big, seed):
    rng = np.random.default_rng(seed)
    dense = rand_mem(rng, n, capacity=n + extra)
    h = rng.normal(size=(2, 4, 32))
    want = delta_np(dense, h)
    for q in (0, n + q_big):
        got = delta_np(dataclasses.replace(dense, q=jnp.int32(q)), h)
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
@HYP
@given(n=st.integers(2, 8), q=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
def test_topq_keeps_exactly_q_largest(n, q, seed):
    rng = np.random.default_rng(seed)
    mem = rand_mem(rng, n, capacity=n + 2)
    mem_q = dataclasses.replace(mem, q=jnp.int32(q))
    h = jnp.asarray(rng.normal(size=(3, 5, 32)), jnp.float32)
    dense = np.asarray(mem.coefficients(h))
    kept = np.asarray(mem_q.coefficients(h))
    mags = np.abs(dense[..., :n]).reshape(-1, n)
    assert all(len(set(r.tolist())) == n for r in mags), "random draws gave tied magnitudes"
    k = min(q, n)
    nz = (kept != 0).reshape(-1, n + 2)
    assert np.all(nz[:, n:] == 0), "inactive slots fired"
    assert np.all(nz.sum(-1) == k)
    top = np.argsort(-mags, axis=-1)[:, :k]
    for row, t in zip(nz, top):
        assert set(np.flatnonzero(row).tolist()) == set(t.tolist())
    np.testing.assert_array_equal(kept[kept != 0], dense[kept != 0])


def test_top_q_tie_rule():
    c = jnp.asarray([[3.0, -2.0, 2.0, 1.0, 0.0]])
    np.testing.assert_array_equal(M.top_q(c, 1), [[3.0, 0, 0, 0, 0]])
    # ties at the q-th largest magnitude are all kept
    np.testing.assert_array_equal(M.top_q(c, 2), [[3.0, -2.0, 2.0, 0, 0]])
    np.testing.assert_array_equal(M.top_q(c, 0), c)
    np.testing.assert_array_equal(M.top_q(c, 99), c)


@pytest.mark.slow
@HYP
@given(n=st.integers(1, 5), extra=st.integers(0, 2), seed=st.integers(0, 2**31 - 1))
def test_insert_then_remove_restores_previous(n, extra, seed):
    rng = np.random.default_rng(seed)
    prev = rand_mem(rng, n, capacity=n + extra)
    u_new, d_new = rng.normal(size=(2, 32))
    new = M.insert(prev, u_new, d_new)
    assert M.n_facts(new) == n + 1
    assert new.capacity == (2 * n if extra == 0 else n + extra)  # full memories double
    h = rng.normal(size=(2, 3, 32))
    assert not np.allclose(delta_np(new, h), delta_np(prev, h))
    slot = n  # lowest free slot of `prev`
    assert bool(new.active[slot]) and np.array_equal(np.asarray(new.U[slot]), np.float32(u_new))
    back = M.remove(new, slot)
    assert M.n_facts(back) == n
    C = prev.capacity
    np.testing.assert_array_equal(np.asarray(back.G)[:C, :C], np.asarray(prev.G))
    np.testing.assert_array_equal(np.asarray(back.U)[:C], np.asarray(prev.U))
    np.testing.assert_array_equal(np.asarray(back.active)[:C], np.asarray(prev.active))
    np.testing.assert_allclose(delta_np(back, h), delta_np(prev, h), rtol=1e-6, atol=1e-6)


def test_streaming_inserts_equal_build():
    rng = np.random.default_rng(1)
    u, vo, vt = rng.normal(size=(3, 5, 32)).astype(np.float32)
    mem = M.empty(32, 1, 0.5, 1.5, 2, 1, "resid")
    assert M.n_facts(mem) == 0
    for i in range(5):
        mem = M.insert(mem, u[i], vt[i] - vo[i])
    assert mem.capacity == 8  # 1 -> 2 -> 4 -> 8 by doubling
    ref = M.build(u, vo, vt, 0.5, 1.5, 2, 1, "resid", capacity=8)
    for f in ("U", "Dm", "G", "active"):
        np.testing.assert_array_equal(np.asarray(getattr(mem, f)), np.asarray(getattr(ref, f)))
    h = rng.normal(size=(2, 3, 32))
    np.testing.assert_array_equal(delta_np(mem, h), delta_np(ref, h))
    # a removed slot is reused by the next insert
    u5, d5 = rng.normal(size=(2, 32)).astype(np.float32)
    mem2 = M.insert(M.remove(mem, 1), u5, d5)
    assert bool(mem2.active[1]) and M.n_facts(mem2) == 5
    ref2 = M.build(np.stack([u[0], u5, u[2], u[3], u[4]]), np.zeros((5, 32)),
                   np.stack([vt[0] - vo[0], d5, vt[2] - vo[2], vt[3] - vo[3], vt[4] - vo[4]]),
                   0.5, 1.5, 2, 1, "resid", capacity=8)
    np.testing.assert_array_equal(np.asarray(mem2.G), np.asarray(ref2.G))
    # several facts at once
    mem3 = M.insert(M.empty(32, 2, 0.5, 1.5, 2, 1, "resid"), u, vt - vo)
    np.testing.assert_array_equal(np.asarray(mem3.G), np.asarray(ref.G))


@pytest.mark.slow
@HYP
@given(n=st.integers(1, 4), scale=st.floats(0.01, 100.0), g_max=st.floats(0.1, 3.0),
       seed=st.integers(0, 2**31 - 1))
def test_gate_bounds_and_naive_sum(n, scale, g_max, seed):
    rng = np.random.default_rng(seed)
    u, d = rng.normal(size=(2, n, 32))
    e = M.gated_edit(u, d, alpha=1.7, layer=0, module="mlp", g_max=g_max, eps=1e-6)
    # tokens aligned with keys (large gates), anti-aligned (negative), and random
    h = np.concatenate([scale * u, -scale * u, scale * rng.normal(size=(4, 32))])[None]
    g = np.asarray(e.gate(jnp.asarray(h, jnp.float32)))
    assert g.min() >= 0.0 and g.max() <= np.float32(g_max)
    want = sum(delta_np(M.gated_edit(u[f], d[f], 1.7, 0, "mlp", g_max=g_max), h) for f in range(n))
    np.testing.assert_allclose(delta_np(e, h), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    gn = np.clip(h @ u.T / ((u * u).sum(-1) + 1e-6), 0, g_max)
    np.testing.assert_allclose(delta_np(e, h), 1.7 * gn @ d, rtol=1e-4,
                               atol=1e-4 * np.abs(gn @ d).max() + 1e-6)


def test_build_and_edit_errors():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(3, 8))
    for lam in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            M.build(u, u, u, lam, 1.0, 0, 0, 0)
    with pytest.raises(ValueError, match="empty"):
        M.build(np.zeros((0, 8)), np.zeros((0, 8)), np.zeros((0, 8)), 1.0, 1.0, 0, 0, 0)
    with pytest.raises(ValueError, match="shape"):
        M.build(u, u[:2], u, 1.0, 1.0, 0, 0, 0)
    with pytest.raises(ValueError, match="capacity"):
        M.build(u, u, u, 1.0, 1.0, 0, 0, 0, capacity=2)
    with pytest.raises(ValueError, match="q must"):
        M.build(u, u, u, 1.0, 1.0, -1, 0, 0)
    with pytest.raises(ValueError, match="unknown module"):
        M.build(u, u, u, 1.0, 1.0, 0, 0, "mpl")
    mem = M.build(u, u, u, 1.0, 1.0, 0, 0, 0, capacity=4)
    with pytest.raises(ValueError, match=r"slot\(s\) \[3\]"):
        M.remove(mem, 3)
    with pytest.raises(ValueError, match="hidden size"):
        M.insert(mem, np.zeros(9), np.zeros(9))


# --------------------------------------------------------------------------------------------
# the edit inside the forward
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_empty_memory_is_bit_exact(params, module):
    rng = np.random.default_rng(0)
    tok = jnp.asarray(rng.integers(2, 96, (2, 9)))
    base = np.asarray(fwd(params, tok))
    empty = M.empty(32, 3, 0.5, 3.0, 0, 1, module)
    drained = M.remove(rand_mem(rng, 2, capacity=3, alpha=3.0, module=module), [0, 1])
    for mem in (empty, drained):
        assert M.n_facts(mem) == 0
        out = np.asarray(fwd(params, tok, Intervene(edit=mem)))
        assert np.array_equal(out, base)
    # a live memory at the same coordinate does move the logits
    live = rand_mem(rng, 2, capacity=3, alpha=3.0, module=module)
    assert not np.allclose(np.asarray(fwd(params, tok, Intervene(edit=live))), base, atol=1e-3)


@pytest.mark.slow
def test_edit_fires_only_at_its_coordinate(params):
    rng = np.random.default_rng(2)
    tok = jnp.asarray(rng.integers(2, 96, (1, 7)))
    u, vo, vt = rng.normal(size=(3, 2, 32))
    at = lambda layer, step: M.build(u, vo, vt, 0.5, 2.0, 0, layer, "resid", step=step)
    base0, base2 = np.asarray(fwd(params, tok, step=0)), np.asarray(fwd(params, tok, step=2))
    assert np.array_equal(np.asarray(fwd(params, tok, Intervene(edit=at(1, 2)), step=0)), base0)
    e2 = np.asarray(fwd(params, tok, Intervene(edit=at(1, 2)), step=2))
    assert not np.allclose(e2, base2, atol=1e-3)
    every = np.asarray(fwd(params, tok, Intervene(edit=at(1, -1)), step=2))
    np.testing.assert_array_equal(every, e2)
    assert not np.allclose(np.asarray(fwd(params, tok, Intervene(edit=at(0, -1)), step=2)), e2,
                           atol=1e-3)


@pytest.mark.slow
def test_memories_of_one_capacity_and_layer_compile_once(params):
    """Facts, alpha, q, lam and step are data; the layer (like the module) is structure."""
    rng = np.random.default_rng(3)
    tok = jnp.asarray(rng.integers(2, 96, (2, 8)))
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(params, tokens, mem):
        return model.forward(params, tokens, CFG, intervene=Intervene(edit=mem), step=3)

    mems = [rand_mem(rng, 2, capacity=6), rand_mem(rng, 5, capacity=6, q=3, alpha=0.5),
            rand_mem(rng, 6, capacity=6, layer=1, step=3, lam=2.0),
            M.empty(32, 6, 1.0, 1.0, 1, 1, "resid")]
    mems.append(M.insert(mems[0], rng.normal(size=32), rng.normal(size=32)))
    mems.append(M.remove(mems[1], [0, 2]))
    outs = [np.asarray(f(params, tok, m)) for m in mems]
    assert len({o.tobytes() for o in outs}) == len(outs)  # really different memories
    with pytest.raises(AssertionError, match="traced > 1"):  # another layer: a second program
        f(params, tok, rand_mem(rng, 2, capacity=6, layer=0))


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------

class ToyTok:
    """Characters -> ids 2..91 (0 = pad, 1 = eos)."""

    def encode(self, text, add_special_tokens=True):
        return [2 + (ord(c) % 90) for c in text]


FACTS = [("Who wrote Dune? ", [4, 5, 6, 7, 8, 9], "Frank Herbert"),
         ("The capital of France is ", [15, 16, 17, 18, 19, 20], "Paris"),
         ("Ann's father is ", [0, 1, 2], "a baker"),
         ("Q: Bob Ray was born in ", [3, 4, 5, 6, 7, 8], "1950, in Lima"),
         ("Zed ", [0, 1, 2], "no")]


def cloze_batch(facts=FACTS, target="I don't know."):
    tok = ToyTok()
    return CAP.make_cloze_batch(tok, [f[0] for f in facts], [f[1] for f in facts],
                              [f[2] for f in facts], target_text=target, cfg=CFG)


def test_make_cloze_batch_layout():
    b = cloze_batch()
    tok = ToyTok()
    assert b.tokens_o.shape[1] % 8 == 0 and b.tokens_t.shape[1] % 8 == 0
    for i, (p, s, o) in enumerate(FACTS):
        pi, oi, ti = tok.encode(p), tok.encode(o) + [1], tok.encode("I don't know.") + [1]
        row = np.asarray(b.tokens_o[i])
        assert row[: len(pi) + len(oi)].tolist() == pi + oi
        assert np.all(row[len(pi) + len(oi):] == CFG.pad_token_id)
        assert np.asarray(b.pad_o[i]).sum() == len(pi) + len(oi)
        assert np.asarray(b.subj_pos[i])[np.asarray(b.subj_valid[i])].tolist() == s
        assert np.asarray(b.obj_pos[i])[np.asarray(b.obj_valid[i])].tolist() == list(
            range(len(pi), len(pi) + len(oi)))
        assert np.asarray(b.tokens_t[i])[: len(pi) + len(ti)].tolist() == pi + ti
        assert np.asarray(b.tgt_pos[i])[np.asarray(b.tgt_valid[i])].tolist() == list(
            range(len(pi), len(pi) + len(ti)))
    with pytest.raises(ValueError, match="outside its prompt"):
        CAP.make_cloze_batch(tok, ["ab"], [[5]], ["x"], cfg=CFG)
    with pytest.raises(ValueError, match="no subject positions"):
        CAP.make_cloze_batch(tok, ["ab"], [[]], ["x"], cfg=CFG)
    with pytest.raises(ValueError, match="cfg is required"):
        CAP.make_cloze_batch(tok, ["ab"], [[0]], ["x"])


@functools.partial(jax.jit, static_argnames=("layer", "module"))
def _read_acts(params, tokens, pad, pos, layer, module):
    return model.run(params, tokens, CFG, pad, Intervene(read_pos=pos)).acts[module][layer]


def _mean(acts, valid):
    w = np.asarray(valid, np.float32)[..., None]
    return (np.asarray(acts) * w).sum(1) / w.sum(1)


@pytest.mark.slow
@pytest.mark.parametrize("layer,module", [(0, "mlp"), (1, "resid")])
def test_capture_equals_full_run_read(params, layer, module):
    b = cloze_batch()
    n_s = b.subj_pos.shape[1]
    with jax.default_matmul_precision("highest"):
        u, vo, vt = CAP.capture(params, CFG, b, layer, module, chunk=2)  # 5 facts: a padded chunk
        # the full forward (no stop_layer), read at subject+object positions, then at targets
        acts_o = _read_acts(params, b.tokens_o, b.pad_o, jnp.concatenate([b.subj_pos, b.obj_pos], 1),
                            layer, module)
        acts_t = _read_acts(params, b.tokens_t, b.pad_t, b.tgt_pos, layer, module)
    want_u, want_vo = _mean(acts_o[:, :n_s], b.subj_valid), _mean(acts_o[:, n_s:], b.obj_valid)
    want_vt = _mean(acts_t, b.tgt_valid)
    assert u.shape == vo.shape == vt.shape == (5, 32)
    for got, want in ((u, want_u), (vo, want_vo), (vt, want_vt)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want_vo, want_vt)


@pytest.mark.parametrize("field,name", [("subj_valid", "subject"), ("obj_valid", "object"), ("tgt_valid", "target")])
def test_capture_names_facts_without_positions(params, field, name):
    # the check runs inside the jitted capture (no host sync before it): the error still names the
    # facts and the field, for one chunk and for a padded multi-chunk run, and for the slot keys
    b = cloze_batch()
    bad = dataclasses.replace(b, **{field: getattr(b, field).at[jnp.asarray([1, 3])].set(False)})
    for chunk in (16, 2):
        with pytest.raises(ValueError, match=rf"facts \[1, 3\] have no valid {name} positions"):
            CAP.capture(params, CFG, bad, 1, "resid", chunk=chunk)
    with pytest.raises(ValueError, match=rf"facts \[1, 3\] have no valid {name} positions"):
        CAP.capture_slot_keys(params, CFG, bad, 1, "resid")


def test_capture_names_facts_with_non_finite_activations(params):
    b = cloze_batch()
    nan_params = {**params, "embed": params["embed"].at[int(b.tokens_o[2, 0])].set(jnp.nan)}
    with pytest.raises(ValueError, match=r"facts \[2\] have non-finite activations"):
        CAP.capture(nan_params, CFG, b, 1, "resid")


def test_capture_of_unstacked_params_runs_only_the_layers_it_needs(params):
    up = model.unstack(params)
    assert len(CAP.layers_up_to(up, 0)["layers"]) == 1 and CAP.layers_up_to(params, 0) is params
    b = cloze_batch()
    for got, want in zip(CAP.capture(up, CFG, b, 0, "mlp"), CAP.capture(params, CFG, b, 0, "mlp")):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_memory_reaches_the_device_the_same_packed_or_not(monkeypatch):
    # small memories go to the device as one packed buffer; larger ones array by array
    rng = np.random.default_rng(7)
    kw = dict(lam=0.7, alpha=-2.5, q=3, layer=1, module="mlp", step=5, capacity=6, fingerprint="x")
    packed = M.build(*rng.normal(size=(3, 4, 32)), **kw)
    monkeypatch.setattr(M, "PACK_MAX_FLOATS", 0)
    direct = M.build(*np.stack([np.asarray(packed.U)[:4], np.zeros((4, 32)), np.asarray(packed.Dm)[:4]]), **kw)
    for f in ("U", "Dm", "G", "W", "active", "alpha", "q", "lam", "step"):
        a, b = getattr(packed, f), getattr(direct, f)
        assert a.dtype == b.dtype and a.shape == b.shape, f
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f)
    assert int(packed.q) == 3 and int(packed.step) == 5 and np.asarray(packed.active).tolist() == [True] * 4 + [False] * 2


MEMORY_ARRAYS = ("U", "Dm", "G", "W", "active", "alpha", "q", "lam", "step")


@pytest.mark.parametrize("n,extra,lam", [(1, 0, None), (3, 2, None), (5, 0, 1e-6), (M.DEVICE_SOLVE_MAX, 1, 0.3)])
def test_build_on_device_equals_build(n, extra, lam):
    # keys sharing a large common component, so at lam 1e-6 U U^T + lam I has a condition number of
    # ~1e5 and a float32 solve would miss G by ~1e-3; the device solve is float64 like the host's
    rng = np.random.default_rng(n)
    u = (rng.normal(size=32) + 0.05 * rng.normal(size=(n, 32))).astype(np.float32)
    vo, vt = rng.normal(size=(2, n, 32)).astype(np.float32)
    kw = dict(alpha=-1.5, q=2, layer=1, module="mlp", step=4, capacity=n + extra, fingerprint="x")
    host = M.build(u, vo, vt, lam=M.default_lam(u) if lam is None else lam, **kw)
    dev = M.build_on_device(jnp.stack([u, vo, vt], axis=1), lam=lam, **kw)
    assert isinstance(dev, M.EditMemory) and (dev.layer, dev.module, dev.fingerprint) == (1, 2, "x")
    for f in MEMORY_ARRAYS:
        a, b = np.asarray(getattr(host, f)), np.asarray(getattr(dev, f))
        assert a.dtype == b.dtype and a.shape == b.shape, f
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7 * np.abs(a).max(), err_msg=f)
    assert np.asarray(dev.active).tolist() == [True] * n + [False] * extra


def test_build_on_device_errors():
    uvv = jnp.ones((3, 3, 8))
    with pytest.raises(ValueError, match="lam"):
        M.build_on_device(uvv, 0.0, 1.0, 0, 0, 0)
    with pytest.raises(ValueError, match=r"\[N, 3, D\].*got shape \(3, 8\)"):
        M.build_on_device(uvv[:, 0], None, 1.0, 0, 0, 0)
    with pytest.raises(ValueError, match="capacity 2 is smaller"):
        M.build_on_device(uvv, None, 1.0, 0, 0, 0, capacity=2)
    big = jnp.ones((M.DEVICE_SOLVE_MAX + 1, 3, 8))
    with pytest.raises(ValueError, match=rf"takes 1..{M.DEVICE_SOLVE_MAX} \(use `build`"):
        M.build_on_device(big, None, 1.0, 0, 0, 0)


def test_capture_on_device_then_finish_equals_capture(params):
    b = cloze_batch()
    uvv, empty = CAP.capture_on_device(params, CFG, b, 1, "attn")
    assert isinstance(uvv, jax.Array) and uvv.shape == (5, 3, 32) and empty.shape == (5, 3)
    for got, want in zip(CAP.finish_capture(uvv, empty), CAP.capture(params, CFG, b, 1, "attn")):
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, params):
    rng = np.random.default_rng(4)
    fp = CAP.model_fingerprint(params, CFG)
    mem = M.build(*rng.normal(size=(3, 3, 32)), 0.7, 2.0, 2, 1, "attn", step=3, capacity=5,
                  fingerprint=fp)
    path = tmp_path / "mem.npz"
    MF.save(mem, path, {"target_text": "I don't know.", "fact_ids": ["a", "b", "c"]})
    assert os.listdir(tmp_path) == ["mem.npz"]  # no temp file left behind
    got, meta = MF.load(path, expect_fingerprint=fp, expect_coordinate=(1, "attn", 3))
    assert meta["fact_ids"] == ["a", "b", "c"] and meta["target_text"] == "I don't know."
    assert meta["format_version"] == MF.FORMAT_VERSION and meta["module"] == "attn"
    assert jax.tree.structure(got) == jax.tree.structure(mem)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(mem)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    MF.load(path, expect_coordinate=(1, 1))  # module by id, no step
    # overwrite in place
    MF.save(M.remove(mem, 0), path, {})
    assert M.n_facts(MF.load(path)[0]) == 2


def test_load_errors(tmp_path, params):
    rng = np.random.default_rng(5)
    fp = CAP.model_fingerprint(params, CFG)
    mem = M.build(*rng.normal(size=(3, 4, 32)), 0.7, 2.0, 2, 1, "resid", fingerprint=fp)
    path = str(tmp_path / "mem.npz")
    MF.save(mem, path, {"fact_ids": [1, 2, 3, 4]})
    with pytest.raises(MF.ModelMismatchError, match="built for model"):
        MF.load(path, expect_fingerprint="dream-000")
    with pytest.raises(MF.CoordinateMismatchError, match="expected"):
        MF.load(path, expect_coordinate=(0, "resid"))
    with pytest.raises(MF.CoordinateMismatchError):
        MF.load(path, expect_coordinate=(1, "mlp"))
    with pytest.raises(MF.CoordinateMismatchError):
        MF.load(path, expect_coordinate=(1, "resid", 2))
    raw = open(path, "rb").read()
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MF.MemoryFileError, match="corrupt or truncated"):
        MF.load(trunc)
    # flip bytes inside the stored U array
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("U.npy")
    off = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    bad = bytearray(raw)
    bad[off: off + 8] = bytes(b ^ 0xFF for b in bad[off: off + 8])
    (tmp_path / "bad.npz").write_bytes(bytes(bad))
    with pytest.raises(MF.MemoryFileError):
        MF.load(tmp_path / "bad.npz")
    # another format version
    with np.load(path) as z:
        arrs = {k: z[k] for k in z.files}
    hdr = json.loads(bytes(arrs["meta"]).decode())
    hdr["format_version"] = 99
    arrs["meta"] = np.frombuffer(json.dumps(hdr).encode(), np.uint8)
    np.savez(tmp_path / "v99.npz", **arrs)
    with pytest.raises(MF.MemoryFileError, match="version 99"):
        MF.load(tmp_path / "v99.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(MF.MemoryFileError, match="missing entries"):
        MF.load(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError):
        MF.load(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="reserved"):
        MF.save(mem, path, {"layer": 3})
    with pytest.raises(ValueError, match="JSON"):
        MF.save(mem, path, {"x": object()})
    assert sorted(os.listdir(tmp_path)) == ["bad.npz", "mem.npz", "other.npz", "trunc.npz", "v99.npz"]


@pytest.mark.slow
def test_model_fingerprint(params):
    fp = CAP.model_fingerprint(params, CFG)
    assert fp == CAP.model_fingerprint(params, CFG)
    bf = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    assert CAP.model_fingerprint(bf, CFG.replace(dtype="bfloat16")) == fp
    other = jax.tree.map(lambda a: a, params)
    other["layers"] = dict(params["layers"], wq=params["layers"]["wq"].at[0, 0, :].add(0.5))
    assert CAP.model_fingerprint(other, CFG) != fp
    assert CAP.model_fingerprint(params, CFG.replace(rope_theta=5e5)) != fp


def test_model_fingerprint_is_cached_per_params_object(params, monkeypatch):
    fp = CAP.model_fingerprint(params, CFG, cache=False)
    assert CAP.model_fingerprint(params, CFG) == fp  # fills the cache
    reads = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: reads.append(1) or real(x))
    assert CAP.model_fingerprint(dict(params), CFG) == fp and not reads  # same leaf objects: no weight read
    assert CAP.model_fingerprint(params, CFG.replace(rope_theta=5e5)) != fp  # another config is recomputed
    other = dict(params, layers=dict(params["layers"], wq=params["layers"]["wq"].at[0, 0, :].add(0.5)))
    assert CAP.model_fingerprint(other, CFG) != fp
    # NumPy leaves can change in place: never cached
    npp = jax.tree.map(np.array, params)
    before = CAP.model_fingerprint(npp, CFG)
    npp["layers"]["wq"][0, 0, :] += 0.5
    assert CAP.model_fingerprint(npp, CFG) != before


# --------------------------------------------------------------------------------------------
# PyTorch reference (hooks) vs JAX
# --------------------------------------------------------------------------------------------

# The torch side is the team's reference models (timerome_jax.torch_ref.llada, transformers
# Llama/Qwen2) from the conftest fixtures; the JAX side loads the same folders via hf_weights.load_pretrained.

@pytest.fixture(scope="module")
def pair(tiny_torch):
    """name -> (torch model, jax params, cfg) for the LLaDA, LLaDA-MoE and Dream layouts."""
    from timerome_jax.backbone import hf_weights

    out = {}
    for name in ("llada", "moe", "dream"):
        tm, path = tiny_torch[name]
        p, cfg, _ = hf_weights.load_pretrained(path, dtype="float32")
        out[name] = (tm, p, cfg)
    return out


_fwd_cfg = jax.jit(model.forward, static_argnames="cfg")
TOK = np.random.default_rng(7).integers(2, 300, (2, 11))


def _jax_logits(p, cfg, iv=None, step=0):
    with jax.default_matmul_precision("highest"):
        return np.asarray(_fwd_cfg(p, jnp.asarray(TOK), cfg, intervene=iv, step=step))


def _torch_logits(name, tm, *hooks, step=None):
    if step is not None:
        for h in hooks:
            h.state.step = step
    with H.installed(tm, *hooks):
        return torch_logits(name, tm, TOK)


# (layout, module): every module on LLaDA; the HF paths (o_proj, mlp.down_proj, MoE mlp) elsewhere
EDIT_CASES = [("llada", "resid"), ("llada", "attn"), ("llada", "mlp"), ("moe", "mlp"),
              ("dream", "attn")]


@pytest.mark.slow
@pytest.mark.parametrize("name,module", EDIT_CASES)
def test_edit_hook_matches_jax(pair, name, module):
    tm, p, cfg = pair[name]
    rng = np.random.default_rng(8)
    d = cfg.d_model
    base = _jax_logits(p, cfg)
    np.testing.assert_allclose(_torch_logits(name, tm), base, rtol=1e-4, atol=1e-4)
    mem = rand_mem(rng, 4, d=d, capacity=6, alpha=2.0, q=2, layer=1, module=module)
    want = _jax_logits(p, cfg, Intervene(edit=mem))
    assert np.abs(want - base).max() > 1e-2  # the edit matters
    got = _torch_logits(name, tm, H.EditHook(H.TorchEditMemory.from_jax(mem)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if (name, module) != ("llada", "resid"):
        return
    ge = M.gated_edit(rng.normal(size=(3, d)), rng.normal(size=(3, d)), 2.0, 0, module, g_max=2.0)
    want_g = _jax_logits(p, cfg, Intervene(edit=ge))
    assert np.abs(want_g - base).max() > 1e-2
    got_g = _torch_logits(name, tm, H.EditHook(H.TorchGatedEdit.from_jax(ge)))
    np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_step_gated_edit_and_patch_hook_match_jax(pair):
    tm, p, cfg = pair["llada"]
    d = cfg.d_model
    rng = np.random.default_rng(9)
    mem = rand_mem(rng, 3, d=d, alpha=2.0, layer=0, module="resid", step=2)
    em = H.TorchEditMemory.from_jax(mem)
    want0 = _jax_logits(p, cfg, Intervene(edit=mem), step=0)
    want2 = _jax_logits(p, cfg, Intervene(edit=mem), step=2)
    assert np.abs(want2 - want0).max() > 1e-2
    state = H.TraceState()
    np.testing.assert_allclose(_torch_logits("llada", tm, H.EditHook(em, state), step=0), want0,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_torch_logits("llada", tm, H.EditHook(em, state), step=2), want2,
                               rtol=1e-4, atol=1e-4)
    # patch mode: splice values at (layer 1, step 3, mlp) on two positions per row (one padding)
    pos = np.array([[1, 4], [2, 2]])
    valid = np.array([[True, True], [True, False]])
    vals = rng.normal(size=(2, 2, d)).astype(np.float32)
    patch = Patch(jnp.int32(1), jnp.int32(3), jnp.int32(2), jnp.asarray(pos), jnp.asarray(valid),
                  jnp.asarray(vals))
    want = _jax_logits(p, cfg, Intervene(patch=patch), step=3)
    base = _jax_logits(p, cfg, step=3)
    assert np.abs(want - base).max() > 1e-2
    ph = H.PatchHook(1, 3, "mlp", pos, vals, valid, state=H.TraceState())
    np.testing.assert_allclose(_torch_logits("llada", tm, ph, step=3), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_torch_logits("llada", tm, ph, step=4), base, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("layer,module", [(0, "resid"), (1, "attn"), (1, "mlp")])
def test_capture_torch_matches_jax(pair, layer, module):
    tm, p, cfg = pair["llada"]
    assert H.locate(tm) is H.LLADA
    pos = np.array([[0, 3, 5], [10, 2, 2]])
    with jax.default_matmul_precision("highest"):
        want = np.asarray(model.run(p, jnp.asarray(TOK), cfg, None,
                                    Intervene(read_pos=jnp.asarray(pos))).acts[module][layer])
    got = H.capture_torch(tm, torch.tensor(TOK), torch.tensor(pos), layer, module)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    # a capture hook inside a multi-step loop records one slice per step asked for
    state = H.TraceState()
    ch = H.CaptureHook(layer, module, pos, state=state, steps=[1, 2])
    with torch.no_grad(), H.installed(tm, ch):
        for _ in range(4):
            tm(torch.tensor(TOK))
            state.advance()
    assert [s for s, _ in ch.records] == [1, 2]
    np.testing.assert_allclose(ch.records[1][1].numpy(), want, rtol=1e-4, atol=1e-5)


def test_hf_layout_locators(pair, tiny_torch):
    assert H.locate(pair["moe"][0]) is H.HF_MOE
    assert H.locate(tiny_torch["diffullama"][0]) is H.HF  # transformers LlamaForCausalLM
    hf_model = pair["dream"][0]  # transformers Qwen2ForCausalLM
    assert H.locate(hf_model) is H.HF
    tok = torch.tensor(TOK)
    pos = torch.tensor([[0, 2, 5], [1, 3, 4]])
    with torch.no_grad():
        hs = hf_model(tok, output_hidden_states=True).hidden_states
    gather = lambda h: h[torch.arange(2)[:, None], pos]
    resid = H.capture_torch(hf_model, tok, pos, 0, "resid")
    attn = H.capture_torch(hf_model, tok, pos, 0, "attn")
    mlp = H.capture_torch(hf_model, tok, pos, 0, "mlp")
    torch.testing.assert_close(resid, gather(hs[1]))
    # block output = block input + attention output + MLP output: the hooks sit where they should
    torch.testing.assert_close(gather(hs[0]) + attn + mlp, resid, rtol=1e-5, atol=1e-5)
    # an edit at layer 0 resid moves the block output by exactly its delta (read by a capture
    # hook registered after it: HF's own output_hidden_states records the layer output inside
    # the wrapped forward, before forward hooks run) and propagates to the next layer
    rng = np.random.default_rng(1)
    mem = rand_mem(rng, 2, d=hf_model.config.hidden_size, alpha=1.0, layer=0, module="resid")
    em = H.TorchEditMemory.from_jax(mem)
    ch = H.CaptureHook(0, "resid", torch.arange(TOK.shape[1]).expand(2, -1))
    with torch.no_grad(), H.installed(hf_model, H.EditHook(em), ch):
        hs_e = hf_model(tok, output_hidden_states=True).hidden_states
    torch.testing.assert_close(ch.value, hs[1] + em.delta(hs[1]), rtol=1e-5, atol=1e-5)
    assert (hs_e[2] - hs[2]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cannot locate"):
        H.locate(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="out of range"):
        H.install(hf_model, [H.EditHook(H.TorchEditMemory.from_jax(
            rand_mem(rng, 1, d=hf_model.config.hidden_size, layer=5)))])


def test_top_q_fast_and_sort_paths_agree_with_numpy():
    """C > TOPQ_FAST thresholds by a full sort for every q (no branch on q): small and large q both
    keep exactly the q largest |c|."""
    from timerome_jax.method.memory import TOPQ_FAST, top_q

    rng = np.random.default_rng(3)
    c = rng.standard_normal((3, 5, TOPQ_FAST + 36)).astype(np.float32)
    for q in (1, 4, TOPQ_FAST, TOPQ_FAST + 1, TOPQ_FAST + 30):
        got = np.asarray(top_q(jnp.asarray(c), jnp.int32(q)))
        thr = -np.sort(-np.abs(c), axis=-1)[..., q - 1:q]
        np.testing.assert_array_equal(got, np.where(np.abs(c) >= thr, c, 0.0))
        assert ((got != 0).sum(-1) == q).all()
