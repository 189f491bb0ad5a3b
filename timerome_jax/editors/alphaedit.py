"""AlphaEdit on a masked diffusion LM: MEMIT's band update projected onto the null space of the
preserved keys.

Update rule (Fang et al., 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language
Models", Eqs. 10-14; official jianghoucheng/AlphaEdit `AlphaEdit_main`): with K0 the keys of
knowledge to preserve and P the projector onto the null space of K0 K0^T (eigenvectors whose
eigenvalue falls below a threshold), the per-layer update in our row layout (out = k W, W [F,D]) is

    Delta = (P (K^T K + Kp^T Kp) + lam I)^{-1} P K^T R

with K [N,F] / R [N,D] the keys and residuals of this batch (as in MEMIT) and Kp the keys of earlier
edits (none here: one batch). Delta = P Y for some Y (from lam Delta = P (K^T R - (K^T K + Kp^T Kp)
Delta)), so k0 Delta = 0 for every k0 in the preserved span: the outputs of preserved keys do not move.

The preserved second moment is the retain-text key moment of `covariance` (TOFU calibration rows).
The threshold is relative here (eigenvalue <= rel * largest), so it means the same on any model;
the official code uses an absolute one on its own statistics.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from timerome_jax.editors.covariance import DEFAULT_CACHE, key_second_moment, retain_rows
from timerome_jax.editors.locate import ar_positional_layer
from timerome_jax.editors.memit import band_update, default_band, target_z
from timerome_jax.editors.weights import task_batch
from timerome_jax.method.capture import DEFAULT_TARGET_TEXT
from timerome_jax.methods import EditTask, Prepared, register


def null_space_projector(C0: np.ndarray, rel_threshold: float = 1e-2) -> np.ndarray:
    """P [F,F] = U U^T over the eigenvectors of C0 [F,F] (symmetric PSD) whose eigenvalue is at most
    rel_threshold * the largest one. float64."""
    C0 = np.asarray(C0, np.float64)
    w, U = np.linalg.eigh((C0 + C0.T) / 2)
    keep = w <= rel_threshold * max(w.max(), 0.0)
    U = U[:, keep]
    return U @ U.T


def alphaedit_solve(K: np.ndarray, R: np.ndarray, P: np.ndarray, lam: float,
                    Kp: Optional[np.ndarray] = None) -> np.ndarray:
    """Delta [F,D] = (P (K^T K + Kp^T Kp) + lam I)^{-1} P K^T R; float64."""
    K, R, P = (np.asarray(a, np.float64) for a in (K, R, P))
    A = K.T @ K
    if Kp is not None:
        A = A + np.asarray(Kp, np.float64).T @ np.asarray(Kp, np.float64)
    return np.linalg.solve(P @ A + lam * np.eye(P.shape[0]), P @ K.T @ R)


@register("alphaedit")
def alphaedit(task: EditTask, layers: Optional[Sequence[int]] = None, target_text: str = DEFAULT_TARGET_TEXT,
              lam: float = 10.0, null_threshold: float = 1e-2, steps: int = 40, lr: float = 0.3, n_draws: int = 4,
              t_min: float = 0.1, weight_decay: float = 1e-3, clamp: float = 0.75, key_draws: int = 8,
              cov_rows: int = 256, cache_dir=DEFAULT_CACHE) -> Prepared:
    """AlphaEdit over the task's forget rows (same band and z as `memit`). lam: AlphaEdit's L2 term
    (relative to the keys' scale: it is multiplied by the mean squared key norm of the batch)."""
    facts, batch = task_batch(task, target_text)
    if layers is None:
        layers = default_band(ar_positional_layer(task.params, task.cfg, facts, seed=task.seed))
    layers = tuple(sorted(int(l) for l in layers))
    z, opt = target_z(task, batch, layers[-1], steps, lr, n_draws, t_min, weight_decay, clamp, key_draws)
    proj, kept = {}, {}
    for l in layers:
        C0, _ = key_second_moment(task.params, task.cfg, task.tokenizer, l, retain_rows(task, cov_rows),
                                   cache_dir=cache_dir)
        proj[l] = null_space_projector(C0, null_threshold)
        kept[l] = int(round(np.trace(proj[l])))

    def solve(l, K, R):
        return alphaedit_solve(K, R, proj[l], lam * float(np.mean(np.sum(K * K, -1))))

    edited, binfo = band_update(task.params, task.cfg, batch, layers, z, solve, key_draws, t_min, task.seed)
    info = {"layers": list(layers), "n_facts": len(facts), "lam": lam, "null_dims": kept,
            "loss_first": opt["loss_first"], "loss_last": opt["loss_last"], **binfo}
    return Prepared("alphaedit", params=edited, info=info)
