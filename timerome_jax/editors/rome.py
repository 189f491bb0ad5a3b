"""ROME on a masked diffusion LM: one rank-1 update of one MLP down projection per fact.

Update rule (Meng et al., 2022, "Locating and Editing Factual Associations in GPT", Eq. 2; the
official kmeng01/rome `compute_u` / `compute_v` / `apply_rome_to_model`): with W the down
projection (out = k W, W [F,D]), C = E[k k^T] the key second moment over generic text, k* the key
at the subject's last token and v* the value to write there,

    W' = W + (C^{-1} k*) (v* - W^T k*)^T / (k*^T C^{-1} k*),

the minimum-C-norm change with k*^T W' = v*. It is rank 1 by construction.

MDLM adaptation: k* is the key averaged over partially unmasked answer states (as ROME averages
it over random prefixes); v* = W^T k* + delta, with delta optimised by `states.optimise_delta` on
the MLP output at the subject's last token over such states (Park & Jo's recipe for MDLMs). The
target is the refusal text (TimeROME's default "I don't know."). Several facts are edited one
after another at the same layer (sequential ROME), each update solved on the current W; the keys
are upstream of W, so they are computed once.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from timerome_jax.editors import states as S
from timerome_jax.editors.covariance import DEFAULT_CACHE, key_second_moment, retain_rows
from timerome_jax.editors.locate import ar_positional_layer
from timerome_jax.editors.weights import add_to_w_down, task_batch, w_down
from timerome_jax.method.capture import DEFAULT_TARGET_TEXT
from timerome_jax.methods import EditTask, Prepared, register


def rome_update(W: np.ndarray, C: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ROME's rank-1 update Delta [F,D] of W [F,D] (out = k W) that maps key k [F] to value v [D]
    with the least change in the C-norm (C [F,F] symmetric positive definite). float64."""
    W, C, k, v = (np.asarray(a, np.float64) for a in (W, C, k, v))
    if C.shape != (W.shape[0],) * 2 or k.shape != (W.shape[0],) or v.shape != (W.shape[1],):
        raise ValueError(f"rome_update: W {W.shape}, C {C.shape}, k {k.shape}, v {v.shape} do not fit")
    u = np.linalg.solve(C, k)
    r = v - k @ W
    return np.outer(u, r) / (k @ u)


def regularised(C: np.ndarray, ridge: float) -> np.ndarray:
    """C + ridge * mean(diag C) I: keeps a key second moment estimated from few tokens invertible."""
    return C + ridge * np.mean(np.diag(C)) * np.eye(C.shape[0])


@register("rome")
def rome(task: EditTask, layer: Optional[int] = None, target_text: str = DEFAULT_TARGET_TEXT,
         steps: int = 40, lr: float = 0.3, n_draws: int = 4, t_min: float = 0.1, weight_decay: float = 1e-3,
         clamp: float = 4.0, key_draws: int = 8, cov_rows: int = 256, cov_ridge: float = 1e-4,
         cache_dir=DEFAULT_CACHE) -> Prepared:
    """Sequential ROME over the task's forget rows. layer None: `locate.ar_positional_layer`.
    Returns `Prepared(params=edited copy, info={layer, n_facts, loss_first, loss_last, ...})`."""
    facts, batch = task_batch(task, target_text)
    if layer is None:
        layer = ar_positional_layer(task.params, task.cfg, facts, seed=task.seed)
    layer = int(layer)
    C, n_tok = key_second_moment(task.params, task.cfg, task.tokenizer, layer, retain_rows(task, cov_rows),
                                   cache_dir=cache_dir)
    C = regularised(C, cov_ridge)
    K = S.mean_over_states(task.params, task.cfg, batch, layer, "key", n_draws=key_draws, t_min=t_min, seed=task.seed)
    W0 = w_down(task.params, layer)
    dcfg = S.DeltaConfig(steps, lr, n_draws, t_min, weight_decay, clamp)
    d, opt = S.optimise_delta(task.params, task.cfg, batch, layer, "mlp", dcfg, seed=task.seed, h0=K @ W0)
    V = K @ W0 + d
    W = W0.copy()
    for i in range(len(facts)):
        W = W + rome_update(W, C, K[i], V[i])
    edited = add_to_w_down(task.params, layer, W - W0)
    info = {"layer": layer, "n_facts": len(facts), "cov_tokens": n_tok, "loss_first": opt["loss_first"],
            "loss_last": opt["loss_last"], "delta_norm": float(np.linalg.norm(d, axis=-1).mean()),
            "value_residual": float(np.abs(K @ W - V).max())}
    return Prepared("rome", params=edited, info=info)
