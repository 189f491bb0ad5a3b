"""MEMIT on a masked diffusion LM: a batch of facts spread over a band of MLP layers.

Update rule (Meng et al., 2023, "Mass-Editing Memory in a Transformer", Eqs. 14-16 and Alg. 1;
official kmeng01/memit `execute_memit`): for the target hidden states z_i at the residual stream of
the band's last layer L (found by optimising a delta there), go through the band l = l_1 .. L in
order; at each layer take the keys K [N,F] (w_down inputs at the subject's last token, on the
params edited so far) and the residuals R = (z - h_L(current params)) / (L - l + 1) [N,D], and add

    Delta_l = (lam C_l + K^T K)^{-1} K^T R            (row layout, out = k W, W [F,D])

the solution of min_Delta ||K (W + Delta) - (K W + R)||^2 + lam tr(Delta^T C_l Delta) (C_l = the key
second moment E[k k^T] from generic text, lam = MEMIT's mom2_update_weight).

MDLM adaptation as in `rome`: keys and hidden states are averaged over partially unmasked answer
states, and the delta behind z is optimised over such states (`states.optimise_delta`).
`band_update` is shared with AlphaEdit, which only swaps the per-layer solve.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from timerome_jax.editors import states as S
from timerome_jax.editors.covariance import DEFAULT_CACHE, key_second_moment, retain_rows
from timerome_jax.editors.locate import ar_positional_layer
from timerome_jax.editors.weights import add_to_w_down, task_batch
from timerome_jax.method.capture import DEFAULT_TARGET_TEXT
from timerome_jax.methods import EditTask, Prepared, register


def memit_solve(K: np.ndarray, R: np.ndarray, C: np.ndarray, lam: float) -> np.ndarray:
    """Delta [F,D] = (lam C + K^T K)^{-1} K^T R for keys K [N,F], residuals R [N,D], C [F,F]; float64."""
    K, R, C = (np.asarray(a, np.float64) for a in (K, R, C))
    if K.shape[0] != R.shape[0] or C.shape != (K.shape[1],) * 2:
        raise ValueError(f"memit_solve: K {K.shape}, R {R.shape}, C {C.shape} do not fit")
    return np.linalg.solve(lam * C + K.T @ K, K.T @ R)


def default_band(layer: int, width: int = 3) -> tuple[int, ...]:
    """`width` consecutive layers ending at `layer` (clipped at 0): MEMIT's band below its z layer."""
    return tuple(range(max(0, layer - width + 1), layer + 1))


def band_update(params, cfg, batch: S.EditBatch, layers: Sequence[int], z: np.ndarray,
                solve: Callable[[int, np.ndarray, np.ndarray], np.ndarray], key_draws: int = 8,
                t_min: float = 0.1, seed: int = 0):
    """Spread the change h_L -> z (z [N,D] at the resid of the band's last layer) over `layers`
    (ascending) with `solve(layer, K [N,F], R [N,D]) -> Delta [F,D]`. Returns (edited params, info)."""
    layers = sorted(int(l) for l in layers)
    L = layers[-1]
    info = []
    for j, l in enumerate(layers):
        K = S.mean_over_states(params, cfg, batch, l, "key", n_draws=key_draws, t_min=t_min, seed=seed)
        h = S.mean_over_states(params, cfg, batch, L, "hidden", "resid", n_draws=key_draws, t_min=t_min, seed=seed)
        R = (z - h) / (len(layers) - j)
        delta = solve(l, K, R)
        params = add_to_w_down(params, l, delta)
        info.append({"layer": l, "residual_norm": float(np.linalg.norm(R, axis=-1).mean()),
                     "update_fro": float(np.linalg.norm(delta))})
    h = S.mean_over_states(params, cfg, batch, L, "hidden", "resid", n_draws=key_draws, t_min=t_min, seed=seed)
    return params, {"per_layer": info, "final_gap": float(np.linalg.norm(z - h, axis=-1).mean())}


def target_z(task: EditTask, batch: S.EditBatch, layer: int, steps, lr, n_draws, t_min, weight_decay, clamp,
             key_draws):
    """z [N,D] = h (resid of `layer` at the key position, averaged over states) + the optimised delta."""
    h = S.mean_over_states(task.params, task.cfg, batch, layer, "hidden", "resid", n_draws=key_draws, t_min=t_min,
                           seed=task.seed)
    dcfg = S.DeltaConfig(steps, lr, n_draws, t_min, weight_decay, clamp)
    d, opt = S.optimise_delta(task.params, task.cfg, batch, layer, "resid", dcfg, seed=task.seed, h0=h)
    return h + d, opt


@register("memit")
def memit(task: EditTask, layers: Optional[Sequence[int]] = None, target_text: str = DEFAULT_TARGET_TEXT,
          lam: float = 1e4, steps: int = 40, lr: float = 0.3, n_draws: int = 4, t_min: float = 0.1,
          weight_decay: float = 1e-3, clamp: float = 0.75, key_draws: int = 8, cov_rows: int = 256,
          cache_dir=DEFAULT_CACHE) -> Prepared:
    """MEMIT over the task's forget rows. layers None: `default_band` ending at
    `locate.ar_positional_layer`. lam: weight of the key second moment (mom2_update_weight).
    clamp 0.75: MEMIT's clamp_norm_factor (the z delta's norm relative to h)."""
    facts, batch = task_batch(task, target_text)
    if layers is None:
        layers = default_band(ar_positional_layer(task.params, task.cfg, facts, seed=task.seed))
    layers = tuple(sorted(int(l) for l in layers))
    z, opt = target_z(task, batch, layers[-1], steps, lr, n_draws, t_min, weight_decay, clamp, key_draws)
    covs = {l: key_second_moment(task.params, task.cfg, task.tokenizer, l, retain_rows(task, cov_rows),
                                   cache_dir=cache_dir)[0]
            for l in layers}
    edited, binfo = band_update(task.params, task.cfg, batch, layers, z,
                                lambda l, K, R: memit_solve(K, R, covs[l], lam), key_draws, t_min, task.seed)
    info = {"layers": list(layers), "n_facts": len(facts), "lam": lam, "loss_first": opt["loss_first"],
            "loss_last": opt["loss_last"], **binfo}
    return Prepared("memit", params=edited, info=info)
