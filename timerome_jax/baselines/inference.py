"""Inference-time baselines: edits applied at every forward, as `Intervene(edit=...)` data.

Each edit is a pytree with `.delta(h) -> [B,T,D]`, a `.step` array (-1 = every denoising step) and
static `.layer` / `.module` (0 = resid), like the TimeROME edit memory, so `model.run` applies it
at one coordinate and no weight changes. The paper's Table I lists them as (ii) random_layer
(sanity), (iii) act_steer / RepE, and rmu_like:

- act_steer (RepE, Zou et al. 2023; CAA, Panickssery et al., arXiv:2312.06681): the difference of
  means v = mean h_l(forget) - mean h_l(retain) of the residual at layer l over the real tokens of
  the rows (prompt + fully masked answer: the state generation starts from), and
  delta(h) = -alpha v on every token. Unconditional: it moves retain tokens too.
- rmu_like: RMU's target (Li et al., arXiv:2403.03218: push forget activations to c u, u a fixed
  random unit vector) applied at inference instead of trained in: delta(h) = g(h) c ||h|| u with
  a gate g(h) = sigmoid((cos(h - m_r, v) - tau) / temp), m_r the retain mean, tau the midpoint of
  the forget and retain tokens' mean cosines on the calibration rows.
- random_layer: the TimeROME edit memory (Eq. 12, built by `pipeline.install` from the same facts
  and alpha, q) at a uniformly random layer (resid) instead of the traced one: a sanity check
  that the trace matters. It is registered in `baselines/registry.py`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from timerome_jax.backbone import model
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.baselines.train import encode_rows


class EveryStepResid:
    """Where both baselines here act: resid of `.layer` (static), at every denoising step. Their
    directions are read from the residual stream on the state generation starts from, so neither
    the module nor the step is a free choice: they are constants, not pytree fields."""

    module = 0

    @property
    def step(self) -> jax.Array:
        return jnp.int32(-1)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["v", "alpha"], meta_fields=["layer"])
@dataclasses.dataclass(frozen=True)
class SteerEdit(EveryStepResid):
    """delta(h) = -alpha v on every token. v [D] f32; alpha scalar; layer static."""

    v: jax.Array
    alpha: jax.Array
    layer: int

    def delta(self, h):
        return jnp.broadcast_to(-self.alpha * self.v, h.shape).astype(h.dtype)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["u", "v", "m_r", "coeff", "tau", "temp"], meta_fields=["layer"])
@dataclasses.dataclass(frozen=True)
class RMULikeEdit(EveryStepResid):
    """delta(h) = sigmoid((cos(h - m_r, v) - tau) / temp) * coeff * ||h|| * u.
    u, v (unit), m_r [D] f32; coeff, tau, temp scalars; layer static."""

    u: jax.Array
    v: jax.Array
    m_r: jax.Array
    coeff: jax.Array
    tau: jax.Array
    temp: jax.Array
    layer: int

    def gate(self, h):
        """g(h) [..., 1] in (0, 1)."""
        x = h.astype(jnp.float32) - self.m_r
        cos = x @ self.v / jnp.maximum(jnp.linalg.norm(x, axis=-1), 1e-6)
        return jax.nn.sigmoid((cos - self.tau) / self.temp)[..., None]

    def delta(self, h):
        hn = jnp.linalg.norm(h.astype(jnp.float32), axis=-1, keepdims=True)
        return (self.gate(h) * self.coeff * hn * self.u).astype(h.dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _resid(params, tokens, pad_mask, cfg: ModelConfig, layer: int):
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return model.run(params, tokens, cfg, pad_mask, Intervene(read_pos=pos), stop_layer=layer).acts["resid"][layer]


def row_activations(params, cfg: ModelConfig, tokenizer, rows: Sequence[dict], layer: int, batch: int = 16):
    """Residual h_l [N_tokens, D] float32 of the real tokens of `rows` with every answer token masked."""
    out = []
    for i in range(0, len(rows), batch):
        qa = encode_rows(rows[i:i + batch], tokenizer, cfg)
        x = jnp.where(qa.answer_mask, cfg.mask_token_id, qa.tokens)
        h = np.asarray(_resid(params, x, qa.pad_mask, cfg, layer), np.float32)
        out.append(h[np.asarray(qa.pad_mask)])
    return np.concatenate(out)


def _check_layer(cfg: ModelConfig, layer):
    layer = cfg.n_layers // 2 if layer is None else int(layer)
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} out of range for a {cfg.n_layers}-layer model")
    return layer


def act_steer(params, cfg: ModelConfig, tokenizer, forget_rows, retain_rows, layer=None, alpha: float = 1.0):
    """(SteerEdit, info): difference-of-means steering at resid of `layer` (None = n_layers // 2)."""
    layer = _check_layer(cfg, layer)
    hf = row_activations(params, cfg, tokenizer, forget_rows, layer)
    hr = row_activations(params, cfg, tokenizer, retain_rows, layer)
    v = hf.mean(0) - hr.mean(0)
    edit = SteerEdit(jnp.asarray(v, jnp.float32), jnp.float32(alpha), layer)
    return edit, {"layer": layer, "alpha": alpha, "v_norm": float(np.linalg.norm(v)),
                  "mean_h_norm": float(np.linalg.norm(hf, axis=-1).mean())}


def rmu_like(params, cfg: ModelConfig, tokenizer, forget_rows, retain_rows, layer=None, coeff: float = 1.0,
             temp: float = 0.05, seed: int = 0):
    """(RMULikeEdit, info): gated random-direction push at resid of `layer` (None = n_layers // 2);
    u ~ U[0,1)^D normalised from `seed` (RMU's draw)."""
    layer = _check_layer(cfg, layer)
    hf = row_activations(params, cfg, tokenizer, forget_rows, layer)
    hr = row_activations(params, cfg, tokenizer, retain_rows, layer)
    m_r = hr.mean(0)
    v = hf.mean(0) - m_r
    v = v / max(float(np.linalg.norm(v)), 1e-12)

    def cos(h):
        x = h - m_r
        return (x @ v) / np.maximum(np.linalg.norm(x, axis=-1), 1e-6)

    cf, cr = float(cos(hf).mean()), float(cos(hr).mean())
    tau = 0.5 * (cf + cr)
    u = np.asarray(jax.random.uniform(jax.random.PRNGKey(seed), (cfg.d_model,), jnp.float32))
    u = u / np.linalg.norm(u)
    edit = RMULikeEdit(jnp.asarray(u), jnp.asarray(v, jnp.float32), jnp.asarray(m_r, jnp.float32), jnp.float32(coeff),
                       jnp.float32(tau), jnp.float32(temp), layer)
    return edit, {"layer": layer, "coeff": coeff, "tau": tau, "temp": temp, "forget_cos": cf, "retain_cos": cr}
