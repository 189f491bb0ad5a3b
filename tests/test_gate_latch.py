"""Tests for the gated memory's sequence latch: Gate.sequence_score, EditMemory.with_latch,
model.prime_edit (generation and ELBO), n_slots through insert/remove, tau_seq calibration,
memory_file v3 (and v2 files), and that new facts / thresholds never recompile."""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pathlib import Path

from timerome_jax.backbone import model
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.diffusion import likelihood as LK
from timerome_jax.diffusion import sampler as S
from timerome_jax.method import gate as GL
from timerome_jax.method import memory as M
from timerome_jax.method import memory_file as MF
from timerome_jax.tofu import data as tofu

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, rope_theta=10000.0, mask_token_id=96, pad_token_id=0, eos_token_id=1,
                  max_seq_len=64)
D = CFG.d_model
FIXTURE_V2 = Path(__file__).parent / "data" / "memory_v2.npz"
FIXTURE_V3 = Path(__file__).parent / "data" / "memory_v3.npz"
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33, 34]]
N_ANS = [3, 4, 2, 3]  # answer slots (answer + eos) of each prompt's fact
GEN = 8


@pytest.fixture(scope="module")
def params():
    return model.init_params(jax.random.PRNGKey(0), CFG)


_WHITE = {}


def _whitening():
    """Whitening from the residuals of 48 other random prompts' probes (as `gate.calibrate` does),
    which removes the direction every masked slot shares."""
    if not _WHITE:
        rng = np.random.default_rng(1)
        prompts = [list(rng.integers(2, 90, rng.integers(3, 7))) for _ in range(48)]
        _, pad, _, h = _probe(model.init_params(jax.random.PRNGKey(0), CFG), prompts, [6] * 48)
        _WHITE["w"] = M.fit_whitening(h[pad])
    return _WHITE["w"]


def _probe(params, prompts, n_ans):
    """Left-padded prompt + n masked slots per row -> tokens, pad, slots, residuals at layer 1."""
    T = max(len(p) + n for p, n in zip(prompts, n_ans))
    toks = np.full((len(prompts), T), CFG.pad_token_id, np.int32)
    pad = np.zeros(toks.shape, bool)
    slots = np.zeros(toks.shape, bool)
    for i, (p, n) in enumerate(zip(prompts, n_ans)):
        s = T - len(p) - n
        toks[i, s:s + len(p)] = p
        toks[i, s + len(p):] = CFG.mask_token_id
        pad[i, s:], slots[i, s + len(p):] = True, True
    pos = jnp.broadcast_to(jnp.arange(T), toks.shape)
    h = model.run(params, jnp.asarray(toks), CFG, jnp.asarray(pad), Intervene(read_pos=pos),
                  stop_layer=1).acts["resid"][1]
    return toks, pad, slots, np.asarray(h)


def _latching(params, n_facts=2, tau=2.0, tau_seq=0.7, cap=None):
    """Facts 0..n_facts-1 keyed on PROMPTS' own slot means (as capture_slot_keys); tau 2 (> any cosine)
    switches the token gate off, so only the latch can open the gate."""
    toks, pad, slots, h = _probe(params, PROMPTS[:n_facts], N_ANS[:n_facts])
    keys = np.stack([h[i][slots[i]].mean(0) for i in range(n_facts)])
    rng = np.random.default_rng(0)
    u, vo, vt = (rng.standard_normal((n_facts, D)).astype(np.float32) for _ in range(3))
    mem = M.build(u, vo, vt * 3, lam=0.3, alpha=2.0, q=0, layer=1, module="resid", capacity=cap,
                  gate_keys=keys, whitening=_whitening(), tau=tau, gate_n_slots=N_ANS[:n_facts])
    return M.with_gate(mem, tau_seq=tau_seq)


def test_sequence_score_matches_numpy_and_latches_its_own_prompt(params):
    mem = _latching(params)
    toks, pad, slots, h = _probe(params, PROMPTS, [6, 6, 6, 6])  # generation canvas: more slots than the key
    s = M.sequence_scores(mem, h, slots)
    mu, P = np.asarray(mem.gate.mu, np.float64), np.asarray(mem.gate.P, np.float64)
    K = np.asarray(mem.gate.K, np.float64)
    ref = []
    for i in range(len(PROMPTS)):
        z = (h[i][slots[i]] - mu) @ P.T
        ref.append(max(float(z[:N_ANS[f]].mean(0) @ K[f] / np.linalg.norm(z[:N_ANS[f]].mean(0)))
                       for f in range(2)))
    np.testing.assert_allclose(s, ref, rtol=1e-4, atol=1e-5)
    _, _, slots_e, h_e = _probe(params, PROMPTS, N_ANS)  # the key's own layout: cosine 1
    np.testing.assert_allclose(M.sequence_scores(mem, h_e, slots_e)[:2], 1.0, atol=1e-5)
    latch = np.asarray(mem.with_latch(jnp.asarray(h), jnp.asarray(slots)).gate.latch)
    row = s > 0.7
    np.testing.assert_array_equal(latch, row[:, None] & slots)
    # a removed fact no longer latches; a fact with n_slots 0 never does
    rm = M.remove(mem, 0)
    assert M.sequence_scores(rm, h_e, slots_e)[0] < 1 - 1e-3
    no = M.build(np.asarray(mem.U)[:2], np.zeros((2, D)), np.asarray(mem.Dm)[:2], 0.3, 2.0, 0, 1, "resid",
                 gate_keys=np.stack([h_e[i][slots_e[i]].mean(0) for i in range(2)]), whitening=_whitening())
    assert np.all(np.isneginf(M.sequence_scores(no, h_e, slots_e)))


class _SlotEq12:
    """Reference edit: Eq. 12 (the memory's ungated update) on the positions of `where` [B,T] only."""

    def __init__(self, mem, where):
        self.mem, self.where, self.layer, self.module, self.step = mem, where, mem.layer, mem.module, mem.step

    def delta(self, h):
        return jnp.where(self.where[..., None], self.mem.delta(h), 0).astype(h.dtype)


jax.tree_util.register_pytree_node(_SlotEq12, lambda e: ((e.mem, e.where), None),
                                   lambda _, c: _SlotEq12(*c))


@pytest.mark.slow  # compile-heavy: several sampler / ELBO programs
def test_latched_generation_is_eq12_on_the_answer_slots_of_latched_rows(params):
    """Token gate shut (tau 2): a latched row is edited on its generation slots at every step, committed
    tokens included; the other rows not at all. tau_seq = +inf is the token gate alone (no edit here)."""
    mem = _latching(params)
    x, pad, pm = S.make_canvas(PROMPTS, GEN, CFG)
    scfg = S.SamplerConfig(steps=4, block_length=4)
    out = np.asarray(S.generate(params, CFG, scfg, x, pad, pm, 0, Intervene(edit=mem)))
    # which rows latch, from the probe of the initial canvas
    sched = S.schedule(x, pad, CFG, scfg)
    primed = model.prime_edit(params, x, CFG, pad, sched.gen_mask, Intervene(edit=mem)).edit
    rows = np.asarray(primed.gate.latch).any(1)
    assert rows[:2].all() and not rows[2:].any()
    ref_edit = _SlotEq12(M.with_gate(mem, on=False), jnp.asarray(rows)[:, None] & sched.gen_mask)
    ref = np.asarray(S.generate(params, CFG, scfg, x, pad, pm, 0, Intervene(edit=ref_edit)))
    plain = np.asarray(S.generate(params, CFG, scfg, x, pad, pm, 0))
    np.testing.assert_array_equal(out, ref)
    assert not np.array_equal(out[:2], plain[:2])
    np.testing.assert_array_equal(out[2:], plain[2:])
    off = np.asarray(S.generate(params, CFG, scfg, x, pad, pm, 0, Intervene(edit=M.with_gate(mem, tau_seq=np.inf))))
    np.testing.assert_array_equal(off, plain)


@pytest.mark.slow  # compile-heavy: several sampler / ELBO programs
def test_latched_elbo_uses_the_fully_masked_answer_and_tiles_over_samples(params):
    mem = _latching(params)
    answers = [[40, 41, 1], [42, 43, 44, 1], [45, 1], [46, 47, 1]]
    toks, amask, pad = LK.make_qa_batch(PROMPTS, answers, CFG)
    ref_edit = _SlotEq12(M.with_gate(mem, on=False), amask & jnp.asarray([[True], [True], [False], [False]]))
    elbo = lambda e, mb: np.asarray(LK.elbo(params, CFG, toks, amask, pad, 3, n_mc=2, mc_batch=mb,
                                            intervene=Intervene(edit=e)))
    got = [elbo(mem, mb) for mb in (1, 2)]
    ref = elbo(ref_edit, 1)
    plain = elbo(_SlotEq12(ref_edit.mem, jnp.zeros_like(amask)), 1)  # same program, nothing edited
    for g in got:
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-4)
    assert np.all(np.abs(got[0][:2] - plain[:2]) > 1e-3)
    np.testing.assert_allclose(got[0][2:], plain[2:], rtol=1e-6, atol=1e-5)


@pytest.mark.slow  # compile-heavy: several sampler / ELBO programs
def test_gate_off_with_a_primed_latch_is_eq12_bit_for_bit(params):
    mem = _latching(params)
    x, pad, pm = S.make_canvas(PROMPTS, GEN, CFG)
    scfg = S.SamplerConfig(steps=4, block_length=4)
    eq12 = M.build(np.asarray(mem.U), np.zeros((2, D)), np.asarray(mem.Dm), 0.3, 2.0, 0, 1, "resid")
    a = S.generate(params, CFG, scfg, x, pad, pm, 0, Intervene(edit=M.with_gate(mem, on=False)))
    b = S.generate(params, CFG, scfg, x, pad, pm, 0, Intervene(edit=eq12))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sched = S.schedule(x, pad, CFG, scfg)
    primed = model.prime_edit(params, x, CFG, pad, sched.gen_mask, Intervene(edit=M.with_gate(mem, on=False))).edit
    fwd = jax.jit(lambda p, t, e: model.forward(p, t, CFG, pad, Intervene(edit=e)))
    np.testing.assert_array_equal(np.asarray(fwd(params, x, primed)), np.asarray(fwd(params, x, eq12)))


@pytest.mark.slow  # compile-heavy: several sampler / ELBO programs
def test_new_facts_and_thresholds_never_recompile_generation(params, monkeypatch):
    traces = []
    real = S._generate_impl

    def counting(*a, **k):
        traces.append(1)
        return real(*a, **k)

    monkeypatch.setattr(S, "_generate_impl", counting)
    x, pad, pm = S.make_canvas(PROMPTS, GEN, CFG)
    scfg = S.SamplerConfig(steps=4, block_length=4)
    base = _latching(params, n_facts=2, cap=4)
    assert not base.gate.token  # tau 2: the latch default, no per-token gate
    toks, _, slots, h = _probe(params, PROMPTS[2:3], N_ANS[2:3])
    rng = np.random.default_rng(3)
    variants = [base, M.with_gate(base, tau_seq=0.2),
                M.insert(base, rng.standard_normal(D), rng.standard_normal(D), gate_key=h[0][slots[0]].mean(0),
                         n_slots=N_ANS[2]),
                M.remove(base, 1), dataclasses.replace(base, alpha=jnp.float32(5.0), q=jnp.int32(1),
                                                       lam=jnp.float32(0.7))]
    outs = [np.asarray(S.generate(params, CFG, scfg, x, pad, pm, 0, Intervene(edit=v))) for v in variants]
    assert len(traces) == 1
    assert len({o.tobytes() for o in outs}) > 1
    # adding the per-token gate is structure (one more program); then its tau and the rest are data
    tok = M.with_gate(base, tau=0.1, tau_seq=np.inf)
    assert tok.gate.token
    tok_variants = [tok, M.with_gate(tok, tau=0.5), M.with_gate(tok, tau=M.TAU_OFF, tau_seq=0.3),
                    M.with_gate(tok, on=False), dataclasses.replace(tok, alpha=jnp.float32(0.5))]
    for v in tok_variants:
        S.generate(params, CFG, scfg, x, pad, pm, 0, Intervene(edit=v))
    assert len(traces) == 2
    variants = variants + tok_variants

    @jax.jit
    @chex.assert_max_traces(n=2)  # one program without the token gate, one with it
    def score(p, t, a, pd, e):
        return LK._elbo_impl(p, t, a, pd, jax.random.PRNGKey(0), jnp.arange(4, dtype=jnp.int32), Intervene(edit=e),
                             CFG, 2, "llada", 2, 1e-3)

    t, a, pd = LK.make_qa_batch(PROMPTS, [[40, 1]] * 4, CFG)
    for v in variants:
        score(params, t, a, pd, v)


def test_insert_remove_keep_n_slots_and_file_v4_round_trip(params, tmp_path):
    full = _latching(params, n_facts=2, cap=4)
    mem = M.empty(D, 1, lam=0.3, alpha=2.0, q=0, layer=1, module="resid", whitening=_whitening(), tau=2.0)
    for i in range(2):
        mem = M.insert(mem, full.U[i], full.Dm[i], gate_key=_keys(params)[i], n_slots=N_ANS[i])
    mem = M.with_gate(mem, tau_seq=0.7)
    np.testing.assert_array_equal(np.asarray(mem.gate.n_slots), [3, 4])
    np.testing.assert_array_equal(np.asarray(M.remove(full, 0).gate.n_slots), [0, 4, 0, 0])
    np.testing.assert_allclose(np.asarray(mem.gate.K), np.asarray(full.gate.K)[:2], atol=1e-6)
    MF.save(full, tmp_path / "g.npz")
    back, meta = MF.load(tmp_path / "g.npz")
    assert meta["format_version"] == 4 == MF.FORMAT_VERSION
    assert meta["gate"]["tau_seq"] == pytest.approx(0.7) and meta["gate"]["token"] is False
    assert not back.gate.token and not mem.gate.token
    MF.save(M.with_gate(full, token=True), tmp_path / "tok.npz")  # tau 2 with a token gate kept: v4 says so
    assert MF.load(tmp_path / "tok.npz")[0].gate.token
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(full)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    MF.save(M.with_gate(full, tau_seq=np.inf), tmp_path / "inf.npz")
    assert MF.load(tmp_path / "inf.npz")[1]["gate"]["tau_seq"] is None
    assert np.isinf(float(MF.load(tmp_path / "inf.npz")[0].gate.tau_seq))
    # the committed fixture was written by the version-2 writer: a gate without a latch
    old, meta2 = MF.load(FIXTURE_V2)
    assert meta2["format_version"] == 2 and old.gate is not None
    assert np.all(np.asarray(old.gate.n_slots) == 0) and np.isinf(float(old.gate.tau_seq))
    assert float(old.gate.tau) == pytest.approx(0.37) and old.gate.token
    # the committed fixture written by the version-3 writer (latch default, tau 2): loads without a
    # token gate, and its update equals the same gate with a token gate kept, bit for bit
    v3, meta3 = MF.load(FIXTURE_V3)
    assert meta3["format_version"] == 3 and meta3["gate"]["tau"] == 2.0 and "token" not in meta3["gate"]
    assert not v3.gate.token
    np.testing.assert_array_equal(np.asarray(v3.gate.n_slots), [3, 4, 5, 0])
    assert float(v3.gate.tau_seq) == pytest.approx(0.7)
    hv = jnp.asarray(np.random.default_rng(8).standard_normal((2, 5, 32)).astype(np.float32))
    latch = jnp.asarray(np.random.default_rng(9).random((2, 5)) < 0.5)
    lat = lambda m: dataclasses.replace(m, gate=dataclasses.replace(m.gate, latch=latch))
    d = jax.jit(lambda m, h: m.delta(h))
    np.testing.assert_array_equal(np.asarray(d(lat(v3), hv)), np.asarray(d(lat(M.with_gate(v3, token=True)), hv)))
    assert np.any(np.asarray(d(lat(v3), hv)) != 0)


def _keys(params):
    _, _, slots, h = _probe(params, PROMPTS[:2], N_ANS[:2])
    return np.stack([h[i][slots[i]].mean(0) for i in range(2)])


def test_calibrate_tau_seq_leaves_no_held_out_row_latched(params):
    mem = _latching(params, n_facts=2)
    toks, pad, slots, h = _probe(params, [[50 + i, 60 + i, 70 + i] for i in range(8)], [3] * 8)
    ts = M.calibrate_tau_seq(mem, h, slots)
    assert np.all(M.sequence_scores(mem, h, slots) < ts)
    assert ts == pytest.approx(M.sequence_scores(mem, h, slots).max() + 0.02)
    with pytest.raises(ValueError, match="percentile"):
        M.calibrate_tau_seq(mem, h, slots, 0)


def test_probe_inputs_mask_exactly_the_answer_and_eos(tiny_llada):
    _, cfg, tok = tiny_llada
    rows = tofu.calibration_rows(subjects=False)[:3]
    toks, pad, slots = GL.probe_inputs(tok, cfg, rows)
    for i, r in enumerate(rows):
        p = list(tok.encode(tofu.format_prompt(r["question"])))
        n = len(tok.encode(r["answer"])) + 1
        assert slots[i].sum() == n and pad[i].sum() == len(p) + n
        np.testing.assert_array_equal(toks[i][: len(p)], p)
        assert np.all(toks[i][slots[i]] == cfg.mask_token_id) and np.flatnonzero(slots[i])[0] == len(p)
    with pytest.raises(ValueError, match="no rows"):
        GL.probe_inputs(tok, cfg, [])


def test_latch_only_gate_does_no_per_token_work():
    """Without a token gate the update's program is Eq. 12 plus the select on the latch: no product
    with the whitening P (and no cosines), so its dot products are the two of Eq. 12."""
    rng = np.random.default_rng(0)
    u, vo, vt, k = (rng.standard_normal((3, D)).astype(np.float32) for _ in range(4))
    w = M.fit_whitening(rng.standard_normal((200, D)))
    mem = M.with_gate(M.build(u, vo, vt, 0.3, 1.0, 0, 1, "resid", gate_keys=k, whitening=w, gate_n_slots=[2, 3, 4]),
                      tau=M.TAU_OFF, tau_seq=0.5, token=False)
    h = jnp.zeros((2, 5, D), jnp.float32)
    latch = jnp.zeros((2, 5), bool)
    dots = lambda m: str(jax.make_jaxpr(lambda m, h: m.delta(h))(m, h)).count("dot_general")
    primed = lambda m: dataclasses.replace(m, gate=dataclasses.replace(m.gate, latch=latch))
    assert dots(primed(mem)) == 2 == dots(M.with_gate(mem, on=False))
    assert dots(primed(M.with_gate(mem, token=True))) == 4
    np.testing.assert_array_equal(np.asarray(mem.fires(h)), np.zeros((2, 5), bool))  # unprimed: nothing
    np.testing.assert_array_equal(np.asarray(M.with_gate(mem, on=False).fires(h)), np.ones((2, 5), bool))
    assert M.make_gate(np.zeros((3, D)), *w, tau=M.TAU_OFF).token is False
    assert M.make_gate(np.zeros((3, D)), *w, tau=0.9).token is True
    assert M.with_gate(mem, tau=0.9).gate.token  # a real tau on a latch-only gate adds the token gate


@pytest.mark.slow  # compiles generation and ELBO programs with and without the token gate
def test_latch_only_equals_the_token_gate_at_tau_off_bit_for_bit(params):
    """The latch default without a per-token gate gives the same generations and ELBOs, bit for bit, as
    the same memory with a token gate kept at tau = TAU_OFF (the previous default's program)."""
    mem = _latching(params)
    keep = M.with_gate(mem, token=True)
    assert not mem.gate.token and keep.gate.token and float(keep.gate.tau) == M.TAU_OFF
    x, pad, pm = S.make_canvas(PROMPTS, GEN, CFG)
    scfg = S.SamplerConfig(steps=4, block_length=4)
    gen = lambda e: np.asarray(S.generate(params, CFG, scfg, x, pad, pm, 0, Intervene(edit=e)))
    a, b = gen(mem), gen(keep)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, gen(None))
    answers = [[40, 41, 1], [42, 43, 44, 1], [45, 1], [46, 47, 1]]
    toks, amask, pad2 = LK.make_qa_batch(PROMPTS, answers, CFG)
    elbo = lambda e: np.asarray(LK.elbo(params, CFG, toks, amask, pad2, 3, n_mc=2, mc_batch=2,
                                        intervene=Intervene(edit=e)))
    np.testing.assert_array_equal(elbo(mem), elbo(keep))
