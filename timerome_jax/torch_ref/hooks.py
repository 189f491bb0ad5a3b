"""PyTorch forward-hook reference of the paper's §III-E machinery (capture, patch, edit).

Hooks sit at three module positions per transformer block (module ids as in `config.MODULES`):
    resid (0) = the block's output (post-residual),
    attn  (1) = the attention sub-layer output (the output projection, before the residual add),
    mlp   (2) = the MLP sub-layer output (before the residual add).
A `Locator` names those modules for a model layout; `locate(model)` picks the layout:
    LLaDA   model.model.transformer.blocks[i], attn_out, ff_out
    HF      model.model.layers[i], self_attn.o_proj, mlp.down_proj   (Llama, Qwen2/Dream, ...)
    HF MoE  model.model.layers[i], self_attn.o_proj, mlp             (sparse-MoE blocks)

`TraceState` carries the denoising-step counter k that the diffusion loop advances; capture and
patch hooks read it, and `EditHook` fires at every step (edit.step = -1) or only at edit.step.
Hooks that share a module run in registration order; register a patch before an edit to match
the JAX forward (patch, then edit, at one module).

Reading hidden states: transformers 5.x records `output_hidden_states` inside the wrapped decoder
layer forward, i.e. before forward hooks run, so at an edited/patched layer it shows the value
*before* the hook; read post-hook values with a `CaptureHook` registered after the edit.

Everything here is inference-only and batched: call under `torch.no_grad()`/`inference_mode()`;
edits compute in float32 and add the update in the activation dtype (bf16 at 8B scale), exactly as
`timerome_jax.backbone.intervene.apply_edit` does.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

from timerome_jax.backbone.config import MODULES  # noqa: F401 - re-exported for the torch side
from timerome_jax.backbone.config import module_id as module_index  # name or id -> id


# --------------------------------------------------------------------------------------------
# Locating blocks and sub-layers
# --------------------------------------------------------------------------------------------

def _get(root: torch.nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@dataclasses.dataclass(frozen=True)
class Locator:
    """Dotted paths: `blocks` from the model to the list of blocks; `attn` and `mlp` inside a
    block to the module whose output is that sub-layer's output (resid = the block itself)."""

    name: str
    blocks: str
    attn: str
    mlp: str

    def n_layers(self, model) -> int:
        return len(_get(model, self.blocks))

    def module(self, model, layer: int, module: Union[int, str]) -> torch.nn.Module:
        blocks = _get(model, self.blocks)
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} out of range: {self.name} model has {len(blocks)} blocks")
        block = blocks[layer]
        m = module_index(module)
        return block if m == 0 else _get(block, self.attn if m == 1 else self.mlp)

    def matches(self, model) -> bool:
        try:
            self.module(model, 0, 1), self.module(model, 0, 2)
            return True
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            return False


LLADA = Locator("llada", "model.transformer.blocks", "attn_out", "ff_out")
HF = Locator("hf", "model.layers", "self_attn.o_proj", "mlp.down_proj")
HF_MOE = Locator("hf_moe", "model.layers", "self_attn.o_proj", "mlp")
LOCATORS = (LLADA, HF, HF_MOE)


def locate(model) -> Locator:
    """The first layout of `LOCATORS` whose paths resolve on `model`."""
    for loc in LOCATORS:
        if loc.matches(model):
            return loc
    tried = ", ".join(f"{l.name} ({l.blocks}[i].{{{l.attn},{l.mlp}}})" for l in LOCATORS)
    raise ValueError(f"cannot locate transformer blocks in {type(model).__name__}; tried {tried}")


def _split(output):
    """A module's output -> (hidden tensor, the original container or None)."""
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0], output
    raise TypeError(f"hooked module returned {type(output).__name__}; expected a tensor or a "
                    "tuple whose first element is the hidden state")


def _join(h, orig):
    if orig is None:
        return h
    return type(orig)((h, *orig[1:]))


def _gather(h, positions):
    """h [B,T,D], positions [B,S] -> [B,S,D]."""
    b = torch.arange(h.shape[0], device=h.device)[:, None]
    return h[b, positions.to(h.device)]


# --------------------------------------------------------------------------------------------
# State and hooks
# --------------------------------------------------------------------------------------------

class TraceState:
    """Denoising-step counter shared by the hooks of one trajectory; the loop calls `advance()`
    after each denoising step (or sets `step` directly)."""

    def __init__(self, step: int = 0):
        self.step = int(step)

    def advance(self) -> int:
        self.step += 1
        return self.step

    def reset(self) -> None:
        self.step = 0


class _StopForward(Exception):
    """Raised by a capture hook to end a forward early once the wanted layer has run."""


class Hook:
    """Base: a callable forward hook bound to (layer, module) with a shared `TraceState`."""

    def __init__(self, layer: int, module: Union[int, str], state: Optional[TraceState] = None):
        self.layer = int(layer)
        self.module = module_index(module)
        self.state = state if state is not None else TraceState()

    def __call__(self, mod, inputs, output):  # pragma: no cover - abstract
        raise NotImplementedError


class CaptureHook(Hook):
    """Capture mode: store the module output at `positions` [B,S] as [B,S,D] for each forward
    (at every step, or only at the steps in `steps`). `records` is a list of (step, tensor);
    `to_cpu` moves each slice to the CPU (the paper's setting), `stop` ends the forward after the
    capture (raise `_StopForward`, caught by `capture_torch`)."""

    def __init__(self, layer, module, positions, state=None, steps: Optional[Iterable[int]] = None,
                 to_cpu: bool = True, stop: bool = False):
        super().__init__(layer, module, state)
        self.positions = torch.as_tensor(positions, dtype=torch.long)
        self.steps = None if steps is None else frozenset(int(s) for s in steps)
        self.to_cpu = to_cpu
        self.stop = stop
        self.records: List[tuple] = []

    @property
    def value(self) -> torch.Tensor:
        """The most recent capture [B,S,D]."""
        if not self.records:
            raise RuntimeError(f"no capture recorded at layer {self.layer} {MODULES[self.module]}")
        return self.records[-1][1]

    def __call__(self, mod, inputs, output):
        if self.steps is None or self.state.step in self.steps:
            h, _ = _split(output)
            v = _gather(h, self.positions).detach()
            self.records.append((self.state.step, v.to("cpu") if self.to_cpu else v))
            if self.stop:
                raise _StopForward
        return None


class PatchHook(Hook):
    """Patch mode: at (layer, step, module) overwrite the output at `positions` [B,S] with
    `values` [B,S,D] where `valid` [B,S] (default all) is True."""

    def __init__(self, layer, step: int, module, positions, values, valid=None, state=None):
        super().__init__(layer, module, state)
        self.step = int(step)
        self.positions = torch.as_tensor(positions, dtype=torch.long)
        self.values = torch.as_tensor(values)
        self.valid = (torch.ones(self.positions.shape, dtype=torch.bool) if valid is None
                      else torch.as_tensor(valid, dtype=torch.bool))

    def __call__(self, mod, inputs, output):
        if self.state.step != self.step:
            return None
        h, orig = _split(output)
        h = h.clone()
        dev = h.device
        b = torch.arange(h.shape[0], device=dev)[:, None].expand_as(self.positions.to(dev))
        ok = self.valid.to(dev)
        h[b[ok], self.positions.to(dev)[ok]] = self.values.to(dev, h.dtype)[ok]
        return _join(h, orig)


def _top_q(c: torch.Tensor, q: int) -> torch.Tensor:
    """Same rule as `timerome_jax.method.memory.top_q`: keep entries with |c| >= the q-th largest |c|."""
    if q <= 0:
        return c
    n = c.shape[-1]
    a = c.abs()
    thr = torch.sort(a, dim=-1).values[..., max(0, min(n - q, n - 1))]
    return torch.where(a >= thr[..., None], c, torch.zeros_like(c))


class TorchEditMemory:
    """Eq. 12 in torch: delta(h) = alpha * D^T TopQ_q(G U h), float32, at (layer, module, step).

    U, D [C,D]; G [C,C]; active [C] bool (inactive coefficients are zeroed)."""

    def __init__(self, U, D, G, active, alpha: float, q: int, layer: int, module, step: int = -1,
                 device=None):
        f = lambda x: torch.as_tensor(np.array(x, np.float32), device=device)
        self.U, self.D, self.G = f(U), f(D), f(G)
        self.active = torch.as_tensor(np.array(active, bool), device=device)
        self.alpha, self.q = float(alpha), int(q)
        self.layer, self.module, self.step = int(layer), module_index(module), int(step)

    @classmethod
    def from_jax(cls, mem, device=None) -> "TorchEditMemory":
        """From a `timerome_jax.method.memory.EditMemory`."""
        return cls(mem.U, mem.Dm, mem.G, mem.active, float(mem.alpha), int(mem.q), int(mem.layer),
                   mem.module, int(mem.step), device=device)

    def coefficients(self, h: torch.Tensor) -> torch.Tensor:
        c = (h.float() @ self.U.T) @ self.G.T
        c = torch.where(self.active, c, torch.zeros_like(c))
        return _top_q(c, self.q)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        return self.alpha * (self.coefficients(h) @ self.D)


class TorchGatedEdit:
    """Eq. 10 in torch (a naive sum over F facts): alpha * sum_f clip(<u_f,h>/(|u_f|^2+eps), 0,
    g_max) d_f."""

    def __init__(self, u, d, alpha: float, g_max: float, eps: float, layer: int, module,
                 step: int = -1, device=None):
        f = lambda x: torch.as_tensor(np.array(x, np.float32), device=device)
        self.u, self.d = f(np.atleast_2d(np.asarray(u))), f(np.atleast_2d(np.asarray(d)))
        self.alpha, self.g_max, self.eps = float(alpha), float(g_max), float(eps)
        self.layer, self.module, self.step = int(layer), module_index(module), int(step)

    @classmethod
    def from_jax(cls, edit, device=None) -> "TorchGatedEdit":
        """From a `timerome_jax.method.memory.GatedEdit`."""
        return cls(edit.u, edit.d, float(edit.alpha), float(edit.g_max), float(edit.eps),
                   int(edit.layer), edit.module, int(edit.step), device=device)

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        g = (h.float() @ self.u.T) / ((self.u * self.u).sum(-1) + self.eps)
        return g.clamp(0.0, self.g_max)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        return self.alpha * (self.gate(h) @ self.d)


class EditHook(Hook):
    """Edit mode: h <- h + edit.delta(h) at all positions, at the edit's (layer, module), at every
    step (edit.step < 0) or only when state.step == edit.step. `edit` is a `TorchEditMemory`,
    a `TorchGatedEdit`, or anything with .delta/.layer/.module/.step."""

    def __init__(self, edit, state=None):
        super().__init__(edit.layer, edit.module, state)
        self.edit = edit

    def __call__(self, mod, inputs, output):
        if self.edit.step >= 0 and self.state.step != self.edit.step:
            return None
        h, orig = _split(output)
        return _join(h + self.edit.delta(h).to(h.dtype), orig)


# --------------------------------------------------------------------------------------------
# Installing hooks
# --------------------------------------------------------------------------------------------

def install(model, hooks: Sequence[Hook], locator: Optional[Locator] = None) -> list:
    """Register `hooks` as forward hooks at their (layer, module); returns the handles."""
    loc = locator if locator is not None else locate(model)
    return [loc.module(model, h.layer, h.module).register_forward_hook(h) for h in hooks]


@contextlib.contextmanager
def installed(model, *hooks: Hook, locator: Optional[Locator] = None):
    """`with installed(model, h1, h2): model(...)` - hooks removed on exit, even on error."""
    handles = install(model, hooks, locator)
    try:
        yield hooks
    finally:
        for hd in handles:
            hd.remove()


def capture_torch(model, tokens, positions, layer: int, module, attention_mask=None,
                  locator: Optional[Locator] = None, stop: bool = True,
                  to_cpu: bool = False) -> torch.Tensor:
    """Module output at (layer, module) gathered at `positions` [B,S] -> [B,S,D] (activation
    dtype), from one no-grad forward of `tokens` [B,T]. With `stop` the forward ends right
    after the captured module (no later layers, no LM head)."""
    hook = CaptureHook(layer, module, positions, to_cpu=to_cpu, stop=stop)
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    with torch.no_grad(), installed(model, hook, locator=locator):
        try:
            model(tokens, **kw)
        except _StopForward:
            pass
    return hook.value
