"""The first-order TIE screen: its estimate is the derivative it claims to be (checked by finite
differences through the plain patch mechanism), the candidate-restricted exact sweep equals the full
sweep on those cells, and on the packaged model the screen ranks cells like the exact sweep and
screen + exact top-k selects Eq. 5's coordinate."""

import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr
from conftest import EarlyProcess, optimized_env

from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene, Patch
from timerome_jax.backbone.model import forward, init_params
from timerome_jax.diffusion.likelihood import token_logprob
from timerome_jax.method import screen as sc
from timerome_jax.method import trace as tr

_forward = jax.jit(forward, static_argnames=("cfg",))
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64,
                  mask_token_id=63, pad_token_id=0, eos_token_id=0, max_seq_len=64)
TC = tr.TraceConfig(steps=3, n_noise=1, chunk=5, tau=0.7)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup():
    params = init_params(jax.random.key(0), CFG, std=0.3)
    fb = tr.make_fact_batch([[5, 6, 7, 8], [9, 10, 11]], [[1, 2], [0]], [[12, 13, 14, 15, 0], [16, 17, 0]], CFG)
    return params, fb


def weighted_later_scores(params, fb, noise, corr, patch, k):
    """sum_{k'>k} w_{k,k'} s(k') with the corrupted canvases fixed, patch applied at step k; the
    Eq. 3 bookkeeping written out here step by step, independently of the screen's weights c."""
    w = tr.decay_weights(TC.steps, TC.tau)
    lpf = np.zeros(fb.x0.shape)
    total = 0.0
    for j in range(TC.steps):
        x = corr.xs[j]
        logits = _forward(params, x, CFG, fb.pad_mask, Intervene(noise=noise, patch=patch), jnp.int32(j))
        lp = np.asarray(token_logprob(logits, fb.obj), np.float64)
        still = (np.asarray(x) == CFG.mask_token_id) & np.asarray(fb.obj_mask)
        lpf = np.where(still, lp, lpf)
        s = np.sum(np.where(np.asarray(fb.obj_mask), lpf, 0.0), -1)  # s(j+1) [B]
        if j + 1 > k:
            total = total + w[k, j] * s
    return total


@pytest.mark.slow
def test_screen_estimate_is_the_commits_fixed_derivative(setup):
    params, fb = setup
    with jax.default_matmul_precision("highest"):
        est = sc.screen(params, CFG, fb, TC, alphas=(1.0,)).estimate  # [B, 3, L, K]
        sigma = TC.noise_scale * float(jnp.std(params["embed"]))
        noise = tr.embedding_noise(jax.random.fold_in(jax.random.key(TC.seed), 0), fb, params, sigma)
        clean = tr.trajectory(params, fb, None, cfg=CFG, tcfg=TC, read=True)
        corr = tr.trajectory(params, fb, noise, cfg=CFG, tcfg=TC, read=True)
        eps = 1e-3
        for m, l, k in [(1, 1, 0), (0, 0, 1)]:
            diff = clean.acts[k, m, l] - corr.acts[k, m, l]
            fd = []
            for sgn in (1, -1):
                p = Patch(jnp.int32(l), jnp.int32(k), jnp.int32(m), fb.subj_pos, fb.subj_valid,
                          corr.acts[k, m, l] + sgn * eps * diff)
                fd.append(weighted_later_scores(params, fb, noise, corr, p, k))
            np.testing.assert_allclose(est[:, m, l, k], (fd[0] - fd[1]) / (2 * eps), rtol=2e-2, atol=2e-3)


@pytest.mark.slow
def test_candidate_sweep_equals_full_sweep_on_its_cells(setup):
    params, fb = setup
    cands = np.array([[0, 1, 0], [2, 0, 2], [1, 1, 1], [0, 0, 2]])
    lanes = tr.plan_lanes(CFG.n_layers, TC.steps, candidates=cands)
    got = sorted((int(k), int(l), int(m)) for kA, lA, mA, kB, lB, mB in lanes
                 for k, l, m in ((kA, lA, mA), (kB, lB, mB)) if l >= 0)
    assert got == sorted((k, l, m) for m, l, k in cands.tolist())
    with jax.default_matmul_precision("highest"):
        full = tr.trace(params, CFG, fb, TC)
        part = tr.trace(params, CFG, fb, TC, candidates=cands)
    on = np.zeros((3, CFG.n_layers, TC.steps), bool)
    on[cands[:, 0], cands[:, 1], cands[:, 2]] = True
    np.testing.assert_allclose(part.tie_bar[:, on], full.tie_bar[:, on], rtol=1e-5, atol=1e-5)
    assert np.isnan(part.tie_bar[:, ~on]).all()
    with pytest.raises(ValueError, match="outside"):
        tr.plan_lanes(CFG.n_layers, TC.steps, candidates=np.array([[0, 5, 0]]))


def test_top_candidates_and_select_screened():
    est = np.zeros((2, 3, 4, 5))
    est[:, 0, 2, 3] = 5.0
    est[:, 0, 1, 1] = -4.0
    est[:, 1, 0, 0] = 9.0
    c = sc.top_candidates(est, 0.1, ("resid", "attn"))  # ceil(0.1 * 20) = 2 per module
    assert c.shape == (4, 3) and [0, 2, 3] in c.tolist() and [0, 1, 1] in c.tolist() and [1, 0, 0] in c.tolist()
    tie_bar = np.full(est.shape, np.nan)
    tie_bar[:, 0, 2, 3], tie_bar[:, 0, 1, 1], tie_bar[:, 1, 0, 0] = 1.0, -3.0, 50.0
    r = sc.ScreenedTrace(est, None, tie_bar, c, None, None)
    coord, _ = sc.select_screened(r)
    assert (coord.layer, coord.module, coord.step) == (1, 0, -1)  # exact values decide, attn excluded
    with pytest.raises(ValueError):
        sc.top_candidates(est, 0.0)


# The packaged 6-layer model: 4 facts (47 tokens) instead of 8 (110): still 144 cells to rank, and
# the check still bites: with n_noise=1 the screen picks another layer than the exact sweep on these
# facts. Running the model (not compiling) dominates, so it runs with XLA's default optimisation, in a
# process started right after collection (conftest.EarlyProcess) beside the in-process tests; the
# assertions are made here.
PACKAGED = textwrap.dedent(r"""
    import json
    import numpy as np
    from timerome_jax.backbone.checkpoint import load_model_with_tokenizer
    from timerome_jax.backbone.tokenizer import eos_or_default
    from timerome_jax.method import facts as F
    from timerome_jax.method import screen as sc
    from timerome_jax.method import trace as tr
    from timerome_jax.tofu.models import DEFAULT_MODEL

    params, cfg, tok = load_model_with_tokenizer(str(DEFAULT_MODEL), "float32", "xla", 1)
    facts = F.load_facts(tok, "forget01", eos_or_default(tok, cfg), limit=4, require_subject=True)
    fb = F.fact_batch(facts, cfg)
    tcfg = tr.TraceConfig()
    exact = tr.trace(params, cfg, fb, tcfg)
    st = sc.screen_and_trace(params, cfg, fb, tcfg, top_frac=0.05)
    print("RESULT " + json.dumps({
        "estimate": np.abs(st.estimate).mean(0).tolist(), "tie_bar": np.abs(exact.tie_bar).mean(0).tolist(),
        "screened_coord": list(sc.select_screened(st)[0]), "exact_coord": list(tr.select(exact.tie_bar)[0])}))
""")
PACKAGED_RUN = EarlyProcess(__name__, "packaged", lambda _: [sys.executable, "-c", PACKAGED], env=optimized_env({
    **os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}))


@pytest.fixture(scope="module")
def packaged():
    return PACKAGED_RUN.json_result()


@pytest.mark.slow
def test_packaged_model_rank_correlation_and_selection(packaged):
    est, exact = np.asarray(packaged["estimate"]), np.asarray(packaged["tie_bar"])
    assert est.shape == exact.shape == (3, 6, tr.TraceConfig().steps)  # every cell of the model ranked
    rho = spearmanr(est.ravel(), exact.ravel()).correlation
    assert rho >= 0.9, rho
    assert packaged["screened_coord"] == packaged["exact_coord"]
