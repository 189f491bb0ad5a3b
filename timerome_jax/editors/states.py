"""Partially unmasked answer states, and the target vectors (v*, z) optimised over them.

ROME (Meng et al., 2022, "Locating and Editing Factual Associations in GPT", §3.1 / kmeng01/rome
`compute_v`) and MEMIT (Meng et al., 2023, "Mass-Editing Memory in a Transformer", §4.2 /
kmeng01/memit `compute_z`) pick the vector to write by gradient descent on a delta added to one
hidden state at the subject's last token, so that the model then predicts the new object. On an AR
model that hidden state is read once, with the object to the right of it. A masked diffusion LM
instead reads the object region in many states between "all masked" and "all unmasked" along its
denoising trajectory, and attention is bidirectional, so the subject's hidden state itself changes
with the state of the answer. Park & Jo ("Knowledge Editing in Masked Diffusion Language Models")
report that ROME/MEMIT-style edits optimised for one state degrade for multi-token targets on
LLaDA/Dream, and suggest optimising over the partially unmasked states generation passes through.

So here every optimisation step draws fresh states: for each fact, a masking ratio t ~ U(t_min, 1)
and an independent Bernoulli(t) mask over the answer (target) tokens, at least one token masked;
draw 0 of every step is the all-masked start state. The loss is the mean over masked answer tokens
of -log p(target token), averaged over rows. Keys and hidden states that the closed-form solvers
need are likewise averaged over such states (`mean_over_states`), as ROME averages keys over
random context prefixes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm
import optax

from timerome_jax.backbone import model as M
from timerome_jax.backbone.config import ModelConfig, module_id
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.diffusion.likelihood import make_qa_batch, token_logprob
from timerome_jax.method.capture import FactRows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EditBatch(FactRows):
    """N facts laid out as prompt + target answer (right-padded).

    tokens [N,T] int32 (clean prompt + target tokens); answer [N,T] bool (target positions);
    pad [N,T] bool (True = real token); key_pos [N] int32 (the subject's last token: where ROME,
    MEMIT and AlphaEdit read their key and write their value); query_pos [N] int32 (the prompt's
    last token: GRACE's key).
    """

    tokens: jax.Array
    answer: jax.Array
    pad: jax.Array
    key_pos: jax.Array
    query_pos: jax.Array


def edit_batch(facts: Sequence, targets: Sequence[Sequence[int]], cfg: ModelConfig) -> EditBatch:
    """An `EditBatch` from `method.facts.Fact`s (prompt_ids, key_pos) and target token ids per fact
    (e.g. encode("I don't know.") + [eos]). Lengths are rounded up to a multiple of 8."""
    if len(facts) != len(targets):
        raise ValueError(f"edit_batch: {len(facts)} facts but {len(targets)} targets")
    if not facts:
        raise ValueError("edit_batch: no facts")
    prompts = [list(f.prompt_ids) for f in facts]
    longest = max(len(p) + len(t) for p, t in zip(prompts, targets))
    tokens, answer, pad = make_qa_batch(prompts, [list(t) for t in targets], cfg,
                                        max_len=min(cfg.max_seq_len, -(-longest // 8) * 8))
    key_pos = np.array([max(f.key_pos) for f in facts], np.int32)
    query_pos = np.array([len(p) - 1 for p in prompts], np.int32)
    return EditBatch(tokens, answer, pad, jnp.asarray(key_pos), jnp.asarray(query_pos))


def answer_states(key, batch: EditBatch, n_draws: int, mask_id: int, t_min: float = 0.1,
                  all_masked_first: bool = True):
    """Draw `n_draws` partially unmasked states per fact.

    Returns x [n_draws*N, T] int32 (rows laid out as draw j * N + fact i; masked answer tokens
    replaced by `mask_id`) and masked [n_draws*N, T] bool (the masked answer positions; at least
    one per row). With `all_masked_first`, draw 0 masks the whole answer.
    """
    N, T = batch.tokens.shape
    k_t, k_m, k_f = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (n_draws, N, 1), minval=t_min, maxval=1.0)
    if all_masked_first:
        t = t.at[0].set(1.0)
    ans = jnp.broadcast_to(batch.answer, (n_draws, N, T))
    masked = ans & (jax.random.uniform(k_m, (n_draws, N, T)) < t)
    # force one masked answer token in rows that drew none (a random answer position)
    score = jnp.where(ans, jax.random.uniform(k_f, (n_draws, N, T)), -1.0)
    forced = jax.nn.one_hot(jnp.argmax(score, -1), T, dtype=bool) & ans
    masked = jnp.where(masked.any(-1, keepdims=True), masked, forced)
    x = jnp.where(masked, mask_id, batch.tokens[None])
    return x.reshape(n_draws * N, T).astype(jnp.int32), masked.reshape(n_draws * N, T)


def masked_nll(logits, targets, masked):
    """Mean over rows of the mean -log p(target) over each row's masked positions.
    logits [B,T,V]; targets [B,T] int; masked [B,T] bool -> scalar float32."""
    lp = token_logprob(logits, targets)
    w = masked.astype(jnp.float32)
    return -jnp.mean(jnp.sum(lp * w, -1) / jnp.maximum(jnp.sum(w, -1), 1.0))


def tile_rows(a, n: int):
    """Repeat a [N, ...] array n times along axis 0 (row j * N + i), as `answer_states` lays rows out."""
    return jnp.tile(a, (n,) + (1,) * (a.ndim - 1))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["d", "pos", "step"],
                   meta_fields=["layer", "module"])
@dataclasses.dataclass(frozen=True)
class PosDelta:
    """An edit that adds d[b] to the (layer, module) output at token pos[b] of row b (every step).

    d [B,D] float32, pos [B] int32, step int32 scalar (-1 = every step); layer/module static.
    """

    d: jax.Array
    pos: jax.Array
    step: jax.Array
    layer: int
    module: int

    def delta(self, h):
        """h [B,T,D] -> [B,T,D]: d at the chosen token of each row, zero elsewhere."""
        hot = jax.nn.one_hot(self.pos, h.shape[1], dtype=jnp.float32)
        return (hot[:, :, None] * self.d[:, None, :]).astype(h.dtype)


def hidden_at(params, cfg: ModelConfig, x, pad, pos, layer: int, module) -> jax.Array:
    """The (layer, module) output at token pos[b] of each row: x [B,T], pos [B] -> [B,D] float32."""
    name = ("resid", "attn", "mlp")[module_id(module)]
    out = M.run(params, x, cfg, pad, Intervene(read_pos=pos[:, None]), stop_layer=layer)
    return out.acts[name][layer][:, 0].astype(jnp.float32)


def mlp_keys(params, cfg: ModelConfig, x, pad, layer: int) -> jax.Array:
    """The input of the MLP down projection w_down at `layer` at every token: x [B,T] -> [B,T,F]
    float32 (silu(n W_gate) * (n W_up), n = RMSNorm of the residual after attention). Dense MLPs only."""
    if cfg.is_moe:
        raise ValueError("mlp_keys: weight editors need a dense MLP; this config is a mixture of experts")
    B, T = x.shape
    if layer == 0:
        h = M.embed(params, x, cfg)
    else:
        read = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        h = M.run(params, x, cfg, pad, Intervene(read_pos=read), stop_layer=layer - 1).acts["resid"][layer - 1]
    lp = M.layer_params(params, layer)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = M.rope_tables(positions, cfg.rot_dim, cfg.rope_theta)
    h = h + M.attn_block(lp, h, cos, sin, pad, cfg)
    n = M.rms_norm(h, lp["mlp_norm"], cfg.norm_eps).astype(jnp.float32)
    g = n @ lp["w_gate"].astype(jnp.float32)
    u = n @ lp["w_up"].astype(jnp.float32)
    return jax.nn.silu(g) * u


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "n_draws", "t_min"))
def _keys_over_states(params, batch: EditBatch, key, cfg, layer: int, n_draws: int, t_min: float):
    x, _ = answer_states(key, batch, n_draws, cfg.mask_token_id, t_min)
    pad, pos = tile_rows(batch.pad, n_draws), tile_rows(batch.key_pos, n_draws)
    k = mlp_keys(params, cfg, x, pad, layer)
    k = k[jnp.arange(k.shape[0]), pos]
    return jnp.mean(k.reshape(n_draws, batch.n, -1), 0)


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "module", "n_draws", "t_min"))
def _hidden_over_states(params, batch: EditBatch, key, cfg, layer: int, module: int, n_draws: int, t_min: float):
    x, _ = answer_states(key, batch, n_draws, cfg.mask_token_id, t_min)
    h = hidden_at(params, cfg, x, tile_rows(batch.pad, n_draws), tile_rows(batch.key_pos, n_draws), layer, module)
    return jnp.mean(h.reshape(n_draws, batch.n, -1), 0)


def mean_over_states(params, cfg: ModelConfig, batch: EditBatch, layer: int, what: str = "key",
                     module="resid", n_draws: int = 8, t_min: float = 0.1, seed: int = 0) -> np.ndarray:
    """Average, over `n_draws` partially unmasked states, of the w_down input at `layer` (what="key",
    [N,F]) or of the (layer, module) output (what="hidden", [N,D]) at each fact's key position;
    float64 numpy."""
    key = jax.random.PRNGKey(seed)
    if what == "key":
        out = _keys_over_states(params, batch, key, cfg, int(layer), int(n_draws), float(t_min))
    elif what == "hidden":
        out = _hidden_over_states(params, batch, key, cfg, int(layer), module_id(module), int(n_draws), float(t_min))
    else:
        raise ValueError(f"mean_over_states: what must be 'key' or 'hidden', got {what!r}")
    return np.asarray(out, np.float64)


@dataclasses.dataclass(frozen=True)
class DeltaConfig:
    """Optimisation of the written delta over partially unmasked states.

    steps, lr: Adam steps and learning rate, the latter relative to the hidden state's scale (Adam's
    step is lr * ||h|| / sqrt(D) per coordinate, so one lr suits models whose residual norms differ
    by orders of magnitude); n_draws: states per fact per step; t_min: the smallest
    masking ratio; weight_decay: L2 penalty on ||delta||^2 / ||h||^2 (ROME's v_weight_decay role);
    clamp: the delta is projected onto ||delta|| <= clamp * ||h|| after every step (ROME/MEMIT's
    clamp_norm_factor role), h = the unedited hidden state at the key position.
    """

    steps: int = 40
    lr: float = 0.3
    n_draws: int = 4
    t_min: float = 0.1
    weight_decay: float = 1e-3
    clamp: float = 4.0


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "module", "n_draws", "t_min"))
def _delta_loss_and_grad(params, d, batch: EditBatch, key, h_norm2, wd, cfg, layer: int, module: int,
                         n_draws: int, t_min: float):
    x, masked = answer_states(key, batch, n_draws, cfg.mask_token_id, t_min)
    pad = tile_rows(batch.pad, n_draws)

    def loss(d):
        edit = PosDelta(tile_rows(d, n_draws), tile_rows(batch.key_pos, n_draws), jnp.int32(-1), layer, module)
        logits = M.forward(params, x, cfg, pad, Intervene(edit=edit))
        nll = masked_nll(logits, tile_rows(batch.tokens, n_draws), masked)
        return nll + wd * jnp.mean(jnp.sum(d * d, -1) / h_norm2)

    return jax.value_and_grad(loss)(d)


def optimise_delta(params, cfg: ModelConfig, batch: EditBatch, layer: int, module, dcfg: DeltaConfig = DeltaConfig(),
                   seed: int = 0, h0: Optional[np.ndarray] = None, progress: bool = False):
    """Optimise per-fact deltas d [N,D] added to the (layer, module) output at each fact's key position
    (every denoising step) so that the target answer becomes likely in partially unmasked states.

    h0 [N,D]: the unedited hidden state there (default: `mean_over_states`), which sets the norm scale
    of the weight decay and of the clamp. Returns (d [N,D] float64 numpy, info dict with the loss
    before/after and per-step losses).
    """
    m = module_id(module)
    if h0 is None:
        h0 = mean_over_states(params, cfg, batch, layer, "hidden", m, dcfg.n_draws, dcfg.t_min, seed)
    h_norm = jnp.asarray(np.linalg.norm(h0, axis=-1) + 1e-8, jnp.float32)
    d = jnp.zeros(h0.shape, jnp.float32)
    opt = optax.adam(dcfg.lr * float(jnp.mean(h_norm)) / np.sqrt(h0.shape[-1]))
    state = opt.init(d)
    key = jax.random.PRNGKey(seed)
    losses = []
    for _ in tqdm(range(dcfg.steps), desc=f"delta L{layer}", leave=False, disable=not progress):
        key, sub = jax.random.split(key)
        val, g = _delta_loss_and_grad(params, d, batch, sub, h_norm ** 2, jnp.float32(dcfg.weight_decay), cfg,
                                      int(layer), m, int(dcfg.n_draws), float(dcfg.t_min))
        upd, state = opt.update(g, state, d)
        d = optax.apply_updates(d, upd)
        n = jnp.linalg.norm(d, axis=-1, keepdims=True)
        d = d * jnp.minimum(1.0, dcfg.clamp * h_norm[:, None] / jnp.maximum(n, 1e-12))
        losses.append(float(val))
    return np.asarray(d, np.float64), {"loss_first": losses[0] if losses else None,
                                       "loss_last": losses[-1] if losses else None, "losses": losses}
