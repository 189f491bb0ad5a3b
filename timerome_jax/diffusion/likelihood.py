"""Monte-Carlo ELBO estimates of log p(answer | prompt) for masked diffusion LMs.

An MDLM has no exact log-likelihood; the standard surrogate is the ELBO: mask part of the answer,
score the masked tokens with the model, and reweight by the inverse masking rate. Two estimators:

- "llada" (ML-GSAI/LLaDA `get_log_likelihood` / `eval_llada.py`): stratified over the NUMBER of
  masked answer tokens. With answer length L and n samples, k ~ U{1..L} and
  l_j = round(linspace(k, k + (n-1) L / n, n))_j folded into 1..L; sample j masks exactly l_j answer
  positions uniformly at random (the prompt never), and its loss is sum_masked CE / (l_j / L).
  LLaDA stratifies within each GPU batch of `batch_size` samples; here the stratification runs over
  all n_mc samples (LLaDA with batch_size = mc_num), so the result does not depend on `mc_batch`.
- "dream" (DreamLM/Dream `eval/eval.py` `_eval_target_nll_mc`): stratified timesteps
  t_j = (u0 + j / n) mod 1, p_j = (1 - eps) t_j + eps, i.i.d. Bernoulli(p_j) masking of answer
  positions, loss = sum_masked CE / p_j. Dream's eval appends an EOS to the target and never masks
  the last position; here `answer_mask` alone decides what is scored (to replicate Dream, append the
  EOS to `tokens` and leave it out of `answer_mask`).

Both return -mean_j loss_j. Masks of example i depend only on (key, example_ids[i], j, answer length),
via `jax.random.fold_in`, so two models (or no-edit vs edited) are scored on exactly the same masks,
and reordering, re-batching or re-padding examples does not change a score.

Logits come from `model.forward`, which is aligned so [:, i] predicts token i for every family.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from timerome_jax.backbone import model
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene

ESTIMATORS = ("auto", "llada", "dream")


def is_traced(*xs) -> bool:
    """True when any of `xs` is a JAX tracer (inside jit/vmap: value checks must be skipped)."""
    return any(isinstance(a, jax.core.Tracer) for a in xs)


def as_key(key):
    """An int is taken as a seed; anything else is already a PRNG key."""
    if isinstance(key, (int, np.integer)):
        return jax.random.PRNGKey(int(key))
    return key


def resolve_estimator(cfg: ModelConfig, estimator: str) -> str:
    """"auto" -> "dream" for logit-shifted families (Dream, DiffuLLaMA), else "llada"."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "auto":
        return "dream" if cfg.logits_shift else "llada"
    return estimator


# -------------------------------------------------------------------------------------- batches


def make_qa_batch(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], cfg: ModelConfig,
                  max_len: Optional[int] = None):
    """Concatenate prompt + answer per row and RIGHT-pad with `cfg.pad_token_id`.

    max_len: fixed total length T (default: the longest prompt + answer).
    Returns tokens [B,T] int32, answer_mask [B,T] bool (the answer positions), pad_mask [B,T] bool
    (False on padding).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"make_qa_batch: {len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("make_qa_batch needs at least one example")
    prompts = [list(map(int, p)) for p in prompts]
    answers = [list(map(int, a)) for a in answers]
    limit = cfg.max_seq_len if max_len is None else min(max_len, cfg.max_seq_len)
    for r, (p, a) in enumerate(zip(prompts, answers)):
        if not a:
            raise ValueError(f"make_qa_batch row {r}: the answer is empty")
        if len(p) + len(a) > limit:
            which = "cfg.max_seq_len" if max_len is None or cfg.max_seq_len < max_len else "max_len"
            raise ValueError(f"make_qa_batch row {r}: {len(p)} prompt + {len(a)} answer tokens = "
                             f"{len(p) + len(a)} exceeds {which}={limit}")
        for name, seq in (("prompt", p), ("answer", a)):
            bad = [i for i, t in enumerate(seq) if not 0 <= t < cfg.vocab_size]
            if bad:
                raise ValueError(f"make_qa_batch row {r}: {name} token {seq[bad[0]]} at index {bad[0]} is "
                                 f"outside the vocabulary [0, {cfg.vocab_size})")
        if cfg.logits_shift and not p:
            raise ValueError(f"make_qa_batch row {r}: empty prompt, but family {cfg.family!r} shifts logits "
                             "(position i-1 predicts token i), so the first answer token has no predictor")
    T = max(len(p) + len(a) for p, a in zip(prompts, answers)) if max_len is None else max_len
    B = len(prompts)
    tokens = np.full((B, T), cfg.pad_token_id, np.int32)
    answer_mask = np.zeros((B, T), bool)
    pad_mask = np.zeros((B, T), bool)
    for r, (p, a) in enumerate(zip(prompts, answers)):
        n = len(p) + len(a)
        tokens[r, :n] = p + a
        answer_mask[r, len(p):n] = True
        pad_mask[r, :n] = True
    return jnp.asarray(tokens), jnp.asarray(answer_mask), jnp.asarray(pad_mask)


# ---------------------------------------------------------------------------------------- masks


def _round_half_even_div(num, den):
    """round(num / den) with ties to even, in exact integer arithmetic (torch.round semantics)."""
    q, r = num // den, num % den
    return q + (2 * r > den) + ((2 * r == den) & (q % 2 == 1))


_RANK_BLOCK = 128


def _row_masks(key, ex_id, amask, js, n_mc: int, estimator: str, eps: float):
    """Masks [m,T] bool and weights [m] float32 of samples js [m] for one example (answer mask [T])."""
    T = amask.shape[0]
    L = jnp.sum(amask, dtype=jnp.int32)
    Lc = jnp.maximum(L, 1)
    rank = jnp.clip(jnp.cumsum(amask, dtype=jnp.int32) - 1, 0, T - 1)  # answer rank of each position
    k_ex = jax.random.fold_in(key, ex_id)
    k_strat, k_samp = jax.random.split(k_ex)
    r_idx = jnp.arange(T, dtype=jnp.int32)

    n_blk = -(-T // _RANK_BLOCK)

    def one(j):
        kj = jax.random.fold_in(k_samp, j)
        # uniforms indexed by ANSWER RANK (not by absolute position), drawn in fixed-size blocks keyed
        # by fold_in(kj, block): the value for rank r never depends on T, so the mask of an example
        # does not depend on its prompt length, its padding or the batch's T. (Blocks rather than one
        # fold_in per rank: a vmapped per-rank fold_in takes seconds to compile on CPU.)
        u_rank = jax.vmap(lambda b: jax.random.uniform(jax.random.fold_in(kj, b), (_RANK_BLOCK,), jnp.float32))(
            jnp.arange(n_blk, dtype=jnp.int32)).reshape(-1)
        u = u_rank[rank]
        if estimator == "llada":
            kk = jnp.clip(1 + jnp.floor(jax.random.uniform(k_strat, (), jnp.float32) * Lc).astype(jnp.int32), 1, Lc)
            # l_j = round(k + j L / n) exactly (LLaDA's round(linspace(k, k + (n-1) L/n, n))), folded
            l = _round_half_even_div(kk * n_mc + j * Lc, n_mc)
            l = (l - 1) % Lc + 1
            key_sort = jnp.where(amask, u, jnp.inf)
            order = jnp.argsort(key_sort, stable=True)
            urank = jnp.zeros((T,), jnp.int32).at[order].set(r_idx)
            masked = amask & (urank < l)
            w = Lc.astype(jnp.float32) / l.astype(jnp.float32)
        else:
            u0 = jax.random.uniform(k_strat, (), jnp.float32)
            t = jnp.mod(u0 + j.astype(jnp.float32) / n_mc, 1.0)
            p = (1.0 - eps) * t + eps
            masked = amask & (u < p)
            w = 1.0 / p
        return masked, w

    return jax.vmap(one)(js)


def mc_masks(key, example_ids, answer_mask, n_mc: int, estimator: str, eps: float = 1e-3, js=None):
    """The ELBO's Monte-Carlo masks: masks [m,B,T] bool and weights [m,B] float32.

    key: PRNG key; example_ids [B] int32; answer_mask [B,T] bool; js [m] int32 sample indices
    (default all n_mc). estimator "llada" or "dream" (see module docstring). Sample j of example i
    depends only on (key, example_ids[i], j, answer length); weights are L / l_j or 1 / p_j.
    """
    if estimator not in ("llada", "dream"):
        raise ValueError(f"mc_masks: estimator must be 'llada' or 'dream', got {estimator!r}")
    js = jnp.arange(n_mc, dtype=jnp.int32) if js is None else jnp.asarray(js, jnp.int32)
    f = jax.vmap(lambda e, a: _row_masks(key, e, a, js, n_mc, estimator, eps))
    masks, w = f(jnp.asarray(example_ids, jnp.int32), jnp.asarray(answer_mask, bool))  # [B,m,T], [B,m]
    return jnp.swapaxes(masks, 0, 1), jnp.swapaxes(w, 0, 1)


# ----------------------------------------------------------------------------------------- ELBO


def token_logprob(logits, tokens):
    """log p(tokens) [..., T] float32 under logits [..., T, V] (the log-softmax at one token, without
    materialising the whole [..., T, V] log-softmax)."""
    lg = logits.astype(jnp.float32)
    return jnp.take_along_axis(lg, tokens[..., None], -1)[..., 0] - jax.nn.logsumexp(lg, axis=-1)


def tile_intervene(iv: Optional[Intervene], B: int, m: int) -> Optional[Intervene]:
    """Repeat the batch-shaped fields of an `Intervene` (noise, read_pos, patch pos/valid/value with
    leading dim B) m times along the batch, matching a batch laid out as row j * B + b. Leading-dim-1
    fields (broadcast) and the edit memory (not batch-shaped) are kept as they are, except a gated
    memory's primed sequence latch [B,T] (`EditMemory.tile_latch`)."""
    if iv is None or m == 1:
        return iv

    def tile(a):
        if a is None or a.ndim == 0 or a.shape[0] != B:
            return a
        return jnp.tile(a, (m,) + (1,) * (a.ndim - 1))

    patch = iv.patch
    if patch is not None:
        patch = dataclasses.replace(patch, pos=tile(patch.pos), valid=tile(patch.valid), value=tile(patch.value))
    edit = iv.edit
    if edit is not None and hasattr(edit, "tile_latch"):  # a primed sequence latch is batch-shaped
        edit = edit.tile_latch(m)
    return dataclasses.replace(iv, noise=tile(iv.noise), read_pos=tile(iv.read_pos), patch=patch, edit=edit)


def _elbo_impl(params, tokens, answer_mask, pad_mask, key, example_ids, intervene, cfg, n_mc, estimator,
               mc_batch, eps):
    B, T = tokens.shape
    m = mc_batch
    # the samples go into the batch axis (row j * B + b), not through vmap: the cuDNN attention
    # batching rule does not batch its padding mask, so a vmapped forward is not safe there
    # a gated memory's sequence latch: decided from the prompt with the whole answer masked (as
    # generation starts), the same for every MC sample of a row
    intervene = model.prime_edit(params, tokens, cfg, pad_mask, answer_mask, intervene)
    pad_m, iv_m = jnp.tile(pad_mask, (m, 1)), tile_intervene(intervene, B, m)  # loop-invariant

    def chunk(acc, c):
        js = c * mc_batch + jnp.arange(mc_batch, dtype=jnp.int32)
        masks, w = mc_masks(key, example_ids, answer_mask, n_mc, estimator, eps, js)  # [m,B,T], [m,B]
        noisy = jnp.where(masks, cfg.mask_token_id, tokens[None])
        logits = model.forward(params, noisy.reshape(m * B, T), cfg, pad_m, iv_m).reshape(m, B, T, -1)
        ce = -token_logprob(logits, jnp.broadcast_to(tokens, noisy.shape))
        loss = jnp.sum(jnp.where(masks, ce, 0.0), axis=-1) * w  # [m,B]
        return acc + jnp.sum(loss, axis=0), None

    acc, _ = jax.lax.scan(chunk, jnp.zeros((B,), jnp.float32), jnp.arange(n_mc // mc_batch, dtype=jnp.int32))
    return -acc / n_mc


_elbo_jit = jax.jit(_elbo_impl, static_argnames=("cfg", "n_mc", "estimator", "mc_batch", "eps"))


def _check_qa(cfg, tokens, answer_mask, pad_mask, fn):
    if tokens.ndim != 2 or answer_mask.shape != tokens.shape or pad_mask.shape != tokens.shape:
        raise ValueError(f"{fn}: tokens, answer_mask and pad_mask must all be [B,T]; got {tokens.shape}, "
                         f"{answer_mask.shape}, {pad_mask.shape}")
    if is_traced(tokens, answer_mask, pad_mask):
        return
    am, pm = np.asarray(answer_mask), np.asarray(pad_mask)
    empty = np.where(am.sum(1) == 0)[0]
    if len(empty):
        raise ValueError(f"{fn}: row {empty[0]} has no answer tokens (answer_mask all False)")
    outside = np.where((am & ~pm).any(1))[0]
    if len(outside):
        raise ValueError(f"{fn}: row {outside[0]} marks padding (pad_mask False) as answer")
    if cfg.logits_shift:
        first = np.argmax(pm, axis=1)
        bad = np.where(am[np.arange(len(am)), first])[0]
        if len(bad):
            raise ValueError(f"{fn}: row {bad[0]} starts with an answer token, but family {cfg.family!r} "
                             "shifts logits (position i-1 predicts token i), so it has no predictor")


def elbo(params, cfg: ModelConfig, tokens, answer_mask, pad_mask, key, n_mc: int = 16, example_ids=None,
         intervene: Optional[Intervene] = None, estimator: str = "auto", mc_batch: Optional[int] = None,
         eps: float = 1e-3):
    """Monte-Carlo ELBO estimate of log p(answer | prompt), per example.

    tokens [B,T] int32 (prompt + answer, e.g. from `make_qa_batch`); answer_mask [B,T] bool (the
    positions scored and masked; the prompt is never masked); pad_mask [B,T] bool (True = real token);
    key: PRNG key; n_mc: samples per example (static); example_ids [B] int32 (None: 0..B-1, i.e. the
    score then depends on the row index); intervene: passed to every forward; estimator: "auto",
    "llada" or "dream" (module docstring); mc_batch: samples per forward chunk (static; must divide
    n_mc; None = n_mc), the forward batch is mc_batch * B; eps: Dream's minimum masking rate.
    Returns [B] float32 (nats; higher = more likely).
    """
    est = resolve_estimator(cfg, estimator)
    if not isinstance(n_mc, (int, np.integer)) or isinstance(n_mc, bool) or n_mc < 1:
        raise ValueError(f"elbo: n_mc must be an int >= 1, got {n_mc!r}")
    mb = int(n_mc) if mc_batch is None else mc_batch
    if not isinstance(mb, (int, np.integer)) or isinstance(mb, bool) or mb < 1 or n_mc % mb:
        raise ValueError(f"elbo: mc_batch must be an int >= 1 that divides n_mc={n_mc}, got {mc_batch!r}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"elbo: eps must be in (0, 1), got {eps!r}")
    tokens = jnp.asarray(tokens, jnp.int32)
    answer_mask = jnp.asarray(answer_mask, bool)
    pad_mask = jnp.asarray(pad_mask, bool)
    _check_qa(cfg, tokens, answer_mask, pad_mask, "elbo")
    B = tokens.shape[0]
    example_ids = jnp.arange(B, dtype=jnp.int32) if example_ids is None else jnp.asarray(example_ids, jnp.int32)
    if example_ids.shape != (B,):
        raise ValueError(f"elbo: example_ids must have shape ({B},), got {example_ids.shape}")
    key = as_key(key)
    return _elbo_jit(params, tokens, answer_mask, pad_mask, key, example_ids, intervene, cfg=cfg, n_mc=int(n_mc),
                     estimator=est, mc_batch=int(mb), eps=float(eps))


def _all_masked_impl(params, tokens, answer_mask, pad_mask, intervene, cfg):
    intervene = model.prime_edit(params, tokens, cfg, pad_mask, answer_mask, intervene)
    noisy = jnp.where(answer_mask, cfg.mask_token_id, tokens)
    ce = -token_logprob(model.forward(params, noisy, cfg, pad_mask, intervene), tokens)
    return -jnp.sum(jnp.where(answer_mask, ce, 0.0), axis=-1)


_all_masked_jit = jax.jit(_all_masked_impl, static_argnames=("cfg",))


def answer_logprob_all_masked(params, cfg: ModelConfig, tokens, answer_mask, pad_mask,
                              intervene: Optional[Intervene] = None):
    """Deterministic proxy: mask every answer token once, return sum_answer log p(token) [B] float32.

    One forward, no randomness (the t = 1 term of the ELBO with weight 1): cheap, but it scores each
    answer token without seeing any other answer token.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    answer_mask = jnp.asarray(answer_mask, bool)
    pad_mask = jnp.asarray(pad_mask, bool)
    _check_qa(cfg, tokens, answer_mask, pad_mask, "answer_logprob_all_masked")
    return _all_masked_jit(params, tokens, answer_mask, pad_mask, intervene, cfg=cfg)
