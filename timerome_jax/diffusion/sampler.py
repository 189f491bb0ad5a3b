"""Jitted denoising samplers for masked diffusion LMs (LLaDA and Dream rules, one code path).

The sampler is model-agnostic: it only needs `timerome_jax.backbone.model.forward`, whose logits are already
aligned so that `[:, i]` predicts token i for every family (the AR logit shift of Dream/DiffuLLaMA is
undone inside the forward).

Pieces, from small to large:

- `make_canvas`   prompts (left-padded) + `gen_length` mask tokens -> x, pad_mask, prompt_mask.
- `schedule`      per-row block ids, LLaDA's per-step transfer counts and Dream's timesteps, as a
                  `Schedule` pytree (all arrays, so one compiled loop serves every canvas of a shape).
- `commit`        given logits, pick tokens and decide which still-masked positions to commit.
- `denoise_step`  one forward (two with classifier-free guidance) + `commit`. `step` is traced, so a
                  single compiled step serves all steps; it is passed to the forward so patches and
                  edits can target a denoising step.
- `generate`      the whole trajectory as ONE jitted `lax.scan` over steps.
- `generate_text` strings in, strings out.

Remasking rules (SamplerConfig.remasking):

- LLaDA (ML-GSAI/LLaDA:generate.py): "low_confidence" (confidence = softmax(logits)[x0], no
  temperature) and "random" (confidence ~ U(0,1)). Each step commits exactly
  `n_transfer[row, step]` tokens of the current block (LLaDA's `get_num_transfer_tokens`).
- Dream (Dream `generation_utils._sample`): "origin" (each masked position is revealed with prob
  1 - s/t, all at the last step), "maskgit_plus" (confidence = p(x0)), "topk_margin" (top1 - top2)
  and "entropy" (sum p log p); the last three reveal int(n_mask * (1 - s/t)) positions by confidence
  (all remaining at the last step), where p = softmax(logits / temperature).

Deliberate deviations from the references (all documented where they happen):
- Gumbel noise is float32 (LLaDA: float64), drawn in JAX's high-dynamic-range mode.
- The mask token is never sampled (and neither is EOS with `suppress_eos`): a committed position must
  not hold the mask token, or it would be selected again and the transfer schedule would drift.
  Trained MDLMs put ~0 mass on it, so this does not change their samples.
- Dream's per-step reveal count uses each row's own number of masked positions (Dream uses the batch
  average, which is the same number whenever all rows have equal gen lengths, as `make_canvas` makes
  them); this keeps rows independent of what else is in the batch.
- Top-k ties are broken deterministically by position (lowest first); torch.topk leaves it unspecified.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from timerome_jax.backbone import model
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.diffusion.likelihood import as_key, is_traced, token_logprob
from timerome_jax.backbone.tokenizer import eos_or_default

LLADA_RULES = ("low_confidence", "random")
DREAM_RULES = ("origin", "maskgit_plus", "topk_margin", "entropy")
REMASKING = LLADA_RULES + DREAM_RULES


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampler settings (hashable: passed to `jax.jit` as a static argument).

    steps:        number of denoising steps (forwards) for the whole generation region.
    block_length: semi-autoregressive block length in tokens; None = the whole region is one block.
                  The generation length must be a multiple of it and `steps` a multiple of the
                  number of blocks (as in LLaDA).
    temperature:  sampling temperature of the committed tokens (0 = argmax).
    cfg_scale:    classifier-free guidance s: logits = un + (s + 1) * (cond - un), where the
                  unconditional forward sees the prompt replaced by mask tokens (0 = off).
    remasking:    one of REMASKING (see the module docstring).
    eps:          Dream's final timestep: t runs over linspace(1, eps, steps_per_block + 1).
    alg_temp:     Dream's confidence temperature: > 0 samples the revealed positions from
                  softmax(confidence / alg_temp) without replacement instead of taking the top-k.
    suppress_eos: never sample `cfg.eos_token_id` (LLaDA's `logits_eos_inf`).
    """

    steps: int = 64
    block_length: Optional[int] = None
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    eps: float = 1e-3
    alg_temp: float = 0.0
    suppress_eos: bool = False

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

        def is_num(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))

        if not is_int(self.steps) or self.steps < 1:
            raise ValueError(f"SamplerConfig.steps must be an int >= 1, got {self.steps!r}")
        if self.block_length is not None and (not is_int(self.block_length) or self.block_length < 1):
            raise ValueError(f"SamplerConfig.block_length must be None or an int >= 1, got {self.block_length!r}")
        if not is_num(self.temperature) or not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplerConfig.temperature must be a finite float >= 0, got {self.temperature!r}")
        if not is_num(self.cfg_scale) or not np.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"SamplerConfig.cfg_scale must be a finite float >= 0, got {self.cfg_scale!r}")
        if self.remasking not in REMASKING:
            raise ValueError(f"SamplerConfig.remasking must be one of {REMASKING}, got {self.remasking!r}")
        if not is_num(self.eps) or not (0.0 < self.eps < 1.0):
            raise ValueError(f"SamplerConfig.eps must be in (0, 1), got {self.eps!r}")
        if not is_num(self.alg_temp) or not np.isfinite(self.alg_temp) or self.alg_temp < 0:
            raise ValueError(f"SamplerConfig.alg_temp must be a finite float >= 0, got {self.alg_temp!r}")
        if self.alg_temp > 0 and self.remasking not in ("maskgit_plus", "topk_margin", "entropy"):
            raise ValueError(f"SamplerConfig.alg_temp > 0 only applies to the Dream confidence rules "
                             f"maskgit_plus/topk_margin/entropy, not remasking={self.remasking!r}")
        if not isinstance(self.suppress_eos, (bool, np.bool_)):
            raise ValueError(f"SamplerConfig.suppress_eos must be a bool, got {self.suppress_eos!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-canvas denoising schedule (a pytree of arrays; built by `schedule`).

    gen_mask:        [B,T] bool, the generation positions (mask tokens of the initial canvas).
    block:           [B,T] int32, block index of each generation position (-1 elsewhere).
    n_transfer:      [B,steps] int32, LLaDA's tokens to commit per row and step.
    steps_per_block: [] int32.
    t, s:            [steps] float32, Dream's current/next timestep of each step (restarting at 1
                     in every block).
    last:            [steps] bool, whether a step is the last one of its block.
    """

    gen_mask: jax.Array
    block: jax.Array
    n_transfer: jax.Array
    steps_per_block: jax.Array
    t: jax.Array
    s: jax.Array
    last: jax.Array


class Noise(NamedTuple):
    """The random draws of one step (None where the rule needs none).

    gumbel: [B,T,V] token Gumbel noise (temperature > 0); u: [B,T] uniforms ("random" confidence,
    "origin" reveal draws); g_sel: [B,T] Gumbel noise for Dream's alg_temp > 0 position sampling.
    """

    gumbel: Optional[jax.Array]
    u: Optional[jax.Array]
    g_sel: Optional[jax.Array]


# --------------------------------------------------------------------------------------- canvas


def make_canvas(prompts: Sequence[Sequence[int]], gen_length: int, cfg: ModelConfig, max_len: Optional[int] = None):
    """Build a batch canvas: each prompt LEFT-padded with `cfg.pad_token_id`, then `gen_length` masks.

    prompts: B lists of token ids. max_len: total length T (default: longest prompt + gen_length);
    fixing it keeps shapes (and hence compiled code) stable across batches.
    Returns x [B,T] int32, pad_mask [B,T] bool (False on left padding), prompt_mask [B,T] bool.
    """
    if not isinstance(gen_length, (int, np.integer)) or isinstance(gen_length, bool) or gen_length < 1:
        raise ValueError(f"gen_length must be an int >= 1, got {gen_length!r}")
    if cfg.pad_token_id == cfg.mask_token_id:
        raise ValueError(f"cfg.pad_token_id == cfg.mask_token_id == {cfg.mask_token_id}: padding would be "
                         "taken for generation positions")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("make_canvas needs at least one prompt")
    for r, p in enumerate(prompts):
        if len(p) + gen_length > cfg.max_seq_len:
            raise ValueError(f"prompt row {r}: {len(p)} prompt tokens + gen_length {gen_length} = "
                             f"{len(p) + gen_length} exceeds cfg.max_seq_len={cfg.max_seq_len}")
        if max_len is not None and len(p) + gen_length > max_len:
            raise ValueError(f"prompt row {r}: {len(p)} prompt tokens + gen_length {gen_length} = "
                             f"{len(p) + gen_length} exceeds max_len={max_len}")
        bad = [i for i, t in enumerate(p) if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt row {r}: token {p[bad[0]]} at index {bad[0]} is outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
        if cfg.mask_token_id in p:
            raise ValueError(f"prompt row {r}: contains the mask token {cfg.mask_token_id} at index "
                             f"{p.index(cfg.mask_token_id)}; it would be treated as a generation position")
        if cfg.logits_shift and not p:
            raise ValueError(f"prompt row {r} is empty, but family {cfg.family!r} shifts logits (position i-1 "
                             "predicts token i), so the first generated token would have no predictor")
    plen = max(len(p) for p in prompts) if max_len is None else max_len - gen_length
    T = plen + gen_length
    B = len(prompts)
    x = np.full((B, T), cfg.pad_token_id, np.int32)
    pad_mask = np.zeros((B, T), bool)
    prompt_mask = np.zeros((B, T), bool)
    for r, p in enumerate(prompts):
        start = plen - len(p)
        x[r, start:plen] = p
        pad_mask[r, start:] = True
        prompt_mask[r, start:plen] = True
    x[:, plen:] = cfg.mask_token_id
    return jnp.asarray(x), jnp.asarray(pad_mask), jnp.asarray(prompt_mask)


# ------------------------------------------------------------------------------------- schedule


def schedule(x, pad_mask, cfg: ModelConfig, scfg: SamplerConfig) -> Schedule:
    """The denoising schedule of canvas x [B,T] (pad_mask [B,T] bool, True = real token).

    Generation positions are the mask tokens of x with pad_mask True. The generation length G is the
    largest per-row count of them; block of a position = its rank among its row's generation
    positions // block_length (block_length None = G). As in LLaDA, G % block_length == 0 and
    steps % (G // block_length) == 0 are required (checked, with a ValueError, whenever x is concrete).
    Rows with fewer generation positions (e.g. right padding inside the region) simply have fewer
    (or no) positions in their later blocks.

    n_transfer[row, step] follows LLaDA's get_num_transfer_tokens within each block: with n masked
    positions in the row's block and spb steps per block, base = n // spb, and the first n % spb
    steps of the block get one more.
    """
    if not is_traced(x, pad_mask):
        xn, pn = np.asarray(x), np.asarray(pad_mask, bool)
        if xn.ndim != 2 or pn.shape != xn.shape:
            raise ValueError(f"schedule: x must be [B,T] and pad_mask the same shape; got x {xn.shape}, "
                             f"pad_mask {pn.shape}")
        g = int(((xn == cfg.mask_token_id) & pn).sum(1).max())
        if g == 0:
            raise ValueError(f"schedule: the canvas has no generation positions (no mask token "
                             f"{cfg.mask_token_id} where pad_mask is True)")
        bl = g if scfg.block_length is None else scfg.block_length
        if g % bl:
            raise ValueError(f"schedule: generation length {g} is not a multiple of block_length {bl}")
        if scfg.steps % (g // bl):
            raise ValueError(f"schedule: steps={scfg.steps} is not a multiple of the number of blocks "
                             f"{g // bl} (generation length {g} / block_length {bl})")
    elif jnp.ndim(x) != 2 or jnp.shape(pad_mask) != jnp.shape(x):
        raise ValueError(f"schedule: x must be [B,T] and pad_mask the same shape; got x {jnp.shape(x)}, "
                         f"pad_mask {jnp.shape(pad_mask)}")
    return _schedule_jit(jnp.asarray(x), jnp.asarray(pad_mask, bool), mask_token_id=cfg.mask_token_id,
                         steps=scfg.steps, block_length=scfg.block_length, eps=float(scfg.eps))


def _schedule_arrays(x, pad_mask, mask_token_id: int, steps: int, block_length: Optional[int], eps: float) -> Schedule:
    gen = (x == mask_token_id) & pad_mask
    n_gen = jnp.sum(gen, axis=1, dtype=jnp.int32)
    G = jnp.max(n_gen)
    bl = jnp.maximum(G if block_length is None else jnp.int32(block_length), 1)
    n_blocks = jnp.maximum(G // bl, 1)
    spb = jnp.maximum(jnp.int32(steps) // n_blocks, 1).astype(jnp.int32)
    rank = jnp.cumsum(gen, axis=1, dtype=jnp.int32) - 1
    block = jnp.where(gen, rank // bl, -1).astype(jnp.int32)
    st = jnp.arange(steps, dtype=jnp.int32)
    b_of, i_loc = st // spb, st % spb
    # generation positions are numbered contiguously, so block b of a row holds
    # clip(n_gen - b * bl, 0, bl) of them
    n_blk = jnp.clip(n_gen[:, None] - b_of[None, :] * bl, 0, bl)
    n_transfer = (n_blk // spb + (i_loc[None, :] < n_blk % spb)).astype(jnp.int32)
    # Dream: timesteps = torch.linspace(1, eps, spb + 1); step i of a block goes from t = ts[i] to
    # s = ts[i+1]. torch fills the second half from the end, so the last value is exactly eps.
    f = jnp.float32
    delta = (f(eps) - f(1.0)) / spb.astype(f)

    def ts(j):
        return jnp.where(j < (spb + 1) // 2, f(1.0) + delta * j.astype(f), f(eps) - delta * (spb - j).astype(f))

    return Schedule(gen_mask=gen, block=block, n_transfer=n_transfer, steps_per_block=spb,
                    t=ts(i_loc).astype(f), s=ts(i_loc + 1).astype(f), last=i_loc == spb - 1)


# one dispatch instead of ~30 eager ops (inlined inside a caller's trace); static on the few fields it
# reads, so e.g. a temperature change does not recompile it
_schedule_jit = jax.jit(_schedule_arrays, static_argnames=("mask_token_id", "steps", "block_length", "eps"))


# --------------------------------------------------------------------------------------- commit


def draw_noise(key, shape, scfg: SamplerConfig) -> Noise:
    """The random draws one step needs for logits of shape [B,T,V] (static choice by rule)."""
    B, T, V = shape
    k_tok, k_u, k_sel = jax.random.split(key, 3)
    # float32 Gumbel (LLaDA uses float64 because low-precision Gumbel-max truncates the noise tail and
    # lowers the effective temperature, arXiv:2409.02908). JAX has no fast float64 on accelerators
    # and x64 is a global switch, so we use float32 in "high" mode (two uniforms per draw), which
    # raises the largest representable Gumbel value from ~16 to ~32 (float64: ~37).
    gumbel = (jax.random.gumbel(k_tok, (B, T, V), jnp.float32, mode="high")
              if scfg.temperature > 0 else None)
    u = jax.random.uniform(k_u, (B, T), jnp.float32) if scfg.remasking in ("random", "origin") else None
    g_sel = jax.random.gumbel(k_sel, (B, T), jnp.float32, mode="high") if scfg.alg_temp > 0 else None
    return Noise(gumbel, u, g_sel)


def topk_mask(conf, cand, k):
    """[B,T] bool: per row, the k[row] candidates with the highest confidence.

    conf [B,T] float; cand [B,T] bool; k [B] int (data, not static). Ties go to the lower position.
    Done with ranks (a stable sort) instead of lax.top_k, so k may differ per row and step.
    """
    B, T = conf.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    # lexsort: the last key is primary -> candidates first, then by -conf, then by position
    order = jnp.lexsort((pos, -conf.astype(jnp.float32), ~cand), axis=-1)
    rank = jnp.zeros((B, T), jnp.int32).at[jnp.arange(B)[:, None], order].set(pos)
    return cand & (rank < k[:, None])


def candidates(x, sched: Schedule, step, cfg: ModelConfig):
    """[B,T] bool: still-masked generation positions in the block that `step` belongs to."""
    cur = jnp.asarray(step, jnp.int32) // sched.steps_per_block
    return sched.gen_mask & (x == cfg.mask_token_id) & (sched.block == cur)


def commit_with_noise(logits, x, cand, n_transfer, t, s, last, noise: Noise, cfg: ModelConfig, scfg: SamplerConfig):
    """Deterministic core of one step, given the random draws.

    logits [B,T,V] float32 (aligned: [:, i] predicts token i); x [B,T]; cand [B,T] bool (positions
    allowed to be committed now); n_transfer [B] int32 (LLaDA rules: exactly this many per row);
    t, s: float32 scalars, last: bool scalar (Dream timesteps of this step). Returns x_new [B,T].
    """
    lg = logits.astype(jnp.float32)
    V = lg.shape[-1]
    banned = [cfg.mask_token_id] + ([cfg.eos_token_id] if scfg.suppress_eos else [])
    banned = sorted({b for b in banned if 0 <= b < V})
    if banned:  # a select with a static [V] mask fuses into the argmax/logsumexp (a scatter copies lg)
        is_banned = np.zeros(V, bool)
        is_banned[banned] = True
        lg = jnp.where(is_banned, -jnp.inf, lg)
    temp = scfg.temperature
    # Gumbel-max: argmax(logits + T * g) samples softmax(logits / T); LLaDA writes the same thing as
    # argmax(exp(logits) / (-log u) ** T). T = 0 is plain argmax.
    x0 = jnp.argmax(lg + temp * noise.gumbel if temp > 0 else lg, axis=-1).astype(x.dtype)
    rule = scfg.remasking
    if rule in LLADA_RULES:
        if rule == "low_confidence":  # softmax(logits)[x0], no temperature (as LLaDA)
            conf = jnp.exp(token_logprob(lg, x0))
        else:
            conf = noise.u
        sel = topk_mask(conf, cand, n_transfer)
    elif rule == "origin":
        p_transfer = jnp.where(last, 1.0, 1.0 - s / t)
        sel = cand & (noise.u < p_transfer)
    else:
        logp = jax.nn.log_softmax(lg / temp if temp > 0 else lg, axis=-1)  # Dream tempers these probs
        p = jnp.exp(logp)
        if rule == "maskgit_plus":
            conf = jnp.take_along_axis(p, x0[..., None], -1)[..., 0]
        elif rule == "topk_margin":
            top2 = jax.lax.top_k(p, 2)[0]
            conf = top2[..., 0] - top2[..., 1]
        else:  # entropy: Dream's sum p log(p + 1e-10), i.e. minus the entropy
            conf = jnp.sum(p * jnp.log(p + 1e-10), axis=-1)
        n = jnp.sum(cand, axis=1, dtype=jnp.int32)
        k = jnp.where(last, n, jnp.floor(n.astype(jnp.float32) * (1.0 - s / t)).astype(jnp.int32))
        if scfg.alg_temp > 0:
            # Gumbel-top-k == sampling k positions without replacement from softmax(conf / alg_temp)
            conf = conf / scfg.alg_temp + noise.g_sel
        sel = topk_mask(conf, cand, k)
    return jnp.where(sel, x0, x)


def commit(logits, x, sched: Schedule, step, key, cfg: ModelConfig, scfg: SamplerConfig):
    """Choose and commit tokens for denoising step `step` given its logits [B,T,V]. -> x_new [B,T]."""
    step = jnp.asarray(step, jnp.int32)
    cand = candidates(x, sched, step, cfg)
    noise = draw_noise(key, logits.shape, scfg)
    return commit_with_noise(logits, x, cand, sched.n_transfer[:, step], sched.t[step], sched.s[step],
                             sched.last[step], noise, cfg, scfg)


def denoise_step(params, cfg: ModelConfig, scfg: SamplerConfig, x, pad_mask, prompt_mask, sched: Schedule,
                 step, key, intervene: Optional[Intervene] = None):
    """One denoising step: forward(s), token choice, and commit. Jit-able with cfg/scfg static.

    x [B,T] int32 canvas; pad_mask/prompt_mask [B,T] bool; sched from `schedule`; step: int32 scalar
    (may be traced), passed to the forward so patches/edits can target it; key: PRNG key.
    With cfg_scale > 0 a second, unconditional forward sees the prompt replaced by mask tokens and
    logits = un + (cfg_scale + 1) * (cond - un); `intervene` applies to both forwards.

    Sampling draws Gumbel noise in float32 (LLaDA uses float64 to keep the noise tail; see
    `draw_noise` for why we don't and how the tail is kept). Only still-masked generation positions of
    the current block are candidates; committed tokens are never remasked.

    Returns (x_new [B,T], logits [B,T,V] float32): the guided model logits of this step, before the
    sampler bans the mask token (and EOS with suppress_eos).
    """
    step = jnp.asarray(step, jnp.int32)
    logits = model.forward(params, x, cfg, pad_mask, intervene, step)
    if scfg.cfg_scale > 0:
        un_x = jnp.where(prompt_mask, cfg.mask_token_id, x)
        un = model.forward(params, un_x, cfg, pad_mask, intervene, step)
        logits = un + (scfg.cfg_scale + 1.0) * (logits - un)
    return commit(logits, x, sched, step, key, cfg, scfg), logits


# ------------------------------------------------------------------------------------- generate


def _generate_impl(params, x, pad_mask, prompt_mask, sched, key, intervene, cfg, scfg, return_history):
    # a gated memory's sequence latch is decided once, from the canvas with every generation slot masked
    intervene = model.prime_edit(params, x, cfg, pad_mask, sched.gen_mask, intervene)
    def body(carry, step):
        xc, k = carry
        k, sub = jax.random.split(k)
        xn, _ = denoise_step(params, cfg, scfg, xc, pad_mask, prompt_mask, sched, step, sub, intervene)
        return (xn, k), (xn if return_history else None)

    (xf, _), hist = jax.lax.scan(body, (x, key), jnp.arange(scfg.steps, dtype=jnp.int32))
    return (xf, hist) if return_history else xf


def _generate_entry(params, x, pad_mask, prompt_mask, sched, key, intervene, cfg, scfg, return_history):
    # looks `_generate_impl` up at trace time, so tests can count traces of the real entry point
    return _generate_impl(params, x, pad_mask, prompt_mask, sched, key, intervene, cfg, scfg, return_history)


# The generation program's GEMMs go to cuBLAS on GPU (XLA's Triton GEMMs off: a field of XLA's debug
# options, which the CPU backend accepts and ignores; the test suite compiles with it on CPU). At
# batch 1 a step is a chain of few-row, weight-streaming products: cuBLAS takes the residual add that
# follows a sub-layer's last product as its epilogue, where the Triton GEMMs left it (and their
# split-K reduction) to kernels of their own. docs/performance.md has the measurements.
GENERATION_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}

generate_scan = jax.jit(_generate_entry, static_argnames=("cfg", "scfg", "return_history"),
                        compiler_options=GENERATION_COMPILER_OPTIONS)
generate_scan.__doc__ = """Jitted core of `generate` with a precomputed `Schedule` (cfg/scfg/return_history static).
pad_mask [B,T] bool, or None when the canvas has no padding (`model.attention_mask`)."""


def generate(params, cfg: ModelConfig, scfg: SamplerConfig, x, pad_mask, prompt_mask, key,
             intervene: Optional[Intervene] = None, return_history: bool = False):
    """Run the full denoising trajectory: one jitted `lax.scan` of `denoise_step` over scfg.steps.

    x [B,T] int32 canvas (e.g. from `make_canvas`); pad_mask, prompt_mask [B,T] bool; key: PRNG key
    (an int is taken as a seed), split inside the scan carry. Inputs of the same shapes share one
    compiled program, one for canvases with padding and one for those without (their attention runs
    unmasked: `model.attention_mask`). Returns x_final [B,T] int32, or (x_final, history [steps,B,T]) where
    history[i] is the canvas after step i.
    """
    x = jnp.asarray(x, jnp.int32)
    pad_mask = jnp.asarray(pad_mask, bool)
    prompt_mask = jnp.asarray(prompt_mask, bool)
    if x.ndim != 2 or pad_mask.shape != x.shape or prompt_mask.shape != x.shape:
        raise ValueError(f"generate: x, pad_mask and prompt_mask must all be [B,T]; got {x.shape}, "
                         f"{pad_mask.shape}, {prompt_mask.shape}")
    if x.shape[1] > cfg.max_seq_len:
        raise ValueError(f"generate: canvas length {x.shape[1]} exceeds cfg.max_seq_len={cfg.max_seq_len}")
    sched = schedule(x, pad_mask, cfg, scfg)
    return generate_scan(params, x, model.attention_mask(pad_mask), prompt_mask, sched, as_key(key), intervene,
                         cfg=cfg, scfg=scfg, return_history=bool(return_history))


def cut_at_eos(ids: Sequence[int], eos_id: Optional[int]) -> list[int]:
    """ids up to (not including) the first `eos_id`."""
    ids = [int(t) for t in ids]
    if eos_id is not None and int(eos_id) in ids:
        return ids[: ids.index(int(eos_id))]
    return ids


def generate_text(params, cfg: ModelConfig, tokenizer, prompts: Sequence[str], gen_length: int, scfg: SamplerConfig,
                  seed: int = 0, intervene: Optional[Intervene] = None, max_len: Optional[int] = None) -> list[str]:
    """Generate an answer for each prompt string; each answer is cut at its first EOS.

    tokenizer: has .encode(text) -> list[int], .decode(ids) -> str and .eos_id (None: cfg.eos_token_id).
    max_len: optional fixed canvas length (see `make_canvas`).
    """
    ids = [list(tokenizer.encode(p)) for p in prompts]
    x, pad_mask, prompt_mask = make_canvas(ids, gen_length, cfg, max_len)
    out = np.asarray(generate(params, cfg, scfg, x, pad_mask, prompt_mask, jax.random.PRNGKey(seed), intervene))
    return [tokenizer.decode(cut_at_eos(row, eos_or_default(tokenizer, cfg))) for row in out[:, -gen_length:]]
