"""Diffusion-time causal tracing: the Temporal Indirect Effect (TIE), paper §III-A/B, Eqs. 2-5.

For a batch of facts (prompt, subject span S, object o) we run K denoising steps of the project's
sampler (LLaDA low-confidence remasking, temperature 0, one block) from the prompt with the object
positions masked:

- a clean trajectory that records resid/attn/mlp outputs of every layer at every step on S;
- corrupted trajectories (one per noise draw) with sigma * N(0, I) added to the subject-token
  embeddings at every step (Eq. 2; one draw per trajectory, reused at each step, as in ROME);
- patched trajectories: a corrupted run with the clean value spliced in at one (layer l, step k,
  module m) on S; the rest of the trajectory commits tokens by itself.

Definition of log p(o | x_k') used for Eq. 3 (the paper leaves it open). Step k (k = 0..K-1) runs
the forward on canvas x_k and commits tokens, giving x_{k+1}. For an object position i let
lp_i(k') be log softmax(f(x_j))[i, o_i] for the LAST step j < k' at which position i was still
masked in x_j, i.e. the model's belief about o_i when it last had to predict it (once a position is
committed the denoiser copies it, MDLM's carry-over parameterisation, so its probability is frozen
at the value it had when it was decided). Then

    log p(o | x_k') = sum_{i in O} lp_i(k'),   k' = 1..K,

so s(K) scores the whole decoded object and every step k has later steps k' = k+1..K (Eq. 4).
TIE(l, k, m, k') = s_patched(k') - s_corrupted(k') (same noise draw), averaged over noise draws;
TIE_bar(l, k, m) = sum_{k'>k} w_{k,k'} TIE(l, k, m, k') with w ∝ exp(-tau (k' - k)) normalised to 1.

Computation. All (layer, step, module) candidates are data (`Patch` arrays) and run through one
compiled program. A candidate that patches step k only needs steps k..K-1 (steps before k are the
corrupted run, which is computed once and its canvases kept). To waste no forward and still have
one program shape, candidates are paired into *lanes*: a lane runs a candidate starting at step k
(K - k steps), then restarts from the corrupted state at step K-1-k and runs a candidate starting
there (k + 1 steps): K + 1 forwards per lane, exactly the minimum Σ_k (K - k) per candidate.
Lanes are vmapped in chunks (`lax.map(batch_size=chunk)`) so memory stays bounded.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from timerome_jax.backbone import model
from timerome_jax.diffusion import sampler
from timerome_jax.backbone.config import MODULES, ModelConfig
from timerome_jax.backbone.intervene import Intervene, Patch
from timerome_jax.diffusion.likelihood import token_logprob
from timerome_jax.io import atomic_path


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    """steps: K denoising steps; noise_scale: sigma as a multiple of std(embedding matrix) (ROME: 3);
    n_noise: noise draws averaged; tau: Eq. 4 decay; chunk: lanes vmapped at once; seed: noise seed."""

    steps: int = 8
    noise_scale: float = 3.0
    n_noise: int = 2
    tau: float = 0.5
    chunk: int = 24
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"TraceConfig.steps must be >= 1, got {self.steps}")
        if self.n_noise < 1:
            raise ValueError(f"TraceConfig.n_noise must be >= 1, got {self.n_noise}")
        if self.noise_scale < 0 or self.tau < 0 or self.chunk < 1:
            raise ValueError("TraceConfig: noise_scale and tau must be >= 0 and chunk >= 1")

    @property
    def sampler(self) -> sampler.SamplerConfig:
        return sampler.SamplerConfig(steps=self.steps, remasking="low_confidence", temperature=0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FactBatch:
    """Facts laid out on one canvas. x0 [B,T]: left-padded prompt + masked object region (right
    padded to the longest object); pad_mask, prompt_mask [B,T] bool; obj [B,T] int32 object token at
    object positions (0 elsewhere); obj_mask [B,T] bool; subj_pos [B,S] int32; subj_valid [B,S].
    pad_mask may be None (no padding): the forward then runs without a mask (`trace` drops an
    all-True mask, since cuDNN attention mishandles a padding mask under vmap)."""

    x0: jax.Array
    pad_mask: jax.Array
    prompt_mask: jax.Array
    obj: jax.Array
    obj_mask: jax.Array
    subj_pos: jax.Array
    subj_valid: jax.Array


def make_fact_batch(prompts: Sequence[Sequence[int]], subj_pos: Sequence[Sequence[int]],
                    objects: Sequence[Sequence[int]], cfg: ModelConfig) -> FactBatch:
    """Build a FactBatch from token ids. prompts[i]: prompt ids; subj_pos[i]: subject token indices
    into prompts[i]; objects[i]: object ids (e.g. encode(answer) + [eos])."""
    if not prompts:
        raise ValueError("make_fact_batch: no facts given")
    if not (len(prompts) == len(subj_pos) == len(objects)):
        raise ValueError("make_fact_batch: prompts, subj_pos and objects differ in length")
    P = max(len(p) for p in prompts)
    G = max(len(o) for o in objects)
    S = max(max(len(s) for s in subj_pos), 1)
    B, T = len(prompts), P + G
    if T > cfg.max_seq_len:
        raise ValueError(f"make_fact_batch: prompt {P} + object {G} tokens exceed max_seq_len {cfg.max_seq_len}")
    x = np.full((B, T), cfg.pad_token_id, np.int32)
    pad, pm, om = np.zeros((B, T), bool), np.zeros((B, T), bool), np.zeros((B, T), bool)
    obj = np.zeros((B, T), np.int32)
    sp, sv = np.zeros((B, S), np.int32), np.zeros((B, S), bool)
    for i, (p, s, o) in enumerate(zip(prompts, subj_pos, objects)):
        if not s:
            raise ValueError(f"fact {i}: empty subject span")
        if not o:
            raise ValueError(f"fact {i}: empty object")
        if min(s) < 0 or max(s) >= len(p):
            raise ValueError(f"fact {i}: subject positions {list(s)} outside the prompt of length {len(p)}")
        off = P - len(p)
        x[i, off:P] = p
        pad[i, off:P + len(o)] = True
        pm[i, off:P] = True
        x[i, P:P + len(o)] = cfg.mask_token_id
        obj[i, P:P + len(o)] = o
        om[i, P:P + len(o)] = True
        sp[i, : len(s)] = np.asarray(s) + off
        sv[i, : len(s)] = True
    return FactBatch(*(jnp.asarray(a) for a in (x, pad, pm, obj, om, sp, sv)))


class Trajectory(NamedTuple):
    xs: jax.Array      # [K, B, T] canvas fed to step k
    lpf: jax.Array     # [K, B, T] frozen object log-probs before step k
    scores: jax.Array  # [K, B] s(k') for k' = 1..K
    acts: Optional[jax.Array]  # [K, 3, L, B, S, D] module outputs on the subject (clean run only)


def _schedule(fb: FactBatch, cfg: ModelConfig, scfg) -> sampler.Schedule:
    # the schedule needs a mask even when the forward gets none (pad_mask None = no padding)
    mask = fb.pad_mask if fb.pad_mask is not None else jnp.ones(fb.x0.shape, bool)
    return sampler.schedule(fb.x0, mask, cfg, scfg)


def object_score(logits, x, lpf, fb: FactBatch, cfg: ModelConfig):
    """The log p(o | x_k') bookkeeping of one step: object positions still masked in x take this
    step's log-prob, committed ones keep theirs (lpf [B,T]); returns (lpf, score [B] = their sum)."""
    lp = token_logprob(logits, fb.obj)
    lpf = jnp.where((x == cfg.mask_token_id) & fb.obj_mask, lp, lpf)
    return lpf, jnp.sum(jnp.where(fb.obj_mask, lpf, 0.0), -1)


def _step(params, cfg, scfg, fb: FactBatch, sched, x, lpf, step, iv: Intervene, read: bool):
    """One traced denoising step: forward, object-log-prob bookkeeping, commit."""
    out = model.run(params, x, cfg, fb.pad_mask, iv, step)
    lpf, score = object_score(out.logits, x, lpf, fb, cfg)
    x_new = sampler.commit(out.logits, x, sched, step, jax.random.key(0), cfg, scfg)
    acts = jnp.stack([out.acts[m] for m in MODULES]) if read else None
    return x_new, lpf, score, acts


def _trajectory(params, fb: FactBatch, noise, cfg: ModelConfig, tcfg: TraceConfig, read: bool) -> Trajectory:
    scfg = tcfg.sampler
    sched = _schedule(fb, cfg, scfg)
    iv = Intervene(noise=noise, read_pos=fb.subj_pos if read else None)

    def body(carry, k):
        x, lpf = carry
        x_new, lpf_new, score, acts = _step(params, cfg, scfg, fb, sched, x, lpf, k, iv, read)
        return (x_new, lpf_new), (x, lpf, score, acts)

    init = (fb.x0, jnp.zeros(fb.x0.shape, jnp.float32))
    _, (xs, lpfs, scores, acts) = jax.lax.scan(body, init, jnp.arange(tcfg.steps, dtype=jnp.int32))
    return Trajectory(xs, lpfs, scores, acts)


trajectory = jax.jit(_trajectory, static_argnames=("cfg", "tcfg", "read"))
trajectory.__doc__ = """Run K traced steps. noise [B,T,D] or None; read=True records module outputs on S."""


def plan_lanes(n_layers: int, K: int, modules: Sequence[int] = (0, 1, 2),
               candidates: Optional[np.ndarray] = None) -> np.ndarray:
    """Pair candidates into lanes. Returns int32 [N, 6] rows (kA, lA, mA, kB, lB, mB); a candidate
    with layer -1 is a filler that never fires (when the steps k and K-1-k have unequal counts).
    candidates: int [C, 3] rows (module, layer, step) to run (default: every layer and step of
    `modules`)."""
    if candidates is None:
        cands = {k: [(l, m) for m in modules for l in range(n_layers)] for k in range(K)}
    else:
        cands = {k: [] for k in range(K)}
        for m, l, k in np.asarray(candidates, np.int64).reshape(-1, 3):
            if not (0 <= m < 3 and 0 <= l < n_layers and 0 <= k < K):
                raise ValueError(f"plan_lanes: candidate (module {m}, layer {l}, step {k}) outside 3 x {n_layers} x {K}")
            cands[int(k)].append((int(l), int(m)))
    lanes = []
    for kA in range((K + 1) // 2):
        kB = K - 1 - kA
        a = cands[kA]
        if kA == kB:
            if len(a) % 2:
                a = a + [(-1, 0)]
            half = len(a) // 2
            a, b = a[:half], a[half:]
        else:
            b = cands[kB]
            n = max(len(a), len(b))
            a, b = a + [(-1, 0)] * (n - len(a)), b + [(-1, 0)] * (n - len(b))
        lanes += [(kA, la, ma, kB, lb, mb) for (la, ma), (lb, mb) in zip(a, b)]
    return np.asarray(lanes, np.int32).reshape(-1, 6)


def traced_step(params, cfg, scfg, fb: FactBatch, sched, x, lpf, step, iv: Intervene):
    """The step the lanes run: (x, lpf, score) after one forward + bookkeeping + commit."""
    x, lpf, score, _ = _step(params, cfg, scfg, fb, sched, x, lpf, step, iv, False)
    return x, lpf, score


def _run_lanes(params, fb: FactBatch, noise, corr: Trajectory, clean_acts, lanes, cfg: ModelConfig,
               tcfg: TraceConfig, step_fn=traced_step):
    """Scores [N, K+1, B] of every lane's K+1 steps (see module docstring). step_fn (static) is
    `traced_step` or a variant with the same signature (benchmarks leave stages out with it)."""
    scfg, K = tcfg.sampler, tcfg.steps
    sched = _schedule(fb, cfg, scfg)

    def lane(row):
        kA, lA, mA, kB, lB, mB = (row[i] for i in range(6))
        seg = K - kA

        def body(carry, j):
            x, lpf = carry
            inA = j < seg
            restart = j == seg
            x = jnp.where(restart, corr.xs[jnp.minimum(kB, K - 1)], x)
            lpf = jnp.where(restart, corr.lpf[jnp.minimum(kB, K - 1)], lpf)
            start = jnp.where(inA, kA, kB)
            step = jnp.where(inA, kA + j, kB + j - seg)
            layer, mod = jnp.where(inA, lA, lB), jnp.where(inA, mA, mB)
            value = clean_acts[start, mod, jnp.maximum(layer, 0)]
            patch = Patch(layer=layer, step=start, module=mod, pos=fb.subj_pos, valid=fb.subj_valid, value=value)
            x, lpf, score = step_fn(params, cfg, scfg, fb, sched, x, lpf, step, Intervene(noise=noise, patch=patch))
            return (x, lpf), score

        _, scores = jax.lax.scan(body, (corr.xs[kA], corr.lpf[kA]), jnp.arange(K + 1, dtype=jnp.int32))
        return scores

    return jax.lax.map(lane, lanes, batch_size=tcfg.chunk)


run_lanes = jax.jit(_run_lanes, static_argnames=("cfg", "tcfg", "step_fn"))


class TraceResult(NamedTuple):
    """tie [B, 3, L, K, K]: TIE(l, k, m, k') indexed [fact, module, layer, k, k'-1] (NaN where k' <= k);
    tie_bar [B, 3, L, K] (Eq. 4); clean [B, K] and corrupted [R, B, K] scores s(k')."""

    tie: np.ndarray
    tie_bar: np.ndarray
    clean: np.ndarray
    corrupted: np.ndarray


def decay_weights(K: int, tau: float) -> np.ndarray:
    """w [K, K]: w[k, k'-1] ∝ exp(-tau (k' - k)) over k' = k+1..K, each row summing to 1."""
    w = np.zeros((K, K))
    for k in range(K):
        kp = np.arange(k + 1, K + 1)
        e = np.exp(-tau * (kp - k))
        w[k, kp - 1] = e / e.sum()
    return w


def embedding_noise(key, fb: FactBatch, params, sigma: float) -> jax.Array:
    """sigma * N(0, I) on the subject tokens' embeddings, zero elsewhere: [B, T, D]."""
    B, T = fb.x0.shape
    D = params["embed"].shape[1]
    on = jnp.zeros((B, T), bool).at[jnp.arange(B)[:, None], fb.subj_pos].max(fb.subj_valid)
    return jnp.where(on[..., None], sigma * jax.random.normal(key, (B, T, D), jnp.float32), 0.0)


def trace(params, cfg: ModelConfig, fb: FactBatch, tcfg: TraceConfig = TraceConfig(), progress=None,
          lanes_runner: Optional[Callable] = None, candidates: Optional[np.ndarray] = None) -> TraceResult:
    """Full TIE sweep over all (layer, step, module) for a batch of facts (Eqs. 2-4).

    Returns a TraceResult (NumPy). `progress(i, n)` is called after each noise draw when given.
    lanes_runner(params, fb, noise, corr, clean_acts, lanes [N,6] int32 NumPy) -> scores [N, K+1, B]
    replaces the one-device `run_lanes` (e.g. `sharding.LanesRunner(mesh, cfg, tcfg)` spreads the lanes over
    devices). A FactBatch without padding (all-True pad_mask) runs its forwards with no mask.
    candidates: int [C, 3] rows (module, layer, step) to run; the others are NaN in tie and tie_bar
    (default: all of them).
    """
    if fb.pad_mask is not None and bool(np.all(np.asarray(fb.pad_mask))):
        fb = dataclasses.replace(fb, pad_mask=None)
    K, L = tcfg.steps, cfg.n_layers
    sigma = tcfg.noise_scale * float(jnp.std(params["embed"].astype(jnp.float32)))
    clean = trajectory(params, fb, None, cfg=cfg, tcfg=tcfg, read=True)
    lanes = plan_lanes(L, K, candidates=candidates)
    B = fb.x0.shape[0]
    tie_sum = np.zeros((B, 3, L, K, K))
    ran = np.zeros((3, L, K), bool)
    corr_scores = []
    for r in range(tcfg.n_noise):
        noise = embedding_noise(jax.random.fold_in(jax.random.key(tcfg.seed), r), fb, params, sigma)
        corr = trajectory(params, fb, noise, cfg=cfg, tcfg=tcfg, read=False)
        if lanes_runner is None:
            scores = np.asarray(run_lanes(params, fb, noise, corr, clean.acts, jnp.asarray(lanes), cfg=cfg, tcfg=tcfg))
        else:
            scores = np.asarray(lanes_runner(params, fb, noise, corr, clean.acts, lanes))
        cs = np.asarray(corr.scores)  # [K, B]
        corr_scores.append(cs.T)
        for n, (kA, lA, mA, kB, lB, mB) in enumerate(lanes):
            seg = K - kA
            for j in range(K + 1):
                k, l, m = (kA, lA, mA) if j < seg else (kB, lB, mB)
                if l < 0:
                    continue
                ran[m, l, k] = True
                kp = (kA + j if j < seg else kB + j - seg) + 1  # this iteration yields s(k')
                tie_sum[:, m, l, k, kp - 1] += scores[n, j] - cs[kp - 1]
        if progress is not None:
            progress(r + 1, tcfg.n_noise)
    tie = tie_sum / tcfg.n_noise
    w = decay_weights(K, tcfg.tau)
    later = w > 0
    tie_bar = np.where(ran, np.sum(np.where(later, tie, 0.0) * w, axis=-1), np.nan)
    tie = np.where(later & ran[..., None], tie, np.nan)
    return TraceResult(tie, tie_bar, np.asarray(clean.scores).T, np.stack(corr_scores))


class Coordinate(NamedTuple):
    layer: int
    step: int     # -1 = apply at every denoising step
    module: int   # index into MODULES


def select(tie_bar: np.ndarray, neighbours: Optional[np.ndarray] = None, beta: float = 0.0,
           modules: Sequence[str] = ("resid",), k_star: Optional[int] = -1) -> tuple[Coordinate, np.ndarray]:
    """Eq. 5: argmax over (l, k, m) of E_F|TIE_bar| - beta E_N|TIE_bar|.

    tie_bar [F, 3, L, K] (forget facts), neighbours [N, 3, L, K] or None. `modules` restricts m
    (default resid, as the paper's headline); k_star = -1 returns step -1 (apply at every step, the
    default), None returns the argmax step. Returns (Coordinate, score [3, L, K])."""
    if tie_bar.ndim != 4 or tie_bar.shape[0] == 0:
        raise ValueError(f"select: tie_bar must be [F>0, 3, L, K], got {tie_bar.shape}")
    score = np.mean(np.abs(tie_bar), 0)
    if neighbours is not None and beta:
        score = score - beta * np.mean(np.abs(neighbours), 0)
    allowed = np.full(score.shape, -np.inf)
    for name in modules:
        allowed[MODULES.index(name)] = 0.0
    m, l, k = np.unravel_index(np.argmax(score + allowed), score.shape)
    return Coordinate(int(l), -1 if k_star == -1 else int(k if k_star is None else k_star), int(m)), score


def plot_heatmaps(tie_bar_mean: np.ndarray, path: str, title: str = "") -> None:
    """Layer x step heatmaps of mean TIE_bar, one panel per module ([3, L, K] input), saved as PNG."""
    fig = Figure(figsize=(12, 4), layout="constrained")  # no pyplot: no global backend state
    axes = fig.subplots(1, 3)
    vmax = float(np.nanmax(np.abs(tie_bar_mean))) or 1.0
    for ax, m in zip(axes, range(3)):
        im = ax.imshow(tie_bar_mean[m], origin="lower", aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(MODULES[m])
        ax.set_xlabel("denoising step k")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes, label="mean TIE (nats)")
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
