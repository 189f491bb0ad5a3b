"""First-order TIE screen (attribution patching for diffusion-time tracing), then exact TIE on the top.

The exact sweep (`trace.trace`) runs L x K x 3 patched trajectories per noise draw. The screen
estimates every TIE_bar(l, k, m) at once from one forward and one backward per denoising step:

- Hold the corrupted trajectory's commits fixed. Its canvases x_k are then fixed, so replacing a
  module output at step k changes only step k's logits, and through them only the object
  log-probabilities that step k writes into the Eq. 3 bookkeeping.
- Step k writes lp_i(k) for every object position i still masked in x_k. That value scores s(k+1)
  only when i is still masked in x_{k+1} (step k+1 overwrites it), and every s(k') with k' > k when
  step k commits i. With the Eq. 4 weights (each row sums to 1) the weighted later-step objective
  of step k is therefore

      J_k = sum_i c_{k,i} lp_i(k),  c_{k,i} = 1 if step k commits i, w_{k,k+1} if i stays masked,
                                    0 if i is not an object position masked in x_k,

  and TIE_bar(l, k, m) ~ <dJ_k / d h_{l,k,m}[S], h^clean_{l,k,m}[S] - h^corr_{l,k,m}[S]>.
- dJ_k / d h for every layer and module comes from one vjp through a forward that adds a zero
  `Shift` to every module output on S (the gradient with respect to the shift is the gradient with
  respect to the module output).
- Where the gradient is taken: the noise is large (3 std), so the gradient at the corrupted run
  (alpha = 1) is a poor slope for the whole way back to the clean value. `alphas` evaluates it with
  the noise scaled by each alpha (on the corrupted canvases) and averages: a midpoint or trapezoid
  rule for the path integral from corrupted to clean. The default is the midpoint, alpha = 0.5
  (docs/screen.md has the measured rank correlations of each choice).

`screen_and_trace` ranks candidates by the screen's E_F |TIE_bar| (Eq. 5's score), runs the exact
sweep on the top `top_frac` of each module's (layer, step) cells through the trace's lane program,
and selects among those.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from timerome_jax.backbone import model
from timerome_jax.backbone.config import MODULES, ModelConfig
from timerome_jax.backbone.intervene import Intervene, Shift
from timerome_jax.diffusion.likelihood import token_logprob
from timerome_jax.method import trace as tr


def _step_weights(corr: tr.Trajectory, fb: tr.FactBatch, cfg: ModelConfig, w: jax.Array) -> jax.Array:
    """c [K, B, T]: the weight of step k's object log-prob at position i in J_k (module docstring)."""
    masked = (corr.xs == cfg.mask_token_id) & fb.obj_mask[None]
    # x_{k+1} for k < K-1; after the last step every position is committed
    nxt = jnp.concatenate([corr.xs[1:], jnp.zeros_like(corr.xs[:1])], axis=0)
    stays = nxt == cfg.mask_token_id
    w_next = jnp.diagonal(w)[:, None, None]  # w[k, k'-1] at k' = k+1
    return jnp.where(masked, jnp.where(stays, w_next, 1.0), 0.0)


def _screen_draw(params, fb: tr.FactBatch, noise, clean_acts, w, cfg: ModelConfig, tcfg: tr.TraceConfig,
                 alphas: tuple):
    """Estimated TIE_bar [B, 3, L, K] for one noise draw (gradients averaged over noise * alphas)."""
    corr = tr.trajectory(params, fb, noise, cfg=cfg, tcfg=tcfg, read=True)
    c = _step_weights(corr, fb, cfg, w)
    L, B, S = cfg.n_layers, fb.subj_pos.shape[0], fb.subj_pos.shape[1]
    D = clean_acts.shape[-1]

    def one(args):
        x, ck, k = args

        def objective(value, alpha):
            iv = Intervene(noise=alpha * noise, shift=Shift(fb.subj_pos, fb.subj_valid, value))
            logits = model.run(params, x, cfg, fb.pad_mask, iv, k).logits
            return jnp.sum(ck * token_logprob(logits, fb.obj))

        zero = jnp.zeros((L, 3, B, S, D), jnp.float32)
        return sum(jax.grad(objective)(zero, a) for a in alphas) / len(alphas)  # [L, 3, B, S, D]

    ks = jnp.arange(tcfg.steps, dtype=jnp.int32)
    grads = jax.lax.map(one, (corr.xs, c, ks), batch_size=min(tcfg.chunk, tcfg.steps))  # [K, L, 3, B, S, D]
    diff = (clean_acts - corr.acts).astype(jnp.float32)  # [K, 3, L, B, S, D]
    diff = jnp.where(fb.subj_valid[None, None, None, :, :, None], diff, 0.0)
    est = jnp.einsum("klmbsd,kmlbsd->bmlk", grads, diff)
    return est, corr.scores


screen_draw = jax.jit(_screen_draw, static_argnames=("cfg", "tcfg", "alphas"))


class ScreenResult(NamedTuple):
    """estimate [B, 3, L, K]: first-order TIE_bar; clean [B, K], corrupted [R, B, K] scores s(k')."""

    estimate: np.ndarray
    clean: np.ndarray
    corrupted: np.ndarray


def screen(params, cfg: ModelConfig, fb: tr.FactBatch, tcfg: tr.TraceConfig = tr.TraceConfig(),
           progress=None, alphas: Sequence[float] = (0.5,)) -> ScreenResult:
    """First-order estimate of TIE_bar for every (layer, step, module), averaged over the same noise
    draws as `trace.trace` (same seed, same sigma). Costs K x len(alphas) forward+backward passes
    per draw plus the clean and corrupted trajectories. progress(i, n) is called after each draw."""
    alphas = tuple(float(a) for a in alphas)
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise ValueError(f"screen: alphas must be a non-empty list of values in [0, 1], got {alphas}")
    if fb.pad_mask is not None and bool(np.all(np.asarray(fb.pad_mask))):
        fb = dataclasses.replace(fb, pad_mask=None)
    sigma = tcfg.noise_scale * float(jnp.std(params["embed"].astype(jnp.float32)))
    clean = tr.trajectory(params, fb, None, cfg=cfg, tcfg=tcfg, read=True)
    w = jnp.asarray(tr.decay_weights(tcfg.steps, tcfg.tau), jnp.float32)
    ests, corr_scores = [], []
    for r in range(tcfg.n_noise):
        noise = tr.embedding_noise(jax.random.fold_in(jax.random.key(tcfg.seed), r), fb, params, sigma)
        est, cs = screen_draw(params, fb, noise, clean.acts, w, cfg=cfg, tcfg=tcfg, alphas=alphas)
        ests.append(np.asarray(est, np.float64))
        corr_scores.append(np.asarray(cs).T)
        if progress is not None:
            progress(r + 1, tcfg.n_noise)
    return ScreenResult(np.mean(ests, 0), np.asarray(clean.scores).T, np.stack(corr_scores))


def top_candidates(estimate: np.ndarray, top_frac: float, modules: Sequence[str] = MODULES) -> np.ndarray:
    """int [C, 3] rows (module, layer, step): for each module in `modules`, the ceil(top_frac * L * K)
    cells with the largest E_F |estimate| (Eq. 5's score; estimate [F, 3, L, K])."""
    if not 0 < top_frac <= 1:
        raise ValueError(f"top_candidates: top_frac must be in (0, 1], got {top_frac}")
    score = np.mean(np.abs(estimate), 0)
    _, L, K = score.shape
    n = max(1, math.ceil(top_frac * L * K))
    rows = []
    for name in modules:
        m = MODULES.index(name)
        for flat in np.argsort(-score[m].ravel(), kind="stable")[:n]:
            l, k = np.unravel_index(flat, (L, K))
            rows.append((m, int(l), int(k)))
    return np.asarray(rows, np.int32).reshape(-1, 3)


class ScreenedTrace(NamedTuple):
    """estimate [B, 3, L, K] (screen); tie_bar [B, 3, L, K] exact on `candidates`, NaN elsewhere;
    tie [B, 3, L, K, K] likewise; candidates [C, 3] (module, layer, step); clean [B, K];
    corrupted [R, B, K]."""

    estimate: np.ndarray
    tie: np.ndarray
    tie_bar: np.ndarray
    candidates: np.ndarray
    clean: np.ndarray
    corrupted: np.ndarray

    def merged(self) -> np.ndarray:
        """[B, 3, L, K]: exact TIE_bar where it was computed, the screen's estimate elsewhere."""
        return np.where(np.isnan(self.tie_bar), self.estimate, self.tie_bar)


def screen_and_trace(params, cfg: ModelConfig, fb: tr.FactBatch, tcfg: tr.TraceConfig = tr.TraceConfig(),
                     top_frac: float = 0.05, modules: Sequence[str] = MODULES, progress=None,
                     lanes_runner=None, alphas: Sequence[float] = (0.5,)) -> ScreenedTrace:
    """Screen every candidate, then exact TIE (`trace.trace` lanes) on the top `top_frac` of each
    module's cells. lanes_runner as in `trace.trace`."""
    sc = screen(params, cfg, fb, tcfg, alphas=alphas)
    cands = top_candidates(sc.estimate, top_frac, modules)
    res = tr.trace(params, cfg, fb, tcfg, progress=progress, lanes_runner=lanes_runner, candidates=cands)
    return ScreenedTrace(sc.estimate, res.tie, res.tie_bar, cands, res.clean, res.corrupted)


def select_screened(result: ScreenedTrace, neighbours: Optional[np.ndarray] = None, beta: float = 0.0,
                    modules: Sequence[str] = ("resid",), k_star: Optional[int] = -1):
    """Eq. 5 among the exactly traced candidates: `trace.select` on tie_bar with the cells that were
    not traced excluded. Returns (Coordinate, score [3, L, K]) as `trace.select` does."""
    traced = ~np.isnan(result.tie_bar[0])
    allowed = [m for m in modules if traced[MODULES.index(m)].any()]
    if not allowed:
        raise ValueError(f"select_screened: no candidate of modules {list(modules)} was traced exactly")
    filled = np.where(np.isnan(result.tie_bar), 0.0, result.tie_bar)
    nb = None if neighbours is None else np.where(np.isnan(neighbours), 0.0, neighbours)
    _, score = tr.select(filled, nb, beta, allowed, k_star)
    score = np.where(traced, score, -np.inf)
    masked = np.full(score.shape, -np.inf)
    for name in allowed:
        masked[MODULES.index(name)] = score[MODULES.index(name)]
    m, l, k = np.unravel_index(np.argmax(masked), masked.shape)
    return tr.Coordinate(int(l), -1 if k_star == -1 else int(k if k_star is None else k_star), int(m)), score
