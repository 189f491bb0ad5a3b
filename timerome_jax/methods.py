"""One interface for every editing / unlearning method, so `timerome compare` treats them alike.

A method is a function `prepare(task, **hparams) -> Prepared`. It gets the frozen model and the
rows it may learn from (`EditTask`), and returns what the evaluation applies: an `Intervene` (edit
memories, GRACE, steering), an edited copy of the params (weight editors, full fine-tuning), or both.
The base params are never modified: a method that changes weights returns a new pytree.

Methods register themselves by name with `@register("name")`; `prepare(name, task, **hparams)`
looks one up, times it (wall seconds and, where the backend reports it, peak device memory) and
returns its `Prepared`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import jax

from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene


@dataclasses.dataclass(frozen=True)
class EditTask:
    """What a method may use.

    params, cfg, tokenizer: the frozen model (never modified).
    split: the TOFU forget split (forget01/05/10).
    forget_rows: the rows to forget (TOFU dicts: question, answer, ...; the split's forget set).
    retain_rows: rows a method may use to preserve knowledge (retain anchors, covariances, gate
        calibration). They must be disjoint from every evaluation set; `tofu.data` says which rows.
    seed: the method's own randomness (initialisation, minibatch order, mask draws).
    """

    params: Any
    cfg: ModelConfig
    tokenizer: Any
    split: str
    forget_rows: Sequence[dict]
    retain_rows: Sequence[dict] = ()
    seed: int = 0


@dataclasses.dataclass
class Prepared:
    """What the evaluation applies for one method.

    params: an edited copy of the params, or None to evaluate the base params.
    intervene: an `Intervene` passed to every forward (edit memory, codebook, steering), or None.
    artifact: the method's own state worth saving (memory, adapter, codebook), or None.
    info: hyperparameters and costs: `prepare_s` (wall seconds) and `peak_bytes` (device peak
        memory during preparation, None where the backend does not report it) are filled in by
        `prepare`.
    """

    method: str
    params: Any = None
    intervene: Optional[Intervene] = None
    artifact: Any = None
    info: dict = dataclasses.field(default_factory=dict)


Method = Callable[..., Prepared]
_REGISTRY: dict[str, Method] = {}


def register(name: str) -> Callable[[Method], Method]:
    """Decorator: make `fn(task, **hparams) -> Prepared` available as `prepare(name, ...)`."""

    def deco(fn: Method) -> Method:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> tuple[str, ...]:
    """Names of the registered methods, sorted."""
    return tuple(sorted(_REGISTRY))


def _peak_bytes() -> Optional[int]:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def prepare(name: str, task: EditTask, **hparams) -> Prepared:
    """Run method `name` on `task` with `hparams`; fills `info['prepare_s']` and `info['peak_bytes']`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available()) or 'none'}")
    t0 = time.perf_counter()
    out = _REGISTRY[name](task, **hparams)
    jax.block_until_ready((out.params, out.intervene))
    out.info.setdefault("prepare_s", time.perf_counter() - t0)
    out.info.setdefault("peak_bytes", _peak_bytes())
    out.info.setdefault("hparams", dict(hparams))
    return out
