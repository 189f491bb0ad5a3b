"""TOFU metrics and statistics against hand computations."""
import math

import numpy as np
import pytest
from scipy import stats

from timerome_jax.tofu import metrics as M


def test_norm_prob_and_prob():
    ll = [math.log(0.5) * 4, math.log(0.25) * 2]  # P̄ = 0.5 over 4 tokens, 0.25 over 2
    np.testing.assert_allclose(M.norm_prob(ll, [4, 2]), [0.5, 0.25])
    assert M.prob(ll, [4, 2]) == pytest.approx(0.375)
    np.testing.assert_allclose(M.avg_ll([-6.0], [3]), [-2.0])
    with pytest.raises(ValueError, match="n_tokens"):
        M.prob([-1.0], [0])
    with pytest.raises(ValueError, match="non-finite"):
        M.prob([float("nan")], [1])


def test_normalised_prob_by_hand():
    # P̄(a) = 0.6, perturbed 0.1, 0.2, 0.1 -> 0.6 / 1.0
    t = np.log([0.6, 0.3])
    p = np.log([[0.1, 0.2, 0.1], [0.3, 0.3, 0.3]])
    np.testing.assert_allclose(M.normalised_prob(t, p), [0.6, 0.25])
    with pytest.raises(ValueError, match="2-D"):
        M.normalised_prob(t, [0.1, 0.2])


def test_truth_ratio_by_hand():
    # paraphrase P̄ = 0.5; perturbed P̄ = 0.1 and 0.4 -> GM = 0.2 -> TR = 0.4
    tr = M.truth_ratio(np.log([0.5, 0.1]), np.log([[0.1, 0.4], [0.2, 0.2]]))
    np.testing.assert_allclose(tr, [0.4, 2.0])
    # forget: mean(min(TR, 1/TR)) = mean(0.4, 0.5); retain: mean(max(0, 1 - TR)) = mean(0.6, 0)
    assert M.tr_forget_score(tr) == pytest.approx(0.45)
    assert M.tr_retain_score(tr) == pytest.approx(0.3)
    # equals TOFU's exp(L̄_para − mean L̄_pert) with L̄ = −avg_ll
    Lpara, Lpert = -np.log(0.5), -np.log([0.1, 0.4])
    assert tr[0] == pytest.approx(math.exp(Lpara - Lpert.mean()))


def test_forget_quality_is_ks_pvalue():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=40), rng.lognormal(0.5, size=40)
    assert M.forget_quality(a, b) == stats.ks_2samp(a, b).pvalue
    assert M.forget_quality(a, a) == pytest.approx(1.0)
    # invariant to TR -> 1/TR (legacy TOFU stored 1/TR)
    assert M.forget_quality(1 / a, 1 / b) == pytest.approx(M.forget_quality(a, b))


def test_rouge_l_recall_by_hand():
    # LCS("the cat sat on the mat", "the cat is on a mat") = the cat on mat = 4 of 6 reference words
    r = M.rouge_l_recall(["the cat sat on the mat", "A B"], ["the cat is on a mat", "a b c d"])
    np.testing.assert_allclose(r, [4 / 6, 1.0])
    # stemming: "running" ~ "runs"
    assert M.rouge_l_recall(["he runs"], ["he running"])[0] == 1.0
    with pytest.raises(ValueError, match="2 references but 1"):
        M.rouge_l_recall(["a", "b"], ["a"])


def test_model_utility():
    vals = dict(zip(M.MU_KEYS, [0.5, 0.25, 1.0, 0.5, 0.5, 0.5, 0.25, 1.0, 1.0]))
    hm = 9 / (2 + 4 + 1 + 2 + 2 + 2 + 4 + 1 + 1)
    assert M.model_utility(vals) == pytest.approx(hm)
    assert M.model_utility(list(vals.values())) == pytest.approx(hm)
    assert M.model_utility({**vals, "wf_rouge": 0.0}) == 0.0
    with pytest.raises(ValueError, match="missing"):
        M.model_utility({"retain_prob": 1.0})
    with pytest.raises(ValueError, match="ra_tr"):
        M.model_utility({**vals, "ra_tr": -0.1})


def test_bootstrap_ci_by_hand():
    x = np.array([1.0, 2.0, 3.0, 10.0])
    lo, hi = M.bootstrap_ci(x, n_resamples=500, seed=3)
    rng = np.random.default_rng(3)
    means = rng.choice(x, size=(500, 4), replace=True).mean(axis=1)
    assert (lo, hi) == (np.percentile(means, 2.5), np.percentile(means, 97.5))
    assert x.min() <= lo < x.mean() < hi <= x.max()
    assert M.bootstrap_ci([2.0]) == (2.0, 2.0)
    assert M.bootstrap_ci(x, seed=1) == M.bootstrap_ci(x, seed=1)
    lo95, hi95 = M.bootstrap_ci(x, seed=7)
    lo90, hi90 = M.bootstrap_ci(x, level=0.9, seed=7)  # same resamples, narrower percentiles
    assert lo95 <= lo90 < hi90 <= hi95 and (lo95, hi95) != (lo90, hi90)
    with pytest.raises(ValueError, match="empty"):
        M.bootstrap_ci([])


def test_paired_t_by_hand_and_vs_scipy():
    a, b = [3.0, 5.0, 4.0], [1.0, 2.0, 3.0]  # d = 2, 3, 1: mean 2, sd 1 -> t = 2*sqrt(3)
    t, p = M.paired_t(a, b)
    assert t == pytest.approx(2 * math.sqrt(3))
    assert p == pytest.approx(2 * stats.t.sf(2 * math.sqrt(3), 2))
    rng = np.random.default_rng(1)
    for n in (2, 5, 17):
        a, b = rng.normal(size=n), rng.normal(size=n)
        ref = stats.ttest_rel(a, b)
        np.testing.assert_allclose(M.paired_t(a, b), (ref.statistic, ref.pvalue), rtol=1e-12)
    assert M.paired_t([1.0, 2.0], [0.0, 1.0]) == (math.inf, 0.0)
    assert all(math.isnan(v) for v in M.paired_t([1.0, 2.0], [1.0, 2.0]))
    assert all(math.isnan(v) for v in M.paired_t([1.0], [0.0]))
    with pytest.raises(ValueError, match="equal lengths"):
        M.paired_t([1.0, 2.0], [1.0])


def test_diff_ci_and_significance():
    a, b = np.array([3.0, 5.0, 4.0]), np.array([1.0, 2.0, 3.0])
    assert M.diff_ci(a, b) == M.bootstrap_ci(a - b)
    lo, hi = M.diff_ci(a, b)
    assert 1.0 <= lo <= 2.0 <= hi <= 3.0
    assert [M.significance(p) for p in (0.2, 0.04, 0.009, 5e-5, float("nan"))] == ["", "*", "**", "***", ""]
