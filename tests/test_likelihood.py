"""ELBO: mask statistics vs LLaDA's / Dream's formulas, the estimate vs a NumPy computation on the same
masks, invariance to batch order / padding / chunking, exactness and unbiasedness on a model whose
predictions ignore the context, and the all-masked proxy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_params

from timerome_jax.diffusion import likelihood as LK
from timerome_jax.backbone import model
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene, Patch

MASK, PAD, EOS = 95, 0, 1
CFG = ModelConfig(family="llada", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
                  d_ff=64, mask_token_id=MASK, pad_token_id=PAD, eos_token_id=EOS, max_seq_len=64)
CFG_SHIFT = CFG.replace(family="dream", logits_shift=True)

fwd = jax.jit(model.forward, static_argnames=("cfg",))
masks_jit = jax.jit(LK.mc_masks, static_argnames=("n_mc", "estimator", "eps"))


@pytest.fixture(scope="module")
def params():
    return np_params(CFG)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12]]
ANSWERS = [[20, 21, 22, 23, 24], [30], [40, 41, 42, 43, 44, 45, 46]]


# ------------------------------------------------------------------------------------ batches


def test_make_qa_batch_layout_and_errors():
    tok, am, pm = LK.make_qa_batch([[5, 6], [7]], [[8, 9], [10, 11, 12]], CFG)
    np.testing.assert_array_equal(np.asarray(tok), [[5, 6, 8, 9], [7, 10, 11, 12]])
    np.testing.assert_array_equal(np.asarray(am), [[0, 0, 1, 1], [0, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(pm), [[1, 1, 1, 1], [1, 1, 1, 1]])
    tok, am, pm = LK.make_qa_batch([[5, 6], [7]], [[8], [10]], CFG, max_len=5)
    np.testing.assert_array_equal(np.asarray(tok), [[5, 6, 8, PAD, PAD], [7, 10, PAD, PAD, PAD]])
    np.testing.assert_array_equal(np.asarray(pm), [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    assert tok.dtype == jnp.int32 and am.dtype == jnp.bool_
    with pytest.raises(ValueError, match="row 1.*max_len=4"):
        LK.make_qa_batch([[5], [5, 6, 7]], [[8], [9, 9]], CFG, max_len=4)
    with pytest.raises(ValueError, match="row 0.*max_seq_len=64"):
        LK.make_qa_batch([[5] * 60], [[8] * 5], CFG)
    with pytest.raises(ValueError, match="row 1: the answer is empty"):
        LK.make_qa_batch([[5], [6]], [[8], []], CFG)
    with pytest.raises(ValueError, match="row 0: answer token 96"):
        LK.make_qa_batch([[5]], [[96]], CFG)
    with pytest.raises(ValueError, match="row 0: empty prompt"):
        LK.make_qa_batch([[]], [[8]], CFG_SHIFT)
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        LK.make_qa_batch([[5], [6]], [[8]], CFG)


# -------------------------------------------------------------------------------------- masks


@pytest.mark.slow
def test_llada_masks_follow_get_log_likelihood():
    tok, am, pm = LK.make_qa_batch(PROMPTS, ANSWERS, CFG, max_len=14)
    am_np = np.asarray(am)
    for n in (1, 7):
        masks, w = map(np.asarray, masks_jit(jax.random.PRNGKey(0), jnp.asarray([3, 4, 5]), am, n, "llada"))
        assert masks.shape == (n, 3, 14) and w.shape == (n, 3)
        assert not (masks & ~am_np[None]).any(), "only answer positions are masked"
        for b in range(3):
            L = am_np[b].sum()
            ell = masks[:, b].sum(-1)
            k = ell[0]  # l_0 = round(k) = k
            assert 1 <= k <= L
            # LLaDA: x = round(linspace(k, k + (b-1) * (L / b), b)); x = ((x - 1) % L) + 1
            x = np.round(np.linspace(float(k), k + (n - 1) * (L / n), n)).astype(int)
            np.testing.assert_array_equal(ell, ((x - 1) % L) + 1)
            np.testing.assert_allclose(w[:, b], L / ell, rtol=1e-6)
    # k ~ U{1..L} over examples, and each answer position is equally likely to be masked
    ids = jnp.arange(400)
    am1 = jnp.zeros((400, 8), bool).at[:, 2:7].set(True)  # L = 5
    masks, _ = map(np.asarray, masks_jit(jax.random.PRNGKey(1), ids, am1, 1, "llada"))
    counts = np.bincount(masks[0].sum(-1), minlength=6)[1:]
    assert counts.min() > 400 / 5 - 4 * np.sqrt(400 * 0.2 * 0.8), counts
    freq = masks[0][:, 2:7].mean(0)
    np.testing.assert_allclose(freq, 0.6, atol=0.1)  # E[k] / L = 3 / 5


def test_dream_masks_are_stratified_bernoulli():
    eps, n = 1e-3, 8
    ids = jnp.arange(300)
    am = jnp.zeros((300, 12), bool).at[:, 2:12].set(True)
    masks, w = map(np.asarray, masks_jit(jax.random.PRNGKey(2), ids, am, n, "dream", eps))
    assert not masks[:, :, :2].any()
    p = 1.0 / w  # [n, B]
    t = (p - eps) / (1 - eps)
    # t_j = (u0 + j / n) mod 1
    np.testing.assert_allclose(np.mod(t - t[:1], 1.0), np.broadcast_to(np.arange(n)[:, None] / n, t.shape), atol=1e-5)
    # every answer position is masked independently with probability p_j: the masked count of a
    # sample is Binomial(L, p_j). Pooled over the 2400 samples, its mean and its dispersion must match.
    _assert_binomial(masks[:, :, 2:], p)


def _assert_binomial(masks, p):
    """masks [n, B, L] bool drawn with per-sample rate p [n, B]: the total count is within 4 standard
    errors of sum L p, and the pooled dispersion sum (c - L p)^2 / sum L p (1 - p) is 1 within 0.1
    (its standard error here is about 0.03; masks that are all-or-nothing per sample give about L)."""
    L = masks.shape[-1]
    c = masks.sum(-1).astype(np.float64)
    var = L * p * (1 - p)
    z = (c - L * p).sum() / np.sqrt(var.sum())
    assert abs(z) < 4, f"masked count off by {z:.1f} standard errors"
    disp = ((c - L * p) ** 2).sum() / var.sum()
    assert 0.9 < disp < 1.1, f"count dispersion {disp:.3f}, Binomial gives 1"
    # and no position is favoured: per-position rates agree with the mean rate within 4 s.e.
    rate = masks.reshape(-1, L).mean(0)
    se = np.sqrt((p * (1 - p)).sum()) / p.size
    np.testing.assert_allclose(rate, p.mean(), atol=4 * se)


def test_dream_masks_use_p_not_t():
    """p = (1 - eps) t + eps sets the masking rate (not only the weight 1 / p): with eps = 0.4 every
    sample masks at least ~40% of the answer, whatever t. A mask drawn with t would mask ~0.5 on
    average instead of ~0.7, tens of standard errors away."""
    eps, n = 0.4, 8
    ids = jnp.arange(200)
    am = jnp.zeros((200, 12), bool).at[:, 2:12].set(True)
    masks, w = map(np.asarray, masks_jit(jax.random.PRNGKey(5), ids, am, n, "dream", eps))
    p = 1.0 / w
    assert p.min() >= eps - 1e-6 and p.max() <= 1.0 + 1e-6
    _assert_binomial(masks[:, :, 2:], p)
    low = p < eps + 0.1  # samples with t < ~1/6: still masked at rate ~eps, not ~t
    assert low.sum() > 100 and masks[:, :, 2:][low].mean() > eps - 0.05


# --------------------------------------------------------------------------------------- ELBO


@pytest.mark.slow
@pytest.mark.parametrize("cfg,estimator,with_noise", [(CFG, "llada", False), (CFG_SHIFT, "auto", True)],
                         ids=["llada", "dream-shifted+noise+patch"])
def test_elbo_matches_numpy_on_same_masks(cfg, estimator, with_noise):
    params = np_params(cfg, seed=1)
    tok, am, pm = LK.make_qa_batch(PROMPTS, ANSWERS, cfg)
    ids = jnp.asarray([7, 1, 3])
    key = jax.random.PRNGKey(9)
    iv = None
    if with_noise:
        rng = np.random.default_rng(0)
        noise = 0.5 * rng.standard_normal(tok.shape + (cfg.d_model,))
        patch = Patch(layer=jnp.int32(0), step=jnp.int32(0), module=jnp.int32(0), pos=jnp.asarray([[3], [1], [4]]),
                      valid=jnp.ones((3, 1), bool), value=jnp.asarray(rng.standard_normal((3, 1, cfg.d_model)), jnp.float32))
        iv = Intervene(noise=jnp.asarray(noise, jnp.float32), patch=patch)
    est = LK.resolve_estimator(cfg, estimator)
    assert est == ("dream" if cfg.logits_shift else "llada")
    n = 4
    with jax.default_matmul_precision("highest"):
        got = np.asarray(LK.elbo(params, cfg, tok, am, pm, key, n_mc=n, example_ids=ids, intervene=iv,
                                 estimator=estimator, mc_batch=2))
        masks, w = map(np.asarray, masks_jit(key, ids, am, n, est))
        tok_np, am_np = np.asarray(tok), np.asarray(am)
        want = np.zeros(3)
        for j in range(n):
            noisy = np.where(masks[j], MASK, tok_np)
            lp = np_log_softmax(np.asarray(fwd(params, jnp.asarray(noisy), cfg, pm, iv)))
            ce = -np.take_along_axis(lp, tok_np[..., None], -1)[..., 0]
            if est == "llada":  # weight 1 / p_mask with p_mask = l / L, computed here by hand
                p = masks[j].sum(-1) / am_np.sum(-1)
            else:
                p = 1.0 / w[j]
            want += (ce * masks[j]).sum(-1) / p
        want = -want / n
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert np.all(got < 0)


@pytest.mark.slow
def test_scores_ignore_batch_order_padding_and_chunking(params):
    key = jax.random.PRNGKey(4)
    tok, am, pm = LK.make_qa_batch(PROMPTS, ANSWERS, CFG)
    ids = np.asarray([10, 11, 12])
    with jax.default_matmul_precision("highest"):
        base = np.asarray(LK.elbo(params, CFG, tok, am, pm, key, n_mc=4, example_ids=ids))
        perm = [2, 0, 1]
        tok2, am2, pm2 = LK.make_qa_batch([PROMPTS[i] for i in perm], [ANSWERS[i] for i in perm], CFG, max_len=16)
        other = np.asarray(LK.elbo(params, CFG, tok2, am2, pm2, key, n_mc=4, example_ids=ids[perm], mc_batch=1))
        tok3, am3, pm3 = LK.make_qa_batch([PROMPTS[1]], [ANSWERS[1]], CFG)
        alone = np.asarray(LK.elbo(params, CFG, tok3, am3, pm3, key, n_mc=4, example_ids=ids[1:2]))
        relabel = np.asarray(LK.elbo(params, CFG, tok, am, pm, key, n_mc=4, example_ids=ids + 1))
    np.testing.assert_allclose(other, base[perm], rtol=1e-5)
    np.testing.assert_allclose(alone, base[1:2], rtol=1e-5)
    assert not np.allclose(relabel, base), "other example ids draw other masks"


def context_free_params(cfg):
    """Zero attention/MLP outputs: h_i = embed(x_i), so every masked position predicts the same
    distribution whatever the context, and log p(answer | prompt) = sum_i log p(a_i) exactly."""
    p = np_params(cfg, seed=2, std=1.0)
    p["layers"]["wo"] = jnp.zeros_like(p["layers"]["wo"])
    p["layers"]["w_down"] = jnp.zeros_like(p["layers"]["w_down"])
    lp = np_log_softmax(np.asarray(fwd(p, jnp.asarray([[MASK]]), cfg)))[0, 0]
    return p, lp


@pytest.mark.slow
def test_one_token_answer_is_exact_and_estimators_are_unbiased():
    params, lp = context_free_params(CFG)
    # a 1-token answer: LLaDA's estimator masks it in every sample with weight 1 -> exactly log p
    tok, am, pm = LK.make_qa_batch([[5, 6], [7, 8, 9]], [[40], [41]], CFG)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(LK.elbo(params, CFG, tok, am, pm, jax.random.PRNGKey(0), n_mc=3))
    np.testing.assert_allclose(got, lp[[40, 41]], rtol=1e-5)
    # a 6-token answer: the mean over independent replicates (different example ids) matches
    # sum_i log p(a_i) within 4 standard errors, for both estimators
    ans = [40, 41, 50, 60, 70, 80]
    exact = lp[ans].sum()
    R = 48
    tok, am, pm = LK.make_qa_batch([[5, 6]] * R, [ans] * R, CFG)
    for est in ("llada", "dream"):
        est_vals = np.asarray(LK.elbo(params, CFG, tok, am, pm, jax.random.PRNGKey(1), n_mc=16,
                                      example_ids=jnp.arange(R), estimator=est))
        se = est_vals.std(ddof=1) / np.sqrt(R)
        assert abs(est_vals.mean() - exact) < 4 * se + 1e-3, (est, est_vals.mean(), exact, se)
        assert est_vals.std() > 0  # the replicates really are different mask draws


@pytest.mark.slow
def test_answer_logprob_all_masked(params):
    tok, am, pm = LK.make_qa_batch(PROMPTS, ANSWERS, CFG)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(LK.answer_logprob_all_masked(params, CFG, tok, am, pm))
        lp = np_log_softmax(np.asarray(fwd(params, jnp.where(am, MASK, tok), CFG, pm)))
    want = (np.take_along_axis(lp, np.asarray(tok)[..., None], -1)[..., 0] * np.asarray(am)).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # context-free model: all-masked proxy == exact log-likelihood
    cf, lpc = context_free_params(CFG)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(LK.answer_logprob_all_masked(cf, CFG, tok, am, pm))
    np.testing.assert_allclose(got, [lpc[a].sum() for a in ANSWERS], rtol=1e-5)


def test_elbo_input_errors(params):
    tok, am, pm = LK.make_qa_batch(PROMPTS, ANSWERS, CFG)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="row 1 has no answer tokens"):
        LK.elbo(params, CFG, tok, am.at[1].set(False), pm, key)
    with pytest.raises(ValueError, match="row 0 marks padding"):
        LK.elbo(params, CFG, tok, am, pm.at[0, 5].set(False), key)
    with pytest.raises(ValueError, match="mc_batch"):
        LK.elbo(params, CFG, tok, am, pm, key, n_mc=6, mc_batch=4)
    with pytest.raises(ValueError, match="n_mc"):
        LK.elbo(params, CFG, tok, am, pm, key, n_mc=0)
    with pytest.raises(ValueError, match="estimator"):
        LK.elbo(params, CFG, tok, am, pm, key, estimator="mdlm")
    with pytest.raises(ValueError, match=r"example_ids must have shape \(3,\)"):
        LK.elbo(params, CFG, tok, am, pm, key, example_ids=jnp.arange(2))
    with pytest.raises(ValueError, match="row 0 starts with an answer token"):
        LK.elbo(params, CFG_SHIFT, tok, am.at[0, 0].set(True), pm, key)
    with pytest.raises(ValueError, match="tokens, answer_mask and pad_mask"):
        LK.elbo(params, CFG, tok[:, :-1], am, pm, key)
