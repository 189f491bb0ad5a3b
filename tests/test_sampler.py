"""Sampler: schedule vs LLaDA's get_num_transfer_tokens, one step vs a NumPy reimplementation of every
remasking rule, whole trajectories (each position committed once, prompt/pad untouched, padding
invariance, one compile), generate_text, and the --tiny run of the LLaDA-8B smoke benchmark."""
from __future__ import annotations

import json
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_params

from timerome_jax.backbone import model
from timerome_jax.diffusion import sampler as S
from timerome_jax.backbone.config import ModelConfig

MASK, PAD, EOS = 95, 0, 1
CFG = ModelConfig(family="llada", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
                  d_ff=64, mask_token_id=MASK, pad_token_id=PAD, eos_token_id=EOS, max_seq_len=128)


@pytest.fixture(scope="module")
def params():
    # std 0.3 gives peaked, tie-free predictions from a random model
    return np_params(CFG)


# ---------------------------------------------------------------------------- NumPy references


def np_get_num_transfer_tokens(mask_index: np.ndarray, steps: int) -> np.ndarray:
    """ML-GSAI/LLaDA:generate.py get_num_transfer_tokens, in NumPy."""
    mask_num = mask_index.sum(axis=1, keepdims=True)
    base, remainder = mask_num // steps, mask_num % steps
    out = np.zeros((mask_num.shape[0], steps), np.int64) + base
    for i in range(mask_num.shape[0]):
        out[i, : remainder[i, 0]] += 1
    return out


def np_softmax(z):
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_commit(logits, x, cand, n_transfer, t, s, last, noise, cfg, scfg):
    """Plain NumPy (float64, per-row loops) version of one sampler step's token choice and commit."""
    B, T, V = logits.shape
    lg = logits.astype(np.float64).copy()
    lg[..., cfg.mask_token_id] = -np.inf
    if scfg.suppress_eos:
        lg[..., cfg.eos_token_id] = -np.inf
    temp = scfg.temperature
    x0 = np.argmax(lg + temp * np.asarray(noise.gumbel, np.float64) if temp > 0 else lg, axis=-1)
    out = x.copy()
    f32 = np.float32
    for b in range(B):
        c = np.flatnonzero(cand[b])
        rule = scfg.remasking
        if rule == "origin":
            p_tr = 1.0 if last else 1.0 - float(f32(s) / f32(t))
            chosen = [i for i in c if noise.u[b, i] < p_tr]
        else:
            if rule == "low_confidence":
                conf = np_softmax(lg[b])[np.arange(T), x0[b]]
                k = n_transfer[b]
            elif rule == "random":
                conf = np.asarray(noise.u[b], np.float64)
                k = n_transfer[b]
            else:
                p = np_softmax(lg[b] / temp if temp > 0 else lg[b])
                if rule == "maskgit_plus":
                    conf = p[np.arange(T), x0[b]]
                elif rule == "topk_margin":
                    srt = np.sort(p, axis=-1)
                    conf = srt[:, -1] - srt[:, -2]
                else:
                    conf = np.sum(p * np.log(p + 1e-10), axis=-1)
                n = len(c)
                k = n if last else int(np.floor(f32(n) * (f32(1.0) - f32(s) / f32(t))))
                if scfg.alg_temp > 0:
                    conf = conf / scfg.alg_temp + np.asarray(noise.g_sel[b], np.float64)
            chosen = sorted(c, key=lambda i: (-conf[i], i))[:k]
        out[b, chosen] = x0[b, chosen]
    return out


# ------------------------------------------------------------------------------------- helpers

# jitted once here: eager JAX compiles every op for every new shape, which dominates tiny tests
candidates_jit = jax.jit(S.candidates, static_argnames=("cfg",))
draw_noise_jit = jax.jit(S.draw_noise, static_argnames=("shape", "scfg"))
commit_jit = jax.jit(S.commit, static_argnames=("cfg", "scfg"))
commit_with_noise_jit = jax.jit(S.commit_with_noise, static_argnames=("cfg", "scfg"))


def region_canvas(prompt_lens, gen_len, region_pads, rng):
    """Left-padded prompts + a gen_len region whose last region_pads[r] slots are right padding."""
    P = max(prompt_lens)
    B, T = len(prompt_lens), P + gen_len
    x = np.full((B, T), PAD, np.int32)
    pad = np.zeros((B, T), bool)
    prm = np.zeros((B, T), bool)
    for r, (n, rp) in enumerate(zip(prompt_lens, region_pads)):
        x[r, P - n:P] = rng.integers(2, MASK, n)
        pad[r, P - n:T - rp] = True
        prm[r, P - n:P] = True
        x[r, P:T - rp] = MASK
    return x, pad, prm, P


def advance(x, sched, step, rng):
    """Commit random tokens following the LLaDA schedule for steps < `step` (a reachable state)."""
    x = x.copy()
    for st in range(step):
        cand = np.asarray(candidates_jit(jnp.asarray(x), sched, st, CFG))
        for b in range(x.shape[0]):
            c = np.flatnonzero(cand[b])
            pick = rng.choice(c, size=int(sched.n_transfer[b, st]), replace=False)
            x[b, pick] = rng.integers(2, MASK, len(pick))
    return x


# ------------------------------------------------------------------------------------ config


def test_sampler_config_validation():
    S.SamplerConfig()  # defaults are valid
    with pytest.raises(ValueError, match="steps"):
        S.SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="block_length"):
        S.SamplerConfig(block_length=0)
    with pytest.raises(ValueError, match="temperature"):
        S.SamplerConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="cfg_scale"):
        S.SamplerConfig(cfg_scale=-0.5)
    with pytest.raises(ValueError, match="remasking"):
        S.SamplerConfig(remasking="lowest_confidence")
    with pytest.raises(ValueError, match="eps"):
        S.SamplerConfig(eps=0.0)
    with pytest.raises(ValueError, match="alg_temp"):
        S.SamplerConfig(alg_temp=-1.0)
    with pytest.raises(ValueError, match="alg_temp"):
        S.SamplerConfig(remasking="low_confidence", alg_temp=0.5)
    with pytest.raises(ValueError, match="suppress_eos"):
        S.SamplerConfig(suppress_eos=1)
    hash(S.SamplerConfig(block_length=8))  # static jit argument


def test_make_canvas_layout_and_errors():
    x, pad, prm = S.make_canvas([[5, 6, 7], [8]], 4, CFG)
    np.testing.assert_array_equal(np.asarray(x), [[5, 6, 7, MASK, MASK, MASK, MASK],
                                                  [PAD, PAD, 8, MASK, MASK, MASK, MASK]])
    np.testing.assert_array_equal(np.asarray(pad), [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(prm), [[1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0]])
    assert x.dtype == jnp.int32 and pad.dtype == jnp.bool_
    x2, _, _ = S.make_canvas([[5, 6, 7], [8]], 4, CFG, max_len=10)
    assert x2.shape == (2, 10) and int(x2[1, 5]) == 8
    with pytest.raises(ValueError, match="row 1.*max_seq_len"):
        S.make_canvas([[5], [5] * 120], 10, CFG)
    with pytest.raises(ValueError, match="row 0.*max_len"):
        S.make_canvas([[5] * 8], 4, CFG, max_len=10)
    with pytest.raises(ValueError, match="row 1.*mask token"):
        S.make_canvas([[5], [6, MASK]], 4, CFG)
    with pytest.raises(ValueError, match="row 0.*vocabulary"):
        S.make_canvas([[500]], 4, CFG)
    with pytest.raises(ValueError, match="row 0 is empty"):
        S.make_canvas([[]], 4, CFG.replace(family="dream", logits_shift=True))


# ---------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("gen_len,block_length,steps,region_pads", [
    (12, 4, 6, (0, 3, 7)),
    (12, 4, 9, (0, 1, 5)),
    (12, None, 5, (0, 2, 11)),
    (8, 8, 3, (0, 0, 0)),
    (16, 2, 8, (0, 9, 16)),  # a row with no generation positions at all
])
def test_schedule_matches_llada(gen_len, block_length, steps, region_pads):
    rng = np.random.default_rng(0)
    x, pad, _, P = region_canvas([3, 1, 2], gen_len, region_pads, rng)
    scfg = S.SamplerConfig(steps=steps, block_length=block_length)
    sched = S.schedule(x, pad, CFG, scfg)
    bl = gen_len if block_length is None else block_length
    n_blocks, spb = gen_len // bl, steps // (gen_len // bl)
    expect = np.concatenate([np_get_num_transfer_tokens(x[:, P + b * bl:P + (b + 1) * bl] == MASK, spb)
                             for b in range(n_blocks)], axis=1)
    np.testing.assert_array_equal(np.asarray(sched.n_transfer), expect)
    assert int(sched.steps_per_block) == spb
    gen = (x == MASK) & pad
    np.testing.assert_array_equal(np.asarray(sched.gen_mask), gen)
    blocks = np.where(gen, (np.arange(x.shape[1])[None] - P) // bl, -1)
    np.testing.assert_array_equal(np.asarray(sched.block), blocks)
    # every generation position is scheduled exactly once
    np.testing.assert_array_equal(np.asarray(sched.n_transfer).sum(1), gen.sum(1))
    # Dream timesteps: linspace(1, eps, spb + 1) restarting in each block
    ts = np.linspace(1, scfg.eps, spb + 1)
    np.testing.assert_allclose(np.asarray(sched.t), np.tile(ts[:-1], n_blocks), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sched.s), np.tile(ts[1:], n_blocks), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(sched.last), np.tile(np.arange(spb) == spb - 1, n_blocks))


def test_schedule_errors():
    x, pad, _ = S.make_canvas([[5, 6]], 12, CFG)
    with pytest.raises(ValueError, match="not a multiple of block_length 5"):
        S.schedule(x, pad, CFG, S.SamplerConfig(steps=12, block_length=5))
    with pytest.raises(ValueError, match="steps=7 is not a multiple of the number of blocks 3"):
        S.schedule(x, pad, CFG, S.SamplerConfig(steps=7, block_length=4))
    with pytest.raises(ValueError, match="no generation positions"):
        S.schedule(jnp.full((1, 4), 5), jnp.ones((1, 4), bool), CFG, S.SamplerConfig())


# ------------------------------------------------------------------------- one step vs NumPy


STEP_CASES = [
    S.SamplerConfig(steps=9, block_length=4, remasking="low_confidence"),
    S.SamplerConfig(steps=9, block_length=4, remasking="low_confidence", temperature=0.8, suppress_eos=True),
    S.SamplerConfig(steps=9, block_length=4, remasking="random"),
    S.SamplerConfig(steps=9, block_length=4, remasking="origin", temperature=0.5),
    S.SamplerConfig(steps=9, block_length=4, remasking="maskgit_plus", temperature=0.7, alg_temp=0.5),
    S.SamplerConfig(steps=9, block_length=4, remasking="topk_margin"),
    S.SamplerConfig(steps=9, block_length=4, remasking="entropy"),
    S.SamplerConfig(steps=3, block_length=None, remasking="entropy", temperature=1.3, alg_temp=0.2),
]


@pytest.mark.slow
@pytest.mark.parametrize("scfg", STEP_CASES, ids=lambda c: f"{c.remasking}-T{c.temperature}-a{c.alg_temp}-e{int(c.suppress_eos)}")
def test_commit_matches_numpy(scfg):
    rng = np.random.default_rng(1)
    x, pad, _, P = region_canvas([3, 1, 2], 12, (0, 1, 5), rng)
    sched = S.schedule(x, pad, CFG, scfg)
    B, T, V = x.shape + (CFG.vocab_size,)
    logits = (3.0 * rng.standard_normal((B, T, V))).astype(np.float32)
    logits[0, P + 4:P + 8] = logits[0, P + 4]  # identical rows -> tied confidences (lowest position wins)
    logits[1, :, EOS] += 8.0  # so that suppress_eos matters
    for step in range(scfg.steps):
        xs = advance(x, sched, step, rng)
        key = jax.random.PRNGKey(100 + step)
        got = np.asarray(commit_jit(jnp.asarray(logits), jnp.asarray(xs), sched, jnp.int32(step), key, CFG, scfg))
        noise = draw_noise_jit(key, logits.shape, scfg)
        noise = S.Noise(*[None if a is None else np.asarray(a) for a in noise])
        cand = np.asarray(candidates_jit(jnp.asarray(xs), sched, step, CFG))
        want = np_commit(logits, xs, cand, np.asarray(sched.n_transfer)[:, step], float(sched.t[step]),
                         float(sched.s[step]), bool(sched.last[step]), noise, CFG, scfg)
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
        changed = got != xs
        assert not (changed & ~cand).any(), "only candidates of the current block may change"
        assert not (got == MASK)[changed].any(), "the mask token is never committed"
        if scfg.remasking in S.LLADA_RULES:
            np.testing.assert_array_equal(changed.sum(1), np.asarray(sched.n_transfer)[:, step])
        if scfg.suppress_eos:
            assert not (got[changed] == EOS).any()


def test_topk_mask_ties_and_per_row_k():
    conf = jnp.asarray([[0.5, 0.9, 0.5, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    cand = jnp.asarray([[True, True, True, True, True], [True, False, True, True, True]])
    got = np.asarray(S.topk_mask(conf, cand, jnp.asarray([3, 2])))
    np.testing.assert_array_equal(got, [[1, 1, 1, 0, 0], [1, 0, 1, 0, 0]])
    # k larger than the candidates commits only candidates
    np.testing.assert_array_equal(np.asarray(S.topk_mask(conf, cand, jnp.asarray([0, 9]))), [[0] * 5, [1, 0, 1, 1, 1]])


@pytest.mark.slow
def test_temperature_samples_softmax_over_temperature():
    scfg = S.SamplerConfig(steps=1, temperature=0.7)
    N, lg = 6000, np.asarray([1.0, 0.0, -0.5, 2.0, 0.0], np.float32)
    cfg = CFG.replace(vocab_size=5, mask_token_id=4, eos_token_id=1, pad_token_id=0)
    logits = jnp.broadcast_to(jnp.asarray(lg), (1, N, 5))
    x = jnp.full((1, N), 4, jnp.int32)
    noise = draw_noise_jit(jax.random.PRNGKey(3), (1, N, 5), scfg)
    out = np.asarray(commit_with_noise_jit(logits, x, jnp.ones((1, N), bool), jnp.asarray([N]), 1.0, 0.0, True,
                                         noise, cfg, scfg))[0]
    p = np_softmax(np.where(np.arange(5) == 4, -np.inf, lg.astype(np.float64)) / 0.7)
    freq = np.bincount(out, minlength=5) / N
    assert freq[4] == 0
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / N).max())


# --------------------------------------------------------------------------------- full steps


@pytest.mark.slow
def test_denoise_step_is_forward_then_commit(params):
    rng = np.random.default_rng(2)
    x, pad, prm, _ = region_canvas([3, 2], 8, (0, 2), rng)
    x, pad, prm = map(jnp.asarray, (x, pad, prm))
    key = jax.random.PRNGKey(5)
    for scfg in (S.SamplerConfig(steps=4, block_length=4), S.SamplerConfig(steps=4, cfg_scale=1.5)):
        sched = S.schedule(x, pad, CFG, scfg)
        step = jax.jit(S.denoise_step, static_argnames=("cfg", "scfg"))
        fwd = jax.jit(model.forward, static_argnames=("cfg",))
        with jax.default_matmul_precision("highest"):
            x_new, logits = step(params, CFG, scfg, x, pad, prm, sched, jnp.int32(1), key)
            cond = fwd(params, x, CFG, pad)
            if scfg.cfg_scale > 0:
                un = fwd(params, jnp.where(prm, MASK, x), CFG, pad)
                cond = un + (scfg.cfg_scale + 1) * (cond - un)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(cond), rtol=1e-5, atol=1e-5)
        want = commit_jit(logits, x, sched, 1, key, CFG, scfg)
        np.testing.assert_array_equal(np.asarray(x_new), np.asarray(want))


@pytest.mark.slow
@pytest.mark.parametrize("scfg", [
    S.SamplerConfig(steps=6, block_length=4, remasking="low_confidence", temperature=0.5),
    S.SamplerConfig(steps=6, block_length=4, remasking="random"),
    S.SamplerConfig(steps=3, remasking="origin", temperature=1.0),
    S.SamplerConfig(steps=6, block_length=4, remasking="maskgit_plus"),
    S.SamplerConfig(steps=4, remasking="topk_margin", cfg_scale=1.0),
    S.SamplerConfig(steps=6, block_length=4, remasking="entropy", alg_temp=0.3),
], ids=lambda c: c.remasking)
def test_generate_commits_every_position_once(params, scfg):
    rng = np.random.default_rng(3)
    x, pad, prm, _ = region_canvas([4, 1, 2], 12, (0, 0, 3), rng)
    out, hist = S.generate(params, CFG, scfg, x, pad, prm, jax.random.PRNGKey(7), return_history=True)
    out, hist = np.asarray(out), np.asarray(hist)
    assert hist.shape == (scfg.steps,) + x.shape
    np.testing.assert_array_equal(hist[-1], out)
    gen = (x == MASK) & pad
    traj = np.concatenate([x[None], hist], 0)
    # prompt and padding never change
    assert (traj[:, ~gen] == x[~gen]).all()
    # every generation position ends committed, flips mask -> token exactly once, then stays
    assert not (out[gen] == MASK).any()
    flips = (traj[1:] != traj[:-1]).sum(0)
    np.testing.assert_array_equal(flips[gen], 1)
    sched = S.schedule(x, pad, CFG, scfg)
    per_step = (traj[1:] != traj[:-1]).sum(-1)  # [steps, B]
    if scfg.remasking in S.LLADA_RULES:
        np.testing.assert_array_equal(per_step.T, np.asarray(sched.n_transfer))
    # blocks are filled in order: a position of block b is committed within block b's steps
    step_of = np.argmax(traj[1:] != traj[:-1], axis=0)
    spb = int(sched.steps_per_block)
    np.testing.assert_array_equal((step_of // spb)[gen], np.asarray(sched.block)[gen])


@pytest.mark.slow
@pytest.mark.parametrize("scfg,rows", [
    (S.SamplerConfig(steps=8, block_length=4, remasking="low_confidence"), (0, 1)),
    (S.SamplerConfig(steps=4, remasking="entropy"), (1,)),  # the padded row only (one compile less)
], ids=lambda c: getattr(c, "remasking", ""))
def test_padded_batch_equals_unpadded_rows(params, scfg, rows):
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(2, MASK, n)) for n in (5, 2)]
    with jax.default_matmul_precision("highest"):
        x, pad, prm = S.make_canvas(prompts, 8, CFG)
        assert not np.asarray(pad)[1].all()  # row 1 is left-padded
        batch = np.asarray(S.generate(params, CFG, scfg, x, pad, prm, jax.random.PRNGKey(0)))
        for r in rows:
            p = prompts[r]
            xr, pr, qr = S.make_canvas([p], 8, CFG)
            single = np.asarray(S.generate(params, CFG, scfg, xr, pr, qr, jax.random.PRNGKey(0)))
            np.testing.assert_array_equal(batch[r, -8:], single[0, -8:], err_msg=f"row {r}")
            np.testing.assert_array_equal(batch[r, -8 - len(p):-8], p)


def test_generate_compiles_once(params, monkeypatch):
    counted = chex.assert_max_traces(S._generate_impl, n=1)
    monkeypatch.setattr(S, "_generate_impl", counted)
    scfg = S.SamplerConfig(steps=5, remasking="low_confidence")  # shape/config not used by other tests
    before = S.generate_scan._cache_size()
    rng = np.random.default_rng(5)
    for i in range(3):
        # different prompts, prompt lengths (within the same canvas size), gen masks and keys
        prompts = [list(rng.integers(2, MASK, n)) for n in rng.integers(1, 6, 2)]
        x, pad, prm = S.make_canvas(prompts, 5, CFG, max_len=11)
        S.generate(params, CFG, scfg, x, pad, prm, jax.random.PRNGKey(i))
    assert S.generate_scan._cache_size() == before + 1
    chex.clear_trace_counter()


def test_generate_drops_the_attention_mask_without_padding(params, monkeypatch):
    """A canvas without padding runs attention unmasked (`model.attention_mask`), the same tokens as
    the jitted scan given the all-True mask; a padded canvas keeps its mask."""
    seen = []
    scan = S.generate_scan
    monkeypatch.setattr(S, "generate_scan", lambda *a, **k: seen.append(a[2]) or scan(*a, **k))
    scfg = S.SamplerConfig(steps=4)
    rng = np.random.default_rng(8)
    x, pad, prm = S.make_canvas([list(rng.integers(2, MASK, 4))], 4, CFG)
    assert np.asarray(pad).all()
    out = S.generate(params, CFG, scfg, x, pad, prm, 0)
    assert seen[-1] is None
    masked = scan(params, x, jnp.asarray(pad), prm, S.schedule(x, pad, CFG, scfg), S.as_key(0), None, cfg=CFG,
                  scfg=scfg, return_history=False)
    np.testing.assert_array_equal(out, masked)
    x, pad, prm = S.make_canvas([list(rng.integers(2, MASK, n)) for n in (4, 2)], 4, CFG)
    S.generate(params, CFG, scfg, x, pad, prm, 0)
    np.testing.assert_array_equal(seen[-1], pad)


@pytest.mark.slow
def test_jitted_step_accepts_traced_step_and_intervention(params):
    """One compiled step serves every step; an edit keyed to a step changes only that step."""
    x, pad, prm = S.make_canvas([[5, 6, 7]], 4, CFG)
    scfg = S.SamplerConfig(steps=4)
    sched = S.schedule(x, pad, CFG, scfg)
    step = jax.jit(S.denoise_step, static_argnames=("cfg", "scfg"))
    key = jax.random.PRNGKey(0)
    before = step._cache_size()
    from timerome_jax.backbone.intervene import Intervene, Patch

    D = CFG.d_model
    patch = Patch(layer=jnp.int32(1), step=jnp.int32(2), module=jnp.int32(0), pos=jnp.asarray([[3]]),
                  valid=jnp.asarray([[True]]), value=jnp.full((1, 1, D), 5.0))
    iv = Intervene(patch=patch)
    with jax.default_matmul_precision("highest"):
        for st in range(4):
            _, plain = step(params, CFG, scfg, x, pad, prm, sched, jnp.int32(st), key)
            _, patched = step(params, CFG, scfg, x, pad, prm, sched, jnp.int32(st), key, iv)
            same = np.allclose(np.asarray(plain), np.asarray(patched))
            assert same == (st != 2), f"step {st}"
    assert step._cache_size() == before + 2  # one program without and one with the patch


# ------------------------------------------------------------------------------ generate_text


class CharTok:
    """Token id = 2 + (ord(c) - 32) for printable ASCII; EOS = 1."""

    eos_id = EOS

    def encode(self, text):
        return [2 + ord(c) - 32 for c in text]

    def decode(self, ids):
        return "".join(chr(32 + i - 2) if 2 <= i < 2 + 93 else "?" for i in ids)


def test_cut_at_eos():
    assert S.cut_at_eos([5, 6, EOS, 7, EOS], EOS) == [5, 6]
    assert S.cut_at_eos([5, 6], EOS) == [5, 6]
    assert S.cut_at_eos([EOS, 5], EOS) == []


def test_generate_text_matches_generate(params):
    tok, scfg = CharTok(), S.SamplerConfig(steps=4, block_length=4)
    texts = S.generate_text(params, CFG, tok, ["ab", "hello"], 8, scfg, seed=3)
    x, pad, prm = S.make_canvas([tok.encode("ab"), tok.encode("hello")], 8, CFG)
    out = np.asarray(S.generate(params, CFG, scfg, x, pad, prm, jax.random.PRNGKey(3)))[:, -8:]
    assert texts == [tok.decode(S.cut_at_eos(r, EOS)) for r in out]
    assert all(len(t) <= 8 for t in texts)


# --------------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_smoke_benchmark_tiny(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "probes"))
    try:
        import smoke_llada8b
    finally:
        sys.path.pop(0)
    out = tmp_path / "smoke.json"
    res = smoke_llada8b.main(["--tiny", "--out", str(out)])
    disk = json.loads(out.read_text())
    assert disk["tiny"] and disk["jax_version"] == jax.__version__ and disk["device_kind"]
    for k in ("forward", "generate_b1", "generate_b8"):
        assert len(disk[k]["times_s"]) >= 5 and disk[k]["median_s"] > 0 and disk[k]["compile_s"] > 0, k
    assert disk["generate_b1"]["masks_left_after_generation"] == 0
    assert disk["generate_b8"]["batch"] == 8 and disk["generate_b8"]["masks_left_after_generation"] == 0
    assert disk["config"]["dtype"] == "bfloat16" and res["param_count"] > 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp file left behind
