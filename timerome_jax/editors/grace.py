"""A GRACE-style codebook for a frozen masked diffusion LM, as an `Intervene` edit.

GRACE (Hartvigsen et al., 2023, "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value
Adaptors"; official Thartvigsen/GRACE `grace/editors/grace.py`) wraps one layer of a frozen model
with a codebook of (key, value, deferral radius eps, label) entries. The query is the layer's
hidden state at the input's last token; if its Euclidean distance to the nearest key is at most
that key's eps, the layer's output is replaced by the key's value (at the last token, at every
token, or at the prompt's tokens: the `replacement` option), otherwise the layer runs unchanged.
Edits are inserted one at a time with these rules (eps_init = the initial radius):

  * no key within (eps_init + eps_nearest) of the query: add a new entry (query, value, eps_init);
  * a key that close with the same label: if the query lies outside its radius, expand the radius
    to the distance (the "coverage" rule);
  * a key that close with a different label: add the new entry and split, both radii set to half
    the distance (the nearest one minus 1e-5, so the two balls do not touch).

The new value starts at the layer's output for the query ("warm" init) and is trained by a few
Adam steps so that the edited model produces the edit's label.

Here: the codebook sits at a traced (layer, module) of `model.run` (default resid, the TimeROME
coordinate). The hook sees the module output h [B,T,D] only, so every token is a potential query:
a token is "matched" when its h lies within the radius of its nearest key. Keys are captured at
the prompt's last token with the answer all masked (the first denoising state). replacement:
"last" replaces h at matched tokens only; "after" replaces every position from the first matched
token of the row on (the answer region follows the prompt's last token); "all" replaces the whole
row. The values are trained over partially unmasked answer states (`editors.states`), the MDLM
counterpart of GRACE's "fix the label at this input" objective.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from timerome_jax.backbone import model as M
from timerome_jax.backbone.config import module_id
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.editors import states as S
from timerome_jax.editors.weights import task_batch
from timerome_jax.method.capture import DEFAULT_TARGET_TEXT
from timerome_jax.methods import EditTask, Prepared, register

REPLACEMENTS = ("last", "after", "all")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["keys", "values", "eps", "active", "step"],
                   meta_fields=["layer", "module", "replacement"])
@dataclasses.dataclass(frozen=True)
class Codebook:
    """keys, values [C,D] float32; eps [C] float32 deferral radii; active [C] bool; step int32
    (-1 = every denoising step). Static: layer, module (0 resid, 1 attn, 2 mlp), replacement."""

    keys: jax.Array
    values: jax.Array
    eps: jax.Array
    active: jax.Array
    step: jax.Array
    layer: int
    module: int
    replacement: str = "last"

    def match(self, h):
        """Per token: (index of the nearest active key [B,T] int32, hit [B,T] bool: within its radius)."""
        hf = h.astype(jnp.float32)
        d2 = (jnp.sum(hf * hf, -1, keepdims=True) - 2 * jnp.einsum("btd,cd->btc", hf, self.keys)
              + jnp.sum(self.keys * self.keys, -1))
        d2 = jnp.where(self.active, d2, jnp.inf)
        idx = jnp.argmin(d2, -1)
        dist = jnp.sqrt(jnp.maximum(jnp.take_along_axis(d2, idx[..., None], -1)[..., 0], 0.0))
        return idx, dist <= self.eps[idx]

    def delta(self, h):
        """h [B,T,D] -> [B,T,D]: value - h where the codebook replaces the output, 0 elsewhere."""
        idx, hit = self.match(h)
        T = h.shape[1]
        if self.replacement == "last":
            where, code = hit, idx
        else:
            first = jnp.argmax(hit, -1)  # the first matched token of each row (0 when none)
            code = jnp.broadcast_to(jnp.take_along_axis(idx, first[:, None], -1), idx.shape)
            any_hit = hit.any(-1, keepdims=True)
            where = any_hit & (jnp.arange(T)[None] >= first[:, None]) if self.replacement == "after" else \
                jnp.broadcast_to(any_hit, hit.shape)
        v = self.values[code]
        return jnp.where(where[..., None], v - h.astype(jnp.float32), 0.0).astype(h.dtype)


@dataclasses.dataclass
class HostCodebook:
    """The codebook while edits are inserted (host, float64): keys [C,D], eps [C], labels, and for
    each inserted edit the entry it landed in (`assign`)."""

    keys: np.ndarray
    eps: np.ndarray
    labels: list
    assign: list


def insert(book: Optional[HostCodebook], query: np.ndarray, label, eps_init: float) -> HostCodebook:
    """Insert one edit (query [D], label: any comparable value) with GRACE's add / expand / split
    rules (module docstring); returns the updated codebook (a new object)."""
    q = np.asarray(query, np.float64)[None]
    if book is None or len(book.keys) == 0:
        return HostCodebook(q, np.array([eps_init], np.float64), [label], [0])
    keys, eps, labels, assign = book.keys.copy(), book.eps.copy(), list(book.labels), list(book.assign)
    d = np.linalg.norm(keys - q, axis=-1)
    j = int(np.argmin(d))
    dist = float(d[j])
    if dist > eps_init + eps[j]:
        keys, eps, labels = np.vstack([keys, q]), np.append(eps, eps_init), labels + [label]
        assign.append(len(labels) - 1)
    elif labels[j] != label:
        keys, eps, labels = np.vstack([keys, q]), np.append(eps, dist / 2), labels + [label]
        eps[j] = dist / 2 - 1e-5
        assign.append(len(labels) - 1)
    else:
        if dist > eps[j]:
            eps[j] = dist
        assign.append(j)
    return HostCodebook(keys, eps, labels, assign)


def to_edit(book: HostCodebook, values: np.ndarray, layer: int, module, replacement: str = "last",
            step: int = -1, capacity: Optional[int] = None) -> Codebook:
    """A `Codebook` edit from a host codebook and values [C,D] (padded to `capacity` inactive rows)."""
    if replacement not in REPLACEMENTS:
        raise ValueError(f"grace: replacement must be one of {REPLACEMENTS}, got {replacement!r}")
    C, D = book.keys.shape
    if values.shape != (C, D):
        raise ValueError(f"grace: values {values.shape} do not match keys {book.keys.shape}")
    cap = C if capacity is None else int(capacity)
    if cap < C:
        raise ValueError(f"grace: capacity {cap} < {C} entries")
    pad = lambda a, fill: np.concatenate([a, np.full((cap - C,) + a.shape[1:], fill, a.dtype)])
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return Codebook(f32(pad(book.keys, 0.0)), f32(pad(np.asarray(values, np.float64), 0.0)), f32(pad(book.eps, 0.0)),
                    jnp.asarray(pad(np.ones(C, bool), False)), jnp.int32(step), int(layer), module_id(module),
                    replacement)


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "module"))
def _queries(params, batch: S.EditBatch, cfg, layer: int, module: int):
    x = jnp.where(batch.answer, cfg.mask_token_id, batch.tokens)
    return S.hidden_at(params, cfg, x, batch.pad, batch.query_pos, layer, module)


@functools.partial(jax.jit, static_argnames=("cfg", "n_draws", "t_min"))
def _value_loss_and_grad(params, values, book: Codebook, batch: S.EditBatch, key, cfg, n_draws: int, t_min: float):
    x, masked = S.answer_states(key, batch, n_draws, cfg.mask_token_id, t_min)

    def loss(v):
        logits = M.forward(params, x, cfg, S.tile_rows(batch.pad, n_draws),
                           Intervene(edit=dataclasses.replace(book, values=v)))
        return S.masked_nll(logits, S.tile_rows(batch.tokens, n_draws), masked)

    return jax.value_and_grad(loss)(values)


def train_values(params, cfg, book: Codebook, batch: S.EditBatch, steps: int, lr: float, n_draws: int = 4,
                 t_min: float = 0.1, seed: int = 0):
    """Adam on the codebook values (lr relative to the keys' rms coordinate); returns (book, losses)."""
    scale = float(jnp.sqrt(jnp.mean(jnp.sum(book.keys ** 2, -1)[book.active]) / book.keys.shape[1]))
    opt = optax.adam(lr * scale)
    v = book.values
    state = opt.init(v)
    key = jax.random.PRNGKey(seed)
    losses = []
    for _ in range(steps):
        key, sub = jax.random.split(key)
        val, g = _value_loss_and_grad(params, v, book, batch, sub, cfg, int(n_draws), float(t_min))
        upd, state = opt.update(g, state, v)
        v = optax.apply_updates(v, upd)
        losses.append(float(val))
    return dataclasses.replace(book, values=v), losses


@register("grace")
def grace(task: EditTask, layer: int = 1, module: str = "resid", eps: Optional[float] = None,
          eps_rel: float = 0.08, replacement: str = "after", target_text: str = DEFAULT_TARGET_TEXT,
          labels: Optional[Sequence] = None, steps: int = 40, lr: float = 0.3, n_draws: int = 4,
          t_min: float = 0.1) -> Prepared:
    """GRACE codebook over the task's forget rows at (layer, module), one edit per row in row order.

    eps: the initial deferral radius (absolute); None = eps_rel * the median query norm. labels: one
    per row for the split rule (default: the target text, the same for every row, so close keys
    expand instead of splitting). Returns `Prepared(intervene=Intervene(edit=Codebook), artifact=
    HostCodebook)`; the params are the task's, untouched."""
    facts, batch = task_batch(task, target_text)
    m = module_id(module)
    Q = np.asarray(_queries(task.params, batch, task.cfg, int(layer), m), np.float64)
    if eps is None:
        eps = eps_rel * float(np.median(np.linalg.norm(Q, axis=-1)))
    labs = [target_text] * len(facts) if labels is None else [labels[f.index] for f in facts]
    book = None
    for i in range(len(facts)):
        book = insert(book, Q[i], labs[i], eps)
    # warm start: each entry's value is its key (the unedited output at the query)
    edit = to_edit(book, book.keys, layer, m, replacement)
    edit, losses = train_values(task.params, task.cfg, edit, batch, steps, lr, n_draws, t_min, task.seed)
    info = {"layer": int(layer), "module": module, "eps_init": float(eps), "n_entries": int(len(book.keys)),
            "n_facts": len(facts), "n_expanded": int(np.sum(book.eps > eps + 1e-9)), "replacement": replacement,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    return Prepared("grace", intervene=Intervene(edit=edit), artifact=book, info=info)
