"""The six unlearning losses against NumPy hand computations on a toy model (tiny random LLaDA)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timerome_jax.backbone import model
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.baselines import losses as L

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=48,
                  mask_token_id=1, pad_token_id=0, eos_token_id=0, max_seq_len=32)


_fwd = jax.jit(lambda params, x, pm: model.forward(params, x, CFG, pm))
_mask = jax.jit(L.diffusion_mask)


def _np_logsoftmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_logsigmoid(x):
    return -np.log1p(np.exp(-np.asarray(x, np.float64)))


@pytest.fixture(scope="module")
def toy():
    params = model.init_params(jax.random.PRNGKey(0), CFG, std=0.2)
    rng = np.random.default_rng(0)
    B, T = 3, 12
    tokens = rng.integers(2, CFG.vocab_size, (B, T)).astype(np.int32)
    plen = np.array([4, 5, 3])
    alen = np.array([6, 4, 8])
    am = np.zeros((B, T), bool)
    pm = np.zeros((B, T), bool)
    for b in range(B):
        am[b, plen[b]:plen[b] + alen[b]] = True
        pm[b, :plen[b] + alen[b]] = True
        tokens[b, plen[b] + alen[b]:] = CFG.pad_token_id
    return params, L.QA(jnp.asarray(tokens), jnp.asarray(am), jnp.asarray(pm))


def _terms(params, qa, key):
    masked, p = _mask(key, qa.answer_mask)
    x = L.noisy_tokens(qa.tokens, masked, CFG.mask_token_id)
    logits = _fwd(params, x, qa.pad_mask)
    return masked, p, x, logits


def _np_nll(logits, tokens, masked, p, am):
    lsm = _np_logsoftmax(logits)
    ce = -np.take_along_axis(lsm, np.asarray(tokens)[..., None], -1)[..., 0]
    return (ce * np.asarray(masked)).sum(-1) / np.asarray(p, np.float64), np.asarray(am).sum(-1).astype(np.float64)


def test_diffusion_mask_never_touches_prompt_or_padding(toy):
    _, qa = toy
    am = np.asarray(qa.answer_mask)
    seen = np.zeros_like(am)
    for s in range(50):
        masked, p = _mask(jax.random.PRNGKey(s), qa.answer_mask)
        masked, p = np.asarray(masked), np.asarray(p)
        assert not (masked & ~am).any()
        assert ((p >= L.DEFAULT_EPS) & (p <= 1.0)).all()
        seen |= masked
    assert (seen == am).all()  # every answer position gets masked sometimes


def test_nll_ga_gd_match_numpy(toy):
    params, qa = toy
    masked, p, x, logits = _terms(params, qa, jax.random.PRNGKey(1))
    assert int(np.asarray(masked).sum()) > 0
    nll, n = L.nll_terms(logits, qa.tokens, masked, p, qa.answer_mask)
    nll_np, n_np = _np_nll(logits, qa.tokens, masked, p, qa.answer_mask)
    np.testing.assert_allclose(nll, nll_np, rtol=1e-5)
    np.testing.assert_allclose(n, n_np)
    np.testing.assert_allclose(L.ga_loss(nll, n), -(nll_np / n_np).mean(), rtol=1e-5)
    # a second batch as the retain set
    m2, p2, _, lg2 = _terms(params, qa, jax.random.PRNGKey(2))
    nr, nrn = L.nll_terms(lg2, qa.tokens, m2, p2, qa.answer_mask)
    nr_np, nrn_np = _np_nll(lg2, qa.tokens, m2, p2, qa.answer_mask)
    np.testing.assert_allclose(L.gd_loss(nll, n, nr, nrn, 4.0),
                               -(nll_np / n_np).mean() + 4.0 * (nr_np / nrn_np).mean(), rtol=1e-5)


def test_nll_is_unbiased_for_the_all_masked_weighting(toy):
    """E_t[sum_masked CE / p] over many draws ~ the ELBO scale: sanity that 1/p weighting is applied."""
    params, qa = toy
    masked, p, x, logits = _terms(params, qa, jax.random.PRNGKey(3))
    nll, _ = L.nll_terms(logits, qa.tokens, masked, p, qa.answer_mask)
    nll_nop, _ = L.nll_terms(logits, qa.tokens, masked, jnp.ones_like(p), qa.answer_mask)
    np.testing.assert_allclose(np.asarray(nll) * np.asarray(p), nll_nop, rtol=1e-5)


def test_npo_and_simnpo_match_numpy(toy):
    params, qa = toy
    masked, p, x, logits = _terms(params, qa, jax.random.PRNGKey(4))
    ref = model.init_params(jax.random.PRNGKey(9), CFG, std=0.2)
    ref_logits = _fwd(ref, x, qa.pad_mask)
    nll, n = L.nll_terms(logits, qa.tokens, masked, p, qa.answer_mask)
    nref, _ = L.nll_terms(ref_logits, qa.tokens, masked, p, qa.answer_mask)
    a, an = _np_nll(logits, qa.tokens, masked, p, qa.answer_mask)
    r, _ = _np_nll(ref_logits, qa.tokens, masked, p, qa.answer_mask)
    for beta in (0.1, 1.0):
        np.testing.assert_allclose(L.npo_loss(nll, nref, beta), -(2 / beta) * _np_logsigmoid(beta * (a - r)).mean(),
                                   rtol=1e-5)
        np.testing.assert_allclose(L.simnpo_loss(nll, n, beta, 0.5),
                                   -(2 / beta) * _np_logsigmoid(beta * (a / an - 0.5)).mean(), rtol=1e-5)
    # at the reference itself NPO is exactly (2 / beta) log 2
    np.testing.assert_allclose(L.npo_loss(nref, nref, 0.1), 20 * np.log(2), rtol=1e-6)


def test_rmu_matches_numpy(toy):
    params, qa = toy
    rng = np.random.default_rng(1)
    B, T, D = 3, 12, CFG.d_model
    hf, hf0, hr, hr0 = (rng.normal(size=(B, T, D)).astype(np.float32) for _ in range(4))
    mf, mr = np.asarray(qa.pad_mask), np.asarray(qa.answer_mask)
    u = rng.uniform(size=D).astype(np.float32)
    u /= np.linalg.norm(u)
    loss, f, r = L.rmu_loss(hf, hf0, mf, hr, hr0, mr, u, beta=5.0, alpha=3.0)
    c = 5.0 * np.linalg.norm(hf0.astype(np.float64), axis=-1, keepdims=True)
    f_np = (((hf - c * u) ** 2).mean(-1) * mf).sum() / mf.sum()
    r_np = (((hr - hr0) ** 2).mean(-1) * mr).sum() / mr.sum()
    np.testing.assert_allclose(f, f_np, rtol=1e-5)
    np.testing.assert_allclose(r, r_np, rtol=1e-5)
    np.testing.assert_allclose(loss, f_np + 3.0 * r_np, rtol=1e-5)


def test_mdu_matches_numpy_and_anchor_input(toy):
    params, qa = toy
    masked, p, x, logits = _terms(params, qa, jax.random.PRNGKey(5))
    anchor_in = L.null_prompt(x, qa.answer_mask, qa.pad_mask, CFG.mask_token_id)
    am, pm = np.asarray(qa.answer_mask), np.asarray(qa.pad_mask)
    assert (np.asarray(anchor_in)[pm & ~am] == CFG.mask_token_id).all()       # prompt blanked
    np.testing.assert_array_equal(np.asarray(anchor_in)[am], np.asarray(x)[am])  # answer state kept
    np.testing.assert_array_equal(np.asarray(anchor_in)[~pm], np.asarray(x)[~pm])  # padding kept
    anchor = _fwd(params, anchor_in, qa.pad_mask)
    for tau in (1.0, 2.0):
        got = L.mdu_loss(logits, anchor, masked, tau)
        lq = _np_logsoftmax(np.asarray(anchor, np.float64) / tau)
        lp = _np_logsoftmax(logits)
        kl = (np.exp(lq) * (lq - lp)).sum(-1)
        m = np.asarray(masked)
        np.testing.assert_allclose(got, (kl * m).sum() / m.sum(), rtol=1e-4)
    assert abs(float(L.mdu_loss(logits, logits, masked, 1.0))) < 1e-5
