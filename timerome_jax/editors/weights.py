"""What every weight editor shares: the edit task as an `EditBatch`, copy-on-write updates of one
MLP down projection, and saving / loading / diffing an edited params pytree.

Rules: an editor never mutates the params it is given. JAX arrays are immutable, and the edited
tree shares every untouched leaf with the original (no copy of the embedding or other layers);
only `layers.w_down` is a new array. `save_params`/`load_params` write and read a flat .npz
(keys = pytree paths), `diff_params` reports which leaves differ and by how much.
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from timerome_jax.backbone import model
from timerome_jax.backbone.tokenizer import eos_or_default
from timerome_jax.editors.states import EditBatch, edit_batch
from timerome_jax.io import atomic_path
from timerome_jax.method import facts as F
from timerome_jax.method.capture import DEFAULT_TARGET_TEXT


def task_batch(task, target_text: Union[str, Sequence[str]] = DEFAULT_TARGET_TEXT) -> tuple[list, EditBatch]:
    """Facts of `task.forget_rows` (subject key positions, or the question's when a row names no
    subject) and their `EditBatch` with target = encode(target_text) + [eos] (one text or one per row)."""
    eos = eos_or_default(task.tokenizer, task.cfg)
    facts = F.make_facts(task.tokenizer, task.forget_rows, eos)
    texts = [target_text] * len(facts) if isinstance(target_text, str) else [target_text[f.index] for f in facts]
    targets = [list(task.tokenizer.encode(t)) + [int(eos)] for t in texts]
    return facts, edit_batch(facts, targets, task.cfg)


def w_down(params, layer: int) -> np.ndarray:
    """W [F,D] float64: layer `layer`'s MLP down projection (out = k @ W)."""
    return np.asarray(model.layer_weight(params, "w_down", layer), np.float64)


def add_to_w_down(params, layer: int, delta: np.ndarray):
    """A new params tree (same layout) with layers.w_down[layer] += delta [F,D]; every other leaf is
    shared."""
    W = model.layer_weight(params, "w_down", layer)
    if tuple(delta.shape) != tuple(W.shape):
        raise ValueError(f"add_to_w_down: delta {delta.shape} does not match w_down[{layer}] {tuple(W.shape)}")
    return model.with_layer_weight(params, "w_down", layer, W + jnp.asarray(delta, W.dtype))


def _flat(params) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def save_params(params, path: Union[str, os.PathLike]) -> None:
    """Write params as one .npz (keys are pytree paths such as "['layers']['w_down']"), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **_flat(params))


def load_params(path: Union[str, os.PathLike], like) -> dict:
    """Read a `save_params` file into the structure of `like` (a params tree of the same model);
    a clear error names a missing key or a shape mismatch."""
    with np.load(path) as z:
        leaves = []
        for p, ref in jax.tree_util.tree_flatten_with_path(like)[0]:
            k = jax.tree_util.keystr(p)
            if k not in z:
                raise ValueError(f"load_params: {path} has no entry {k}")
            if z[k].shape != np.shape(ref):
                raise ValueError(f"load_params: {path} entry {k} has shape {z[k].shape}, expected {np.shape(ref)}")
            leaves.append(jnp.asarray(z[k]))
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def numerical_rank(d: np.ndarray, rel: float = 1e-3) -> int:
    """Number of singular values of d above rel * the largest (float32 storage puts rounding noise
    ~1e-7 relative to the weights into a difference of two stored matrices)."""
    s = np.linalg.svd(np.asarray(d, np.float64), compute_uv=False)
    return int(np.sum(s > rel * s[0])) if s.size and s[0] > 0 else 0


def diff_params(a, b, rank_rel: float = 1e-3) -> dict:
    """{path: {"max_abs", "fro", "rank" or "layers": {layer: rank}}} for every leaf where a and b
    differ (`numerical_rank` of the difference; per changed layer for a stacked [L, ...] leaf)."""
    fa, fb = _flat(a), _flat(b)
    if fa.keys() != fb.keys():
        raise ValueError(f"diff_params: different trees ({sorted(fa.keys() ^ fb.keys())[:3]} ...)")
    out = {}
    for k in fa:
        d = fb[k].astype(np.float64) - fa[k].astype(np.float64)
        if not np.any(d):
            continue
        rec = {"max_abs": float(np.abs(d).max()), "fro": float(np.linalg.norm(d))}
        if d.ndim == 3:
            rec["layers"] = {int(l): numerical_rank(d[l], rank_rel) for l in range(d.shape[0]) if np.any(d[l])}
        elif d.ndim == 2:
            rec["rank"] = numerical_rank(d, rank_rel)
        out[k] = rec
    return out
