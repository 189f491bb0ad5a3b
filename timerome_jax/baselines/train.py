"""One optax training loop for every gradient unlearning baseline (the paper's stabilised protocol).

    adamw (weight decay 0.01) after global-norm gradient clipping at 1.0,
    a retain-NLL anchor (weight `retain_weight`, on calibration rows only),
    early stop when the RetainLP of held-out calibration rows drifts down by >= 5 nats from its
    value before training; the parameters of the last check still inside the bound are returned.

The paper (Section IV.D, Fig. 5): "LoRA-NPO and LoRA-SimNPO with retain-NLL anchor, grad clip 1.0,
and early-stop when retain LP drifts >= 5 nats".

Parameters: `mode="lora"` trains an adapter (`baselines/lora.py`, its own pytree; the base weights
are untouched) on `targets`; `mode="full"` trains the chosen layer matrices themselves (a copy;
`train_layers` restricts the update to some layers, as RMU updates layers l-2..l only).

One jitted train step, compiled once per (model config, TrainConfig): every batch has the same
shape (rows padded to one length, fixed batch sizes), keys and data are arguments. `TRACES` counts
traces (tests check it stays at 1 across steps). Deterministic for a seed: the batch order comes
from numpy's PCG64(seed) and the masks from jax.random.PRNGKey(seed) folded with the step.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from timerome_jax.backbone import model
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.backbone.tokenizer import eos_or_default
from timerome_jax.baselines import lora
from timerome_jax.baselines import losses as L
from timerome_jax.diffusion import likelihood
from timerome_jax.io import write_json
from timerome_jax.tofu import data as tofu

OBJECTIVES = ("ga", "gd", "npo", "simnpo", "rmu", "mdu")
TRACES: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters (hashable: a static jit argument).

    objective: one of OBJECTIVES. steps: optimizer steps at most. lr, weight_decay, clip: adamw and
    global-norm clipping. batch_size / retain_batch_size: forget / anchor rows per step (capped at
    the rows available). retain_weight: weight of the retain-NLL anchor (0 = unanchored).
    beta, delta: NPO / SimNPO. tau: MDU temperature. rmu_layer (None = n_layers // 2), rmu_beta
    (Adaptive-RMU's c = beta ||h||), rmu_alpha (retain activation-matching weight).
    mode "lora" | "full"; targets: layer matrices trained (lora.MATRICES); train_layers: layers
    updated in full mode (None = all); lora_rank, lora_alpha (scale = alpha / rank, None = 1).
    eps: minimum masking rate. max_drift: early-stop bound on the RetainLP drop (nats; None = off);
    monitor_every: steps between checks; monitor_rows, monitor_n_mc: held-out anchor rows and MC
    samples of that check. length_bucket: row length rounded up to a multiple of it.
    """

    objective: str = "npo"
    steps: int = 20
    lr: float = 1e-4
    weight_decay: float = 0.01
    clip: float = 1.0
    batch_size: int = 8
    retain_batch_size: int = 8
    retain_weight: float = 1.0
    beta: float = 0.1
    delta: float = 0.0
    tau: float = 1.0
    rmu_layer: Optional[int] = None
    rmu_beta: float = 5.0
    rmu_alpha: float = 1200.0
    mode: str = "lora"
    targets: tuple = lora.DEFAULT_TARGETS
    train_layers: Optional[tuple] = None
    lora_rank: int = 8
    lora_alpha: Optional[float] = None
    eps: float = L.DEFAULT_EPS
    max_drift: Optional[float] = 5.0
    monitor_every: int = 5
    monitor_rows: int = 16
    monitor_n_mc: int = 4
    length_bucket: int = 32

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.mode not in ("lora", "full"):
            raise ValueError(f"TrainConfig.mode must be 'lora' or 'full', got {self.mode!r}")
        bad = [t for t in self.targets if t not in lora.MATRICES]
        if bad or not self.targets:
            raise ValueError(f"TrainConfig.targets {bad or self.targets} must be among {lora.MATRICES}")
        if self.steps < 0 or self.batch_size < 1 or self.retain_batch_size < 1 or self.monitor_every < 1:
            raise ValueError("TrainConfig: steps >= 0, batch sizes >= 1 and monitor_every >= 1 required")
        if not self.lr > 0 or self.clip <= 0:
            raise ValueError(f"TrainConfig: lr and clip must be > 0, got {self.lr}, {self.clip}")


@dataclasses.dataclass
class TrainResult:
    """params: the trained model (base + merged adapter in LoRA mode; a new tree, the input is not
    modified). adapter: the LoRA adapter (None in full mode). log: one dict per step and per check.
    info: steps_run, stopped_early, retain_lp0 / retain_lp_final, compile_s, step_s (median)."""

    params: Any
    adapter: Optional[dict]
    log: list
    info: dict


# ------------------------------------------------------------------------------------------ data


def encode_rows(rows: Sequence[dict], tokenizer, cfg: ModelConfig, length_bucket: int = 32,
                max_len: Optional[int] = None) -> L.QA:
    """TOFU rows -> QA arrays: prompt = format_prompt(question), answer = encode(answer) + [eos]
    (as the evaluation scores them), right-padded to one length (bucketed, <= cfg.max_seq_len)."""
    if not rows:
        raise ValueError("encode_rows: no rows")
    eos = eos_or_default(tokenizer, cfg)
    prompts = [list(tokenizer.encode(tofu.format_prompt(r["question"]))) for r in rows]
    answers = [list(tokenizer.encode(r["answer"])) + [eos] for r in rows]
    longest = max(len(p) + len(a) for p, a in zip(prompts, answers))
    T = min(int(math.ceil(longest / length_bucket) * length_bucket), cfg.max_seq_len)
    if max_len is not None:
        T = max_len
    toks, am, pm = likelihood.make_qa_batch(prompts, answers, cfg, max_len=T)
    return L.QA(toks, am, pm)


def _take(qa: L.QA, idx) -> L.QA:
    return jax.tree.map(lambda a: a[idx], qa)


# ------------------------------------------------------------------------------------ parameters


def split_trainable(params, key, tcfg: TrainConfig):
    """(trainable pytree, frozen base). LoRA: a fresh adapter; full: copies of the target matrices."""
    if tcfg.mode == "lora":
        return lora.init(key, params, tcfg.lora_rank, tcfg.targets, tcfg.lora_alpha), params
    missing = [t for t in tcfg.targets if t not in model.layer_shapes(params)]
    if missing:
        raise ValueError(f"full fine-tuning targets {missing} are not in the model's layer params")
    # [L, ...] copies in either params layout (unstacked: one jnp.stack per target), so optax and
    # the per-layer update mask see one array per target
    return {t: jnp.array(model.stacked_weight(params, t), copy=True) for t in tcfg.targets}, params


def combine(trainable, base, tcfg: TrainConfig):
    """The params a forward uses: base + merged adapter (lora) or base with the trained matrices."""
    if tcfg.mode == "lora":
        return lora.merge(base, trainable)
    return model.with_stacked_weights(base, trainable)


def layer_mask_for(trainable, n_layers: int, tcfg: TrainConfig):
    """Per-leaf 0/1 multipliers [L,1,..] of the updates (full mode with train_layers), else None."""
    if tcfg.mode != "full" or tcfg.train_layers is None:
        return None
    on = np.zeros(n_layers, np.float32)
    on[list(tcfg.train_layers)] = 1.0
    return jax.tree.map(lambda a: jnp.asarray(on).reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype), trainable)


def optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip) then adamw(lr, weight_decay)."""
    return optax.chain(optax.clip_by_global_norm(tcfg.clip), optax.adamw(tcfg.lr, weight_decay=tcfg.weight_decay))


# ------------------------------------------------------------------------------------------ loss


def _acts(params, tokens, pad_mask, cfg, layer: int):
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out = model.run(params, tokens, cfg, pad_mask, Intervene(read_pos=pos), stop_layer=layer)
    return out.acts["resid"][layer]


def rmu_direction(seed: int, d_model: int) -> jax.Array:
    """RMU's fixed random direction: u ~ U[0,1)^D normalised (Li et al. 2024), from `seed`."""
    u = jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(seed), 7919), (d_model,), jnp.float32)
    return u / jnp.linalg.norm(u)


def loss_fn(trainable, base, ref, bf: L.QA, br: L.QA, key, u, cfg: ModelConfig, tcfg: TrainConfig):
    """The objective's loss on one forget batch bf and one anchor batch br -> (loss, aux dict).

    ref: the frozen reference params (NPO reference, MDU anchor, RMU frozen activations)."""
    params = combine(trainable, base, tcfg)
    kf, kr = jax.random.split(key)
    mf, pf = L.diffusion_mask(kf, bf.answer_mask, tcfg.eps)
    xf = L.noisy_tokens(bf.tokens, mf, cfg.mask_token_id)
    aux = {}
    obj = tcfg.objective
    if obj == "rmu":
        layer = cfg.n_layers // 2 if tcfg.rmu_layer is None else tcfg.rmu_layer
        mr, _ = L.diffusion_mask(kr, br.answer_mask, tcfg.eps)
        xr = L.noisy_tokens(br.tokens, mr, cfg.mask_token_id)
        h_f = _acts(params, xf, bf.pad_mask, cfg, layer)
        h_r = _acts(params, xr, br.pad_mask, cfg, layer)
        h_f0 = jax.lax.stop_gradient(_acts(ref, xf, bf.pad_mask, cfg, layer))
        h_r0 = jax.lax.stop_gradient(_acts(ref, xr, br.pad_mask, cfg, layer))
        forget, f_term, r_term = L.rmu_loss(h_f, h_f0, bf.pad_mask, h_r, h_r0, br.pad_mask, u,
                                            tcfg.rmu_beta, tcfg.rmu_alpha)
        aux.update(rmu_forget=f_term, rmu_retain=r_term)
    else:
        logits = model.forward(params, xf, cfg, bf.pad_mask)
        nll_f, n_f = L.nll_terms(logits, bf.tokens, mf, pf, bf.answer_mask)
        aux["forget_nll_tok"] = jnp.mean(nll_f / n_f)
        if obj in ("ga", "gd"):
            forget = L.ga_loss(nll_f, n_f)
        elif obj == "npo":
            ref_logits = jax.lax.stop_gradient(model.forward(ref, xf, cfg, bf.pad_mask))
            nll_ref, _ = L.nll_terms(ref_logits, bf.tokens, mf, pf, bf.answer_mask)
            forget = L.npo_loss(nll_f, nll_ref, tcfg.beta)
        elif obj == "simnpo":
            forget = L.simnpo_loss(nll_f, n_f, tcfg.beta, tcfg.delta)
        else:  # mdu
            anchor_in = L.null_prompt(xf, bf.answer_mask, bf.pad_mask, cfg.mask_token_id)
            anchor = jax.lax.stop_gradient(model.forward(ref, anchor_in, cfg, bf.pad_mask))
            forget = L.mdu_loss(logits, anchor, mf, tcfg.tau)
    total = forget
    if tcfg.retain_weight > 0:
        mr, pr = L.diffusion_mask(jax.random.fold_in(kr, 1), br.answer_mask, tcfg.eps)
        xr = L.noisy_tokens(br.tokens, mr, cfg.mask_token_id)
        nll_r, n_r = L.nll_terms(model.forward(params, xr, cfg, br.pad_mask), br.tokens, mr, pr, br.answer_mask)
        anchor_term = L.retain_nll(nll_r, n_r)
        total = total + tcfg.retain_weight * anchor_term
        aux["retain_nll_tok"] = anchor_term
    aux["forget_loss"] = forget
    return total, aux


def _step_impl(trainable, opt_state, base, ref, bf, br, key, u, layer_mask, cfg, tcfg):
    TRACES["step"] += 1  # runs at trace time only
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, base, ref, bf, br, key, u, cfg, tcfg)
    updates, opt_state = optimizer(tcfg).update(grads, opt_state, trainable)
    if layer_mask is not None:
        updates = jax.tree.map(lambda a, m: a * m, updates, layer_mask)
    trainable = optax.apply_updates(trainable, updates)
    aux = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))
    return trainable, opt_state, aux


train_step = jax.jit(_step_impl, static_argnames=("cfg", "tcfg"))


# ---------------------------------------------------------------------------------------- monitor


def _mean_elbo(params, cfg, qa: L.QA, n_mc: int, seed: int) -> float:
    ll = likelihood.elbo(params, cfg, qa.tokens, qa.answer_mask, qa.pad_mask, jax.random.PRNGKey(seed + 1_000_003),
                         n_mc=n_mc, estimator="llada" if not cfg.logits_shift else "dream")
    return float(jnp.mean(ll))


_combine_jit = jax.jit(combine, static_argnames=("tcfg",))


# ------------------------------------------------------------------------------------------ loop


def train(params, cfg: ModelConfig, tokenizer, forget_rows: Sequence[dict], retain_rows: Sequence[dict],
          tcfg: TrainConfig = TrainConfig(), seed: int = 0, progress: bool = True, log_path=None) -> TrainResult:
    """Run `tcfg.objective` on forget_rows with anchors from retain_rows (calibration rows only:
    the first `monitor_rows` are the held-out early-stop check, the rest the retain-NLL / RMU
    anchor batch). Returns a `TrainResult`; writes the JSON log to `log_path` if given."""
    if not forget_rows:
        raise ValueError("train: the forget set is empty")
    n_mon = min(tcfg.monitor_rows, max(len(retain_rows) - 1, 0))
    mon_rows, anchor_rows = list(retain_rows[:n_mon]), list(retain_rows[n_mon:])
    needs_anchor = tcfg.retain_weight > 0 or tcfg.objective == "rmu"
    if needs_anchor and not anchor_rows:
        raise ValueError(f"train: objective {tcfg.objective!r} with retain_weight={tcfg.retain_weight} needs "
                         f"retain rows beyond the {n_mon} early-stop rows, got {len(retain_rows)}")
    fq = encode_rows(forget_rows, tokenizer, cfg, tcfg.length_bucket)
    rq = encode_rows(anchor_rows or list(forget_rows), tokenizer, cfg, tcfg.length_bucket)
    mq = encode_rows(mon_rows, tokenizer, cfg, tcfg.length_bucket) if (mon_rows and tcfg.max_drift is not None) else None
    nf, nr = fq.tokens.shape[0], rq.tokens.shape[0]
    bf_n, br_n = min(tcfg.batch_size, nf), min(tcfg.retain_batch_size, nr)

    key = jax.random.PRNGKey(seed)
    k_init, k_steps = jax.random.split(key)
    trainable, base = split_trainable(params, k_init, tcfg)
    ref = params
    opt_state = optimizer(tcfg).init(trainable)
    layer_mask = layer_mask_for(trainable, cfg.n_layers, tcfg)
    u = rmu_direction(seed, cfg.d_model)
    rng = np.random.Generator(np.random.PCG64(seed))
    order_f, order_r = rng.permutation(nf), rng.permutation(nr)

    def batch_idx(order, n, b, s):
        return np.asarray([order[(s * b + i) % n] for i in range(b)])

    log: list[dict] = []
    lp0 = _mean_elbo(params, cfg, mq, tcfg.monitor_n_mc, seed) if mq is not None else None
    if lp0 is not None:
        log.append({"check": 0, "retain_lp": lp0, "drift": 0.0})
    good, good_step, stopped, steps_run = trainable, 0, False, 0
    step_s, compile_s = [], None
    bar = tqdm(range(tcfg.steps), desc=f"{tcfg.objective} ({tcfg.mode})", disable=not progress, leave=False)
    for s in bar:
        bf = _take(fq, batch_idx(order_f, nf, bf_n, s))
        br = _take(rq, batch_idx(order_r, nr, br_n, s))
        t0 = time.perf_counter()
        trainable, opt_state, aux = train_step(trainable, opt_state, base, ref, bf, br,
                                               jax.random.fold_in(k_steps, s), u, layer_mask, cfg=cfg, tcfg=tcfg)
        aux = {k: float(v) for k, v in jax.device_get(aux).items()}
        dt = time.perf_counter() - t0
        if s == 0:
            compile_s = dt
        else:
            step_s.append(dt)
        steps_run = s + 1
        if not all(math.isfinite(v) for v in aux.values()):
            log.append({"step": s + 1, "nonfinite": True, **aux})
            stopped = True
            break
        log.append({"step": s + 1, "seconds": dt, **aux})
        if mq is None:
            good, good_step = trainable, s + 1
        bar.set_postfix(loss=f"{aux['loss']:.3g}")
        if mq is not None and ((s + 1) % tcfg.monitor_every == 0 or s + 1 == tcfg.steps):
            lp = _mean_elbo(_combine_jit(trainable, base, tcfg), cfg, mq, tcfg.monitor_n_mc, seed)
            drift = lp0 - lp
            log.append({"check": s + 1, "retain_lp": lp, "drift": drift})
            if drift >= tcfg.max_drift:
                stopped = True
                break
            good, good_step = trainable, s + 1
    bar.close()
    final = good if stopped else trainable
    if not stopped:
        good_step = steps_run
    out_params = combine(final, base, tcfg)
    info = {"objective": tcfg.objective, "mode": tcfg.mode, "steps_run": steps_run, "steps_kept": good_step,
            "stopped_early": stopped, "retain_lp0": lp0, "compile_s": compile_s,
            "step_s": float(np.median(step_s)) if step_s else compile_s,
            "n_forget": nf, "n_anchor": nr, "n_monitor": n_mon, "seq_len": int(fq.tokens.shape[1]),
            "trainable_params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(
                (final["A"], final["B"]) if tcfg.mode == "lora" else final))),
            "config": dataclasses.asdict(tcfg), "seed": seed}
    if log_path is not None:
        write_json(log_path, {"info": info, "log": log})
    return TrainResult(out_params, final if tcfg.mode == "lora" else None, log, info)
