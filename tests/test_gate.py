"""Tests for the gated edit memory: memory.Gate, fit_whitening/whiten_keys/calibrate_tau, gated
build/insert/remove, capture.capture_slot_keys/capture_residuals, memory_file v3 (and v1 files),
and method.gate's calibration rows (disjoint from every evaluated row)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timerome_jax.backbone import model
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.method import capture as CAP
from timerome_jax.method import gate as GL
from timerome_jax.method import memory as M
from timerome_jax.method import memory_file as MF
from timerome_jax.tofu import data as tofu
from timerome_jax.tofu import evaluate as ev

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, rope_theta=10000.0, mask_token_id=96, pad_token_id=0, eos_token_id=1,
                  max_seq_len=64)
D = CFG.d_model
FIXTURE_V1 = Path(__file__).parent / "data" / "memory_v1.npz"


def _facts(n, seed=0, d=D):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((n, d)).astype(np.float32) for _ in range(4))  # u, v_o, v_t, keys


def _whitening(seed=1, d=D):
    return M.fit_whitening(np.random.default_rng(seed).standard_normal((300, d)) * np.linspace(0.2, 3, d))


def _gated(n=5, tau=0.5, cap=None, **kw):
    u, vo, vt, k = _facts(n)
    return M.build(u, vo, vt, lam=0.3, alpha=1.2, q=2, layer=1, module="resid", capacity=cap,
                   gate_keys=k, whitening=_whitening(), tau=tau, **kw)


def _eq(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # compiles gated and ungated forwards
def test_gate_off_is_eq12_bit_for_bit():
    """Gate switched off: delta and the model's logits equal the ungated Eq. 12 memory's exactly."""
    u, vo, vt, k = _facts(6)
    plain = M.build(u, vo, vt, lam=0.3, alpha=1.2, q=2, layer=1, module="resid")
    gated = M.with_gate(M.build(u, vo, vt, lam=0.3, alpha=1.2, q=2, layer=1, module="resid", gate_keys=k,
                                whitening=_whitening(), tau=0.9), on=False)
    h = jnp.asarray(np.random.default_rng(2).standard_normal((3, 7, D)).astype(np.float32))
    ref = 1.2 * jnp.einsum("...c,cd->...d", M.top_q(jnp.einsum("...d,cd->...c", h, plain.W,
                                                                   precision=jax.lax.Precision.HIGH), 2),
                           plain.Dm, precision=jax.lax.Precision.HIGH)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda m, h: m.delta(h))(gated, h)),
                                  np.asarray(jax.jit(lambda m, h: m.delta(h))(plain, h)))
    np.testing.assert_allclose(np.asarray(plain.delta(h)), np.asarray(ref), rtol=1e-6, atol=1e-6)
    params = model.init_params(jax.random.PRNGKey(0), CFG)
    toks = jnp.asarray(np.random.default_rng(3).integers(2, 90, (2, 12)), jnp.int32)
    pad = jnp.ones_like(toks, bool)
    fwd = jax.jit(lambda p, t, e: model.forward(p, t, CFG, pad, Intervene(edit=e)))
    np.testing.assert_array_equal(np.asarray(fwd(params, toks, gated)), np.asarray(fwd(params, toks, plain)))
    assert not np.array_equal(np.asarray(fwd(params, toks, M.with_gate(gated, on=True))),
                              np.asarray(fwd(params, toks, plain)))


def test_gate_fires_on_its_keys_and_matches_numpy():
    mem = _gated(n=4, tau=0.99)
    _, _, _, k = _facts(4)
    mu, P = np.asarray(mem.gate.mu, np.float64), np.asarray(mem.gate.P, np.float64)
    h = np.concatenate([k, np.random.default_rng(9).standard_normal((20, D)).astype(np.float32)])
    z = (h - mu) @ P.T
    kw = (k - mu) @ P.T
    cos = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (kw / np.linalg.norm(kw, axis=1, keepdims=True)).T
    np.testing.assert_allclose(M.gate_scores(mem, h), cos.max(1), rtol=1e-5, atol=1e-5)
    fires = np.asarray(mem.fires(jnp.asarray(h)))
    assert fires[:4].all() and not fires[4:].any()
    d = np.asarray(mem.delta(jnp.asarray(h[None])))[0]
    assert np.all(d[4:] == 0) and np.all(np.abs(d[:4]).sum(1) > 0)
    # a removed fact's key no longer opens the gate
    assert not np.asarray(M.remove(mem, 0).fires(jnp.asarray(k[:1])))[0]


@pytest.mark.slow  # traces and compiles the gated forward twice over
def test_new_facts_and_hparams_never_recompile():
    params = model.init_params(jax.random.PRNGKey(0), CFG)
    toks = jnp.asarray(np.random.default_rng(3).integers(2, 90, (2, 12)), jnp.int32)
    pad = jnp.ones_like(toks, bool)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fwd(p, t, e):
        return model.forward(p, t, CFG, pad, Intervene(edit=e))

    base = _gated(n=3, cap=8)
    u, vo, vt, k = _facts(5, seed=7)
    variants = [base, M.insert(base, u[:2], (vt - vo)[:2], gate_key=k[:2]), M.remove(base, 1),
                dataclasses.replace(base, alpha=jnp.float32(3.0), q=jnp.int32(0)),
                M.with_gate(base, tau=0.1), M.with_gate(base, on=False),
                M.build(u, vo, vt, lam=2.0, alpha=0.5, q=4, layer=1, module="resid", capacity=8, gate_keys=k,
                        whitening=_whitening(seed=5), tau=0.3)]
    outs = [np.asarray(fwd(params, toks, v)) for v in variants]
    assert len({o.tobytes() for o in outs}) > 1


def test_insert_and_remove_are_exact_with_gate_keys():
    u, vo, vt, k = _facts(6)
    W = _whitening()
    full = M.build(u, vo, vt, lam=0.3, alpha=1.2, q=2, layer=1, module="resid", capacity=8, gate_keys=k,
                   whitening=W, tau=0.4)
    mem = M.empty(D, 2, lam=0.3, alpha=1.2, q=2, layer=1, module="resid", whitening=W, tau=0.4)
    for i in range(6):  # grows 2 -> 4 -> 8
        mem = M.insert(mem, u[i], vt[i] - vo[i], gate_key=k[i])
    _eq(mem, full)
    less = M.remove(full, [1, 4])
    keep = [0, 2, 3, 5]
    ref = M.build(u[keep], vo[keep], vt[keep], lam=0.3, alpha=1.2, q=2, layer=1, module="resid", capacity=8,
                  gate_keys=k[keep], whitening=W, tau=0.4)
    h = jnp.asarray(np.concatenate([k, np.random.default_rng(4).standard_normal((5, D))]).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(less.fires(h)), np.asarray(ref.fires(h)))
    np.testing.assert_allclose(np.asarray(less.delta(h[None])), np.asarray(ref.delta(h[None])), rtol=2e-5, atol=1e-5)
    assert np.all(np.asarray(less.gate.K)[[1, 4]] == 0)
    with pytest.raises(ValueError, match="gate_key"):
        M.insert(full, u[0], vt[0] - vo[0])
    with pytest.raises(ValueError, match="whitening"):
        M.build(u, vo, vt, lam=0.3, alpha=1.0, q=2, layer=1, module="resid", gate_keys=k)


def test_calibrate_tau_is_the_percentile():
    mem = _gated(n=3)
    h = np.random.default_rng(5).standard_normal((1000, D)).astype(np.float32)
    tau = M.calibrate_tau(mem, h, 99.0)
    assert np.mean(M.gate_scores(mem, h) > tau) == pytest.approx(0.01, abs=0.002)
    with pytest.raises(ValueError, match="percentile"):
        M.calibrate_tau(mem, h, 0.0)


def test_file_round_trip_and_v1_file_loads(tmp_path):
    mem = _gated(n=3, cap=4, tau=0.37)
    MF.save(mem, tmp_path / "g.npz", {"note": "x"})
    back, meta = MF.load(tmp_path / "g.npz")
    assert meta["format_version"] == 4 == MF.FORMAT_VERSION
    assert meta["gate"] == {"tau": pytest.approx(0.37), "on": True, "tau_seq": None, "token": True}  # no latch: null
    assert back.gate.token
    _eq(back, mem)
    # the committed fixture was written by the version-1 writer (before the gate existed)
    old, meta1 = MF.load(FIXTURE_V1)
    assert meta1["format_version"] == 1 and old.gate is None
    rng = np.random.default_rng(0)
    u, vo, vt = (rng.standard_normal((3, 8)).astype(np.float32) for _ in range(3))
    _eq(old, M.build(u, vo, vt, lam=0.5, alpha=1.5, q=2, layer=1, module="resid", capacity=4, fingerprint="llada-test"))
    # a gate array without its header field is a corrupt file
    with np.load(tmp_path / "g.npz") as z:
        arrays = {k: z[k] for k in z.files}
    hdr = json.loads(bytes(arrays["meta"]).decode())
    hdr["gate"] = None
    arrays["meta"] = np.frombuffer(json.dumps(hdr).encode(), np.uint8)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(MF.MemoryFileError, match="gate"):
        MF.load(tmp_path / "bad.npz")


@pytest.mark.slow  # compiles capture and residual programs
def test_slot_keys_and_residuals_match_a_plain_forward():
    params = model.init_params(jax.random.PRNGKey(1), CFG)
    cb = CAP.make_cloze_batch(None, [[5, 6, 7, 8], [9, 10, 11]], [[1, 2], [0]], [[20, 21], [30, 31, 32]],
                              [[40, 41], [40, 41]], CFG)
    keys = np.asarray(CAP.capture_slot_keys(params, CFG, cb, 1, "resid"))
    for i, (prompt, obj) in enumerate((([5, 6, 7, 8], [20, 21, 1]), ([9, 10, 11], [30, 31, 32, 1]))):
        toks = jnp.asarray([prompt + [CFG.mask_token_id] * len(obj)], jnp.int32)
        pos = jnp.arange(toks.shape[1])[None]
        acts = model.run(params, toks, CFG, jnp.ones_like(toks, bool), Intervene(read_pos=pos),
                         step=0).acts["resid"][1][0]
        np.testing.assert_allclose(keys[i], np.asarray(acts[len(prompt):]).mean(0), rtol=1e-4, atol=1e-5)
        res = CAP.capture_residuals(params, CFG, np.asarray(toks), np.ones(toks.shape, bool), 1, "resid", chunk=4)
        np.testing.assert_allclose(res, np.asarray(acts), rtol=1e-4, atol=1e-5)


def test_calibration_rows_are_disjoint_from_every_evaluated_row():
    """The rows `gate.calibrate` reads (calibration_row_ids -> full.json) share no index and no
    question with any set `evaluate` scores (every forget split, retain_perturbed, real authors,
    world facts) nor with the forget/holdout rows the firing report uses."""
    w, t = GL.calibration_row_ids(400, 400, seed=0)
    assert not set(w) & set(t) and len(w) == len(t) == 400
    lo, hi = tofu.CALIBRATION_RANGE
    assert all(lo <= i < hi for i in w + t)
    full = tofu.load_split("full", subjects=False)
    cal_q = {full[i]["question"] for i in w + t}
    for split in tofu.FORGET_SPLITS:
        for which in ev.SETS:
            name = f"{split}_perturbed" if which == "forget" else ev.SET_FILES[which]
            rows = tofu.load_split(name, subjects=False)
            assert not cal_q & {r["question"] for r in rows}, (split, which)
            off = tofu.full_offset(name)
            if off is not None:
                assert not set(w + t) & {off + r["index"] for r in rows}, (split, which)
    for split in ("holdout10", "forget10"):
        assert not cal_q & {r["question"] for r in tofu.load_split(split, subjects=False)}
