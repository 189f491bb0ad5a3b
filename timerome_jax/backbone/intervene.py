"""Interventions as data: what the forward reads, overwrites and adds, as a pytree of arrays.

Every field is an array (or None), so N interventions that differ only in their values share one
compiled forward, and a batch of them can be vmapped over (e.g. all (layer, step, module)
candidates of a TIE sweep). Which fields are None is structure: it selects which code is traced.

Module ids follow `config.MODULES`: 0 = resid (block output), 1 = attn (attention sub-layer
output, before it is added to the residual), 2 = mlp (MLP sub-layer output, likewise).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Patch:
    """Overwrite one module output at one (layer, step) on a set of token positions.

    layer, step, module: int32 scalars (step is the denoising-step index passed to `forward`).
    pos:   [B, S] int32 token positions; valid: [B, S] bool (False rows are padding).
    value: [B, S, D] values written at those positions.
    """

    layer: jax.Array
    step: jax.Array
    module: jax.Array
    pos: jax.Array
    valid: jax.Array
    value: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Shift:
    """Add a value to every layer's module outputs on a set of token positions.

    pos: [B, S] int32 token positions; valid: [B, S] bool; value: [L, 3, B, S, D] indexed
    [layer, module]. With value = 0 the forward is unchanged and the gradient with respect to value
    is the gradient of the output with respect to every module output on S (the TIE screen's probe).
    """

    pos: jax.Array
    valid: jax.Array
    value: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Intervene:
    """Everything the forward can be asked to do besides the plain computation.

    noise:    [B, T, D] added to the token embeddings (Eq. 2 corruption; zero off the subject).
    read_pos: [B, S] int32 positions at which resid/attn/mlp outputs of every layer are returned.
    patch:    a `Patch` (or None).
    shift:    a `Shift` (or None): additive values at every layer and module on a set of positions.
    edit:     an edit memory (any pytree with `.delta(h) -> [B,T,D]`, a `.step` array and static
              `.layer` and `.module` ints), applied at its coordinate; see `timerome_jax.method.memory`.
    """

    noise: Optional[jax.Array] = None
    read_pos: Optional[jax.Array] = None
    patch: Optional[Patch] = None
    edit: Optional[Any] = None
    shift: Optional[Shift] = None


def apply_patch(h: jax.Array, patch: Optional[Patch], layer, step, module: int) -> jax.Array:
    """Return h [B,T,D] with `patch` applied if it targets (layer, step, module)."""
    if patch is None:
        return h
    hit = (patch.layer == layer) & (patch.step == step) & (patch.module == module)
    b = jnp.arange(h.shape[0])[:, None]
    cur = h[b, patch.pos]
    # scatter-*add* the difference so that padded (invalid) duplicate positions add exactly 0
    diff = jnp.where((hit & patch.valid)[..., None], patch.value.astype(h.dtype) - cur, 0)
    return h.at[b, patch.pos].add(diff)


def apply_shift(h: jax.Array, shift: Optional[Shift], layer, module: int) -> jax.Array:
    """Return h [B,T,D] plus shift.value[layer, module] at shift.pos (valid rows only)."""
    if shift is None:
        return h
    b = jnp.arange(h.shape[0])[:, None]
    add = jnp.where(shift.valid[..., None], shift.value[layer, module].astype(h.dtype), 0)
    return h.at[b, shift.pos].add(add)


def apply_edit(h: jax.Array, edit, step, module: int) -> jax.Array:
    """Return h [B,T,D] + edit.delta(h) when `edit` targets `module` and fires at `step`.

    The caller (`model.run`) calls this only at the edit's layer, which is static, so no other
    layer pays for the edit. The module test is static too; the step test (step -1 = every step)
    is a select, not a `lax.cond`: one small fused op instead of a conditional per forward.
    """
    if edit is None or edit.module != module:
        return h
    on = (edit.step < 0) | (edit.step == step)
    return h + jnp.where(on, edit.delta(h), jnp.zeros((), h.dtype)).astype(h.dtype)


def read(h: jax.Array, read_pos: Optional[jax.Array]):
    """Gather h [B,T,D] at read_pos [B,S] -> [B,S,D] (None when nothing is read)."""
    if read_pos is None:
        return None
    return h[jnp.arange(h.shape[0])[:, None], read_pos]
