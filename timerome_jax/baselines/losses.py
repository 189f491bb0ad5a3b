"""Unlearning losses on the masked-diffusion objective (no autoregressive shift).

Every likelihood term here is the MDLM training loss of the answer given the prompt, with the
model's own t-sampling, as in LLaDA's SFT recipe and `diffusion/likelihood.py` ("dream" estimator):
per example t ~ U(0, 1), p = (1 - eps) t + eps, each ANSWER token is replaced by [MASK] with
probability p (the prompt is never masked), and

    nll_sum = sum_{masked answer tokens} CE(token) / p        (an unbiased estimate of -ELBO, nats)
    n       = answer length (LLaDA SFT divides by it: the per-token NLL nll_sum / n)

logits[:, i] predict token i (`model.forward` aligns every family), so there is no shift anywhere.
open-unlearning's losses use the shifted causal-LM NLL instead, which is not the MDLM objective.

The losses are pure functions of these per-example terms (or of logits / activations), so each can
be checked against a NumPy hand computation (tests/test_baselines_losses.py):

    ga_loss       -mean(nll_sum / n)                              gradient ascent (Jang et al. 2023;
                                                                  open-unlearning trainer GradAscent)
    gd_loss       ga_loss + w_r * mean(nll_sum_r / n_r)           gradient difference (open-unlearning
                                                                  GradDiff: gamma 1, alpha 1, NLL retain)
    npo_loss      -(2/beta) mean logsigmoid(beta (nll_sum - nll_sum_ref))
                                                                  NPO (Zhang et al., arXiv:2404.05868;
                                                                  open-unlearning NPO.yaml: beta 0.1)
    simnpo_loss   -(2/beta) mean logsigmoid(beta (nll_sum / n - delta))
                                                                  SimNPO (Fan et al., arXiv:2410.07163;
                                                                  open-unlearning SimNPO.yaml: beta 4.5,
                                                                  delta 0, gamma 0.125)
    rmu_loss      mean_tokens mean_d (h_f - c u)^2 + alpha mean_tokens mean_d (h_r - h_r^frozen)^2,
                  c = beta ||h_f^frozen|| (per token)             Adaptive-RMU (Dang et al., AAAI 2025,
                                                                  arXiv:2408.06223; RMU: Li et al.,
                                                                  arXiv:2403.03218, steering coeff 6.5,
                                                                  alpha 1200, layer 7, layers 5-7 MLP)
    mdu_loss      mean over masked answer positions of KL(q_tau || p_theta),
                  q_tau = softmax(anchor_logits / tau), the anchor being the FROZEN model's
                  prediction with the whole prompt replaced by [MASK] (a "null prompt")
                                                                  MDU (Lee et al., arXiv:2605.18253)

MDU's "forward KL from the prompt-conditional prediction to the tempered anchor" is read as the
mass-covering KL(anchor || model) (the argument order of distillation's forward KL): minimising it
pulls the prompt-conditioned prediction towards what the model predicts with no prompt at all.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from timerome_jax.diffusion.likelihood import token_logprob

DEFAULT_EPS = 1e-3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QA:
    """A batch of prompt + answer rows. tokens [B,T] int32; answer_mask [B,T] bool (the positions
    masked and scored); pad_mask [B,T] bool (True = real token)."""

    tokens: jax.Array
    answer_mask: jax.Array
    pad_mask: jax.Array


def diffusion_mask(key, answer_mask, eps: float = DEFAULT_EPS):
    """One draw of the MDLM forward process on the answer: masked [B,T] bool, p [B] float32.

    t ~ U(0,1) per row, p = (1 - eps) t + eps, each answer token masked i.i.d. with probability p;
    prompt and padding are never masked."""
    kt, ku = jax.random.split(key)
    B, T = answer_mask.shape
    t = jax.random.uniform(kt, (B,), jnp.float32)
    p = (1.0 - eps) * t + eps
    u = jax.random.uniform(ku, (B, T), jnp.float32)
    return answer_mask & (u < p[:, None]), p


def noisy_tokens(tokens, masked, mask_token_id: int):
    """tokens [B,T] with the masked positions replaced by [MASK]."""
    return jnp.where(masked, mask_token_id, tokens)


def nll_terms(logits, tokens, masked, p, answer_mask):
    """Per-example masked-diffusion NLL: (nll_sum [B], n [B]).

    logits [B,T,V]; tokens [B,T]; masked [B,T] bool; p [B]; answer_mask [B,T] bool.
    nll_sum = sum_masked CE / p; n = number of answer tokens (>= 1)."""
    ce = -token_logprob(logits, tokens)
    nll_sum = jnp.sum(jnp.where(masked, ce, 0.0), axis=-1) / p
    n = jnp.maximum(jnp.sum(answer_mask, axis=-1), 1).astype(jnp.float32)
    return nll_sum, n


def ga_loss(nll_f, n_f):
    """Gradient ascent: minus the mean per-token forget NLL. nll_f, n_f [B]."""
    return -jnp.mean(nll_f / n_f)


def retain_nll(nll_r, n_r):
    """The retain-NLL anchor: mean per-token retain NLL (LLaDA SFT normalisation). [B] -> scalar."""
    return jnp.mean(nll_r / n_r)


def gd_loss(nll_f, n_f, nll_r, n_r, retain_weight: float = 1.0):
    """Gradient difference: GA on the forget rows + retain_weight * retain NLL."""
    return ga_loss(nll_f, n_f) + retain_weight * retain_nll(nll_r, n_r)


def npo_loss(nll_f, nll_ref, beta: float = 0.1):
    """NPO: -(2/beta) mean logsigmoid(beta (nll_f - nll_ref)), summed (not per-token) NLLs of the
    model and the frozen reference on the SAME masks. nll_f, nll_ref [B]."""
    return -jnp.mean(jax.nn.log_sigmoid(beta * (nll_f - nll_ref))) * 2.0 / beta


def simnpo_loss(nll_f, n_f, beta: float = 4.5, delta: float = 0.0):
    """SimNPO: -(2/beta) mean logsigmoid(beta (nll_f / n_f - delta)); no reference model."""
    return -jnp.mean(jax.nn.log_sigmoid(beta * (nll_f / n_f - delta))) * 2.0 / beta


def _masked_mse(a, b, mask):
    """mean over masked tokens of mean_d (a - b)^2. a, b [B,T,D]; mask [B,T] bool."""
    se = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=-1)
    m = mask.astype(jnp.float32)
    return jnp.sum(se * m) / jnp.maximum(jnp.sum(m), 1.0)


def rmu_loss(h_f, h_f_frozen, mask_f, h_r, h_r_frozen, mask_r, u, beta: float = 5.0, alpha: float = 1200.0):
    """Adaptive-RMU on one layer's activations.

    h_f, h_f_frozen [B,T,D]: the trained / frozen model's activations on the forget rows; mask_f [B,T]
    the tokens the loss covers; h_r, h_r_frozen, mask_r likewise on retain rows; u [D] a fixed random
    unit vector. Forget: MSE to c u with c = beta ||h_f_frozen|| per token (Adaptive-RMU's scaling
    of RMU's fixed steering coefficient); retain: alpha * MSE to the frozen activations.
    Returns (loss, forget_term, retain_term)."""
    c = beta * jnp.linalg.norm(h_f_frozen.astype(jnp.float32), axis=-1, keepdims=True)
    forget = _masked_mse(h_f, c * u.astype(jnp.float32), mask_f)
    retain = _masked_mse(h_r, h_r_frozen, mask_r)
    return forget + alpha * retain, forget, retain


def mdu_loss(logits, anchor_logits, masked, tau: float = 1.0):
    """MDU: mean over masked answer positions of KL(q_tau || p), q_tau = softmax(anchor / tau),
    p = softmax(logits). logits, anchor_logits [B,T,V]; masked [B,T] bool."""
    logq = jax.nn.log_softmax(jax.lax.stop_gradient(anchor_logits).astype(jnp.float32) / tau, axis=-1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)  # [B,T]
    m = masked.astype(jnp.float32)
    return jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)


def null_prompt(tokens, answer_mask, pad_mask, mask_token_id: int):
    """MDU's anchor input: every real prompt token replaced by [MASK] (the answer kept as given)."""
    return jnp.where(pad_mask & ~answer_mask, mask_token_id, tokens)
