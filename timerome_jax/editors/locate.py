"""The AR-positional edit site: the MLP layer that ROME's token-position causal trace picks.

ROME (Meng et al., 2022, §2) corrupts the subject's token embeddings with Gaussian noise
(3 x the embedding std), then restores one clean hidden state at one (token, layer) and measures
how much of the clean object probability comes back (the indirect effect); for MLP outputs at the
subject's last token the effect peaks at early-middle layers, and ROME edits there. On an MDLM we
run that protocol as an AR-style editor would port it: one forward pass (no denoising trajectory),
answer all masked, restore the clean MLP output at the last subject token, score the mean
log-probability of the original answer tokens. `ar_positional_layer` returns the layer with the
largest mean indirect effect. It is the "AR positional" arm of the Fig. 5 ablation and the default
layer of ROME/MEMIT/AlphaEdit here.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from timerome_jax.backbone import model as M
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene, Patch
from timerome_jax.diffusion.likelihood import make_qa_batch, token_logprob

MLP = 2


@functools.partial(jax.jit, static_argnames=("cfg",))
def _effects(params, tokens, answer, pad, subj, key_pos, key, sigma, cfg: ModelConfig):
    x = jnp.where(answer, cfg.mask_token_id, tokens)
    B, T = x.shape
    L = M.n_layers(params)
    w = answer.astype(jnp.float32)

    def score(logits):
        return jnp.sum(token_logprob(logits, tokens) * w, -1) / jnp.sum(w, -1)

    clean = M.run(params, x, cfg, pad, Intervene(read_pos=key_pos[:, None]))
    std = jnp.std(params["embed"].astype(jnp.float32))
    noise = sigma * std * jax.random.normal(key, (B, T, params["embed"].shape[1])) * subj[..., None]
    corrupt = score(M.forward(params, x, cfg, pad, Intervene(noise=noise)))

    def restored(l):
        patch = Patch(l, jnp.int32(0), jnp.int32(MLP), key_pos[:, None], jnp.ones((B, 1), bool),
                      clean.acts["mlp"][l])
        return score(M.forward(params, x, cfg, pad, Intervene(noise=noise, patch=patch)))

    per_layer = jax.lax.map(restored, jnp.arange(L, dtype=jnp.int32))  # [L,B]
    return score(clean.logits), corrupt, per_layer


def positional_trace(params, cfg: ModelConfig, facts: Sequence, n_noise: int = 4, sigma: float = 3.0,
                     seed: int = 0) -> np.ndarray:
    """Indirect effect [L] (mean over facts and noise draws) of restoring the clean MLP output at the
    last subject token, one forward with the answer all masked. `facts`: `method.facts.Fact`s."""
    facts = [f for f in facts if f.key_source == "subject"] or list(facts)
    tokens, answer, pad = make_qa_batch([list(f.prompt_ids) for f in facts], [list(f.object_ids) for f in facts], cfg)
    T = tokens.shape[1]
    subj = np.zeros((len(facts), T), np.float32)
    for i, f in enumerate(facts):
        subj[i, list(f.key_pos)] = 1.0
    key_pos = jnp.asarray([max(f.key_pos) for f in facts], jnp.int32)
    effects = []
    for j in range(n_noise):
        _, corrupt, per = _effects(params, tokens, answer, pad, jnp.asarray(subj), key_pos,
                                   jax.random.PRNGKey(seed + j), jnp.float32(sigma), cfg)
        effects.append(np.asarray(per) - np.asarray(corrupt)[None])
    return np.mean(np.stack(effects), axis=(0, 2))


def ar_positional_layer(params, cfg: ModelConfig, facts: Sequence, **kw) -> int:
    """argmax over layers of `positional_trace` (ROME's MLP site for these facts)."""
    return int(np.argmax(positional_trace(params, cfg, facts, **kw)))
