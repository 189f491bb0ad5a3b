"""A Flax NNX module over the pure backbone, for people who train or fine-tune with `flax.nnx`.

`MDLM(params, cfg)` wraps every leaf of an existing params tree in an `nnx.Param` without copying
it (the module holds the very same jax arrays) and its `__call__` / `run` call the pure
`model.forward` / `model.run`, interventions included, so the module and the functional API compute
the same logits. It drops into an nnx training loop:

    model = MDLM(params, cfg)
    opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
    grads = nnx.grad(loss_fn)(model)            # loss_fn(model) -> scalar
    opt.update(model, grads)                    # model now holds new arrays; `params` is untouched
    params = model.params_tree()                # back to the functional API (trace, install, ...)
"""
from __future__ import annotations

from typing import Optional

import jax
from flax import nnx

from timerome_jax.backbone import model as model_lib
from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


class MDLM(nnx.Module):
    """The masked-diffusion LM backbone as an `nnx.Module`.

    params: a tree in the `model.param_shapes(cfg)` layout or its unstacked form (`model.unstack`;
            e.g. from `load_model`); its arrays are wrapped, not copied. cfg: the ModelConfig (static).
    """

    def __init__(self, params: dict, cfg: ModelConfig):
        self.cfg = cfg
        self.params = nnx.data(jax.tree.map(nnx.Param, params))

    def params_tree(self) -> dict:
        """The current params as a plain dict of jax arrays (the arrays the module holds, no copy)."""
        return jax.tree.map(lambda v: v.get_value(), self.params, is_leaf=_is_var)

    def __call__(self, tokens, pad_mask=None, intervene: Optional[Intervene] = None, step=0) -> jax.Array:
        """Logits [B,T,V] float32 of tokens [B,T] int32 (pad_mask [B,T] bool, True = real token)."""
        return model_lib.forward(self.params_tree(), tokens, self.cfg, pad_mask, intervene, step)

    def run(self, tokens, pad_mask=None, intervene: Optional[Intervene] = None, step=0,
            stop_layer: Optional[int] = None) -> model_lib.Out:
        """`model.run`: logits and the activations read at `intervene.read_pos` ([L,B,S,D] per module)."""
        return model_lib.run(self.params_tree(), tokens, self.cfg, pad_mask, intervene, step, stop_layer)
