"""TOFU metrics and the paper's statistics, in NumPy/SciPy (no JAX).

Conventions. A sample's answer score is a log-likelihood `ll` (for an MDLM: the ELBO of
log p(answer | prompt)) summed over the answer's `n` tokens, EOS included. Then
    avg_ll = ll / n                 (minus TOFU's per-token loss L/|a|)
    P̄      = exp(avg_ll)            (TOFU's length-normalised probability P(a|q)^(1/|a|))

Definitions follow open-unlearning (OU) as in the project notes (TOFU reference §2):
  Prob (forget/retain)         mean_i P̄(a_i)
  Prob (real authors/world)    mean_i P̄(a)/(P̄(a) + Σ_j P̄(â_j))
  Truth ratio                  TR_i = GM_j P̄(â_j) / P̄(ã) = exp(mean_j avg_ll(â_j) − avg_ll(ã))
      forget aggregate         mean_i min(TR_i, 1/TR_i)          (1 = indifferent; higher better)
      retain/ra/wf aggregate   mean_i max(0, 1 − TR_i)
  Forget quality               scipy.stats.ks_2samp(TR_unlearned, TR_retain_model).pvalue, one per
                               seed; over seeds: pooled_forget_quality (one KS test on the per-row
                               geometric mean of TR over seeds), never a mean of p-values
  ROUGE-L recall               rouge_score RougeScorer(['rougeL'], use_stemmer=True), .recall
  Model utility                scipy.stats.hmean of the nine retain/ra/wf numbers
Everything is computed in log space, so OU's "+1e-10" guards in denominators are not needed
(results differ from OU's only where a probability is below ~1e-8).

Statistics (paper §IV-A "Statistical protocol"):
  bootstrap_ci  percentile_[2.5, 97.5] of the means of 2000 resamples with replacement
  paired_t      t = mean(d) / (sd(d, ddof=1) / sqrt(n)), two-tailed Student-t p (== ttest_rel)
  diff_ci       bootstrap_ci of the paired differences a − b
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence, Union

import numpy as np
from scipy import special, stats

ArrayLike = Union[Sequence[float], np.ndarray]

# The nine Model Utility inputs (OU configs/eval/tofu_metrics/model_utility.yaml, our names).
MU_KEYS = ("retain_prob", "retain_rouge", "retain_tr",
           "ra_prob", "ra_rouge", "ra_tr",
           "wf_prob", "wf_rouge", "wf_tr")


def _arr(x, name: str, ndim=None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite values")
    return a


# ---------------------------------------------------------------------------------------------
# likelihood-based metrics
# ---------------------------------------------------------------------------------------------

def avg_ll(ll: ArrayLike, n_tokens: ArrayLike) -> np.ndarray:
    """Per-token log-likelihood ll / n (same shape as ll). n_tokens must be >= 1."""
    ll = _arr(ll, "ll")
    n = np.asarray(n_tokens, dtype=np.float64)
    if np.any(n < 1):
        raise ValueError("n_tokens must be >= 1 for every sample")
    return ll / n


def norm_prob(ll: ArrayLike, n_tokens: ArrayLike) -> np.ndarray:
    """P̄ = exp(ll / n) per sample (same shape as ll)."""
    return np.exp(avg_ll(ll, n_tokens))


def prob(ll: ArrayLike, n_tokens: ArrayLike) -> float:
    """Forget/retain Prob: mean_i P̄(a_i). ll, n_tokens: [N]."""
    return float(np.mean(norm_prob(ll, n_tokens)))


def normalised_prob(avg_ll_true: ArrayLike, avg_ll_pert: ArrayLike) -> np.ndarray:
    """Per-sample P̄(a) / (P̄(a) + Σ_j P̄(â_j)) for real authors / world facts.

    avg_ll_true [N] (log P̄ of the answer), avg_ll_pert [N, K] (of the K perturbed answers) -> [N].
    """
    t = _arr(avg_ll_true, "avg_ll_true", 1)
    p = _arr(avg_ll_pert, "avg_ll_pert", 2)
    if p.shape[0] != t.shape[0]:
        raise ValueError(f"avg_ll_pert has {p.shape[0]} rows, avg_ll_true has {t.shape[0]}")
    return np.exp(t - special.logsumexp(np.concatenate([t[:, None], p], axis=1), axis=1))


def truth_ratio(avg_ll_ref: ArrayLike, avg_ll_pert: ArrayLike) -> np.ndarray:
    """Per-sample TR_i = GM_j P̄(â_j) / P̄(ã) = exp(mean_j avg_ll_pert[i, j] − avg_ll_ref[i]).

    avg_ll_ref [N]: log P̄ of the paraphrased answer (forget/retain) or of the answer (ra/wf);
    avg_ll_pert [N, K]: log P̄ of the perturbed answers. Returns [N] (> 0).
    """
    r = _arr(avg_ll_ref, "avg_ll_ref", 1)
    p = _arr(avg_ll_pert, "avg_ll_pert", 2)
    if p.shape[0] != r.shape[0]:
        raise ValueError(f"avg_ll_pert has {p.shape[0]} rows, avg_ll_ref has {r.shape[0]}")
    return np.exp(p.mean(axis=1) - r)


def tr_forget_score(tr: ArrayLike) -> float:
    """Forget-set truth-ratio aggregate: mean_i min(TR_i, 1/TR_i)."""
    tr = _arr(tr, "tr", 1)
    if np.any(tr <= 0):
        raise ValueError("truth ratios must be > 0")
    return float(np.mean(np.minimum(tr, 1.0 / tr)))


def tr_retain_score(tr: ArrayLike) -> float:
    """Retain / real-authors / world-facts truth-ratio aggregate: mean_i max(0, 1 − TR_i)."""
    tr = _arr(tr, "tr", 1)
    return float(np.mean(np.maximum(0.0, 1.0 - tr)))


def forget_quality(tr_unlearned: ArrayLike, tr_retain_model: ArrayLike) -> float:
    """KS two-sample p-value between per-sample forget-set truth ratios of the evaluated model and
    of the retain model (any monotone transform of TR gives the same p-value)."""
    a = _arr(tr_unlearned, "tr_unlearned", 1)
    b = _arr(tr_retain_model, "tr_retain_model", 1)
    return float(stats.ks_2samp(a, b).pvalue)


POOLED_FQ_METHOD = ("ks_2samp of the per-row geometric mean of TR over seeds (this model) vs the same "
                    "for the reference; one p-value from one set of n_rows truth ratios per model")


def pooled_forget_quality(tr_by_seed: ArrayLike, tr_ref_by_seed: ArrayLike) -> float:
    """Forget Quality over several MC seeds as TOFU defines it: one KS p-value from one set of truth
    ratios per model. Each forget row's TR is the geometric mean of its per-seed TRs (seeds are
    Monte-Carlo replicates of the same ELBO-based TR), so each side keeps one TR per row and the
    p-value keeps TOFU's sample size n = rows (stacking seeds would count every row S times).

    tr_by_seed: [S, n] this model's per-sample forget TRs per seed; tr_ref_by_seed: [S', n] the
    reference's (S' may differ, e.g. 1). Returns the ks_2samp p-value."""
    a = np.asarray(tr_by_seed, np.float64)
    b = np.asarray(tr_ref_by_seed, np.float64)
    if a.ndim == 1:
        a = a[None]
    if b.ndim == 1:
        b = b[None]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.size == 0 or b.size == 0:
        raise ValueError(f"pooled_forget_quality needs [S, n] and [S', n] truth ratios, got {a.shape} and {b.shape}")
    if not (np.all(a > 0) and np.all(b > 0) and np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("pooled_forget_quality: truth ratios must be finite and > 0")
    return forget_quality(np.exp(np.log(a).mean(0)), np.exp(np.log(b).mean(0)))


@functools.lru_cache(maxsize=1)
def _scorer():
    # imported on first use: rouge_score pulls in nltk, which only ROUGE needs, so scoring,
    # tracing and the GPU benchmarks import (and run on machines without nltk) without it
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(references: Sequence[str], predictions: Sequence[str]) -> np.ndarray:
    """Per-sample ROUGE-L recall of prediction vs reference (TOFU: reference = ground truth)."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    sc = _scorer()
    return np.array([sc.score(r, p)["rougeL"].recall for r, p in zip(references, predictions)],
                    dtype=np.float64)


def model_utility(values: Union[Mapping[str, float], Sequence[float]]) -> float:
    """Harmonic mean of the nine Model Utility numbers (`MU_KEYS`, or a sequence in that order).

    Every number must be finite and >= 0. If any is 0 the result is 0 (the limit of the harmonic
    mean; scipy returns the same, we return it without a divide-by-zero warning): MU collapses
    when one of its parts does, as in TOFU.
    """
    if isinstance(values, Mapping):
        missing = [k for k in MU_KEYS if k not in values]
        if missing:
            raise ValueError(f"model_utility needs {MU_KEYS}; missing {missing}")
        items = [(k, values[k]) for k in MU_KEYS]
    else:
        vals = list(values)
        if len(vals) != len(MU_KEYS):
            raise ValueError(f"model_utility needs {len(MU_KEYS)} numbers ({MU_KEYS}), got {len(vals)}")
        items = list(zip(MU_KEYS, vals))
    for k, v in items:
        if v is None or not np.isfinite(v) or v < 0:
            raise ValueError(f"model_utility input {k}={v!r} must be finite and >= 0")
    x = np.array([v for _, v in items], dtype=np.float64)
    if np.any(x == 0):
        return 0.0
    return float(stats.hmean(x))


# ---------------------------------------------------------------------------------------------
# statistics over seeds
# ---------------------------------------------------------------------------------------------

def bootstrap_ci(x: ArrayLike, n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean: percentile_[(1−level)/2, (1+level)/2] of the means of
    `n_resamples` resamples of x (size n, with replacement), drawn by np.random.default_rng(seed).
    x: [n] with n >= 1 (n = 1 gives (x, x))."""
    x = _arr(x, "x", 1)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    means = rng.choice(x, size=(n_resamples, x.size), replace=True).mean(axis=1)
    q = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [q, 100 - q])
    return float(lo), float(hi)


def paired_t(a: ArrayLike, b: ArrayLike) -> tuple[float, float]:
    """Two-tailed paired t-test of a vs b on shared seeds: t = mean(d)/(sd(d)/sqrt(n)), d = a − b,
    ddof=1, p = 2·sf(|t|, n−1); equal to scipy.stats.ttest_rel(a, b).

    Edge cases (as scipy): n < 2 -> (nan, nan); all d equal and nonzero -> (±inf, 0.0);
    all d zero -> (nan, nan).
    """
    a, b = _arr(a, "a", 1), _arr(b, "b", 1)
    if a.shape != b.shape:
        raise ValueError(f"paired_t needs equal lengths, got {a.size} and {b.size}")
    d = a - b
    n = d.size
    if n < 2:
        return float("nan"), float("nan")
    m, sd = d.mean(), d.std(ddof=1)
    if sd == 0:
        if m == 0:
            return float("nan"), float("nan")
        return float(np.sign(m) * np.inf), 0.0
    t = m / (sd / np.sqrt(n))
    return float(t), float(2 * stats.t.sf(abs(t), n - 1))


def diff_ci(a: ArrayLike, b: ArrayLike, n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap CI (as `bootstrap_ci`) of the mean paired difference a − b on shared seeds."""
    a, b = _arr(a, "a", 1), _arr(b, "b", 1)
    if a.shape != b.shape:
        raise ValueError(f"diff_ci needs equal lengths, got {a.size} and {b.size}")
    return bootstrap_ci(a - b, n_resamples, level, seed)


def significance(p: float) -> str:
    """The paper's markers: '***' p < 1e-4, '**' p < 0.01, '*' p < 0.05, else ''."""
    if p is None or not np.isfinite(p):
        return ""
    return "***" if p < 1e-4 else "**" if p < 0.01 else "*" if p < 0.05 else ""
