"""Every method `timerome compare` knows, registered by name with `methods.register`.

Importing this module registers:

    no_edit        the frozen model
    timerome       TimeROME Eq. 12: trace -> select -> install (hparams alpha, q, lam, layer, step,
                   n_trace); the coordinate and the memory are cached per (model, split), so
                   several (alpha, q) settings share one trace and one install (`with_hparams`)
    gated          the gated edit memory (docs/gated_memory.md; hparams alpha, q, lam, percentile)
    random_layer   the same memory at a random layer (sanity)
    act_steer      difference-of-means steering (RepE)          } baselines/inference.py
    rmu_like       gated random-direction push (RMU at inference) }
    ga, gd, npo, simnpo, adaptive_rmu, mdu
                   training-time baselines through baselines/train.py (hparams: any TrainConfig
                   field; defaults in GRADIENT_DEFAULTS)

A new method registers here the same way:
`@register("name") def f(task: EditTask, **hp) -> Prepared`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from timerome_jax import pipeline
from timerome_jax.backbone.config import module_id
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.backbone.tokenizer import eos_or_default
from timerome_jax.baselines import inference
from timerome_jax.baselines import train as T
from timerome_jax.method import facts as F
from timerome_jax.method import trace as tr
from timerome_jax.method import gate as gate_lib
from timerome_jax.methods import EditTask, Prepared, register

# Per-method TrainConfig defaults, sized for the packaged CPU model (see docs/baselines.md). The
# paper's protocol (retain-NLL anchor, clip 1.0, early stop at 5 nats of RetainLP drift) is kept;
# GA is the unanchored reference point (retain_weight 0), Adaptive-RMU anchors by activation
# matching instead (Li et al.: MLP down-projections of layers l-2..l, l the RMU layer).
GRADIENT_DEFAULTS = {
    "ga": dict(objective="ga", retain_weight=0.0),
    "gd": dict(objective="gd", retain_weight=1.0),
    "npo": dict(objective="npo", beta=0.1, retain_weight=1.0),
    "simnpo": dict(objective="simnpo", beta=4.5, delta=0.0, retain_weight=1.0),
    "adaptive_rmu": dict(objective="rmu", mode="full", targets=("w_down",), retain_weight=0.0, rmu_beta=5.0,
                         rmu_alpha=1200.0, lr=5e-5),
    "mdu": dict(objective="mdu", tau=1.0, retain_weight=1.0),
}
COMMON_DEFAULTS = dict(steps=20, lr=1e-3, batch_size=8, retain_batch_size=8, mode="lora", lora_rank=8)


@register("no_edit")
def no_edit(task: EditTask) -> Prepared:
    """The frozen model, unchanged (the reference row of every table)."""
    return Prepared("no_edit")


def train_config(name: str, cfg, **hp) -> T.TrainConfig:
    """The TrainConfig of gradient method `name`: COMMON_DEFAULTS, then GRADIENT_DEFAULTS[name], then hp."""
    kw = {**COMMON_DEFAULTS, **GRADIENT_DEFAULTS[name], **hp}
    if kw.get("objective") == "rmu":
        layer = cfg.n_layers // 2 if kw.get("rmu_layer") is None else int(kw["rmu_layer"])
        kw["rmu_layer"] = layer
        if kw.get("mode") == "full" and kw.get("train_layers") is None:
            kw["train_layers"] = tuple(range(max(0, layer - 2), layer + 1))
    for k in ("targets", "train_layers"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(T.TrainConfig)})
    if unknown:
        raise ValueError(f"method {name!r}: unknown hyperparameters {unknown}; TrainConfig fields are "
                         f"{[f.name for f in dataclasses.fields(T.TrainConfig)]}")
    return T.TrainConfig(**kw)


def _gradient(name: str):
    def prepare(task: EditTask, log_path=None, progress: bool = False, **hp) -> Prepared:
        tcfg = train_config(name, task.cfg, **hp)
        res = T.train(task.params, task.cfg, task.tokenizer, task.forget_rows, task.retain_rows, tcfg,
                      seed=task.seed, progress=progress, log_path=log_path)
        return Prepared(name, params=res.params, artifact=res.adapter, info={"train": res.info})

    prepare.__name__ = f"prepare_{name}"
    prepare.__doc__ = f"Training-time baseline {name!r}: `baselines.train.train` with {GRADIENT_DEFAULTS[name]}."
    return prepare


for _name in GRADIENT_DEFAULTS:
    register(_name)(_gradient(_name))


@register("act_steer")
def prepare_act_steer(task: EditTask, layer: Optional[int] = None, alpha: float = 1.0) -> Prepared:
    """Difference-of-means steering (`inference.act_steer`), retain means from task.retain_rows."""
    edit, info = inference.act_steer(task.params, task.cfg, task.tokenizer, task.forget_rows, task.retain_rows,
                                     layer, alpha)
    return Prepared("act_steer", intervene=Intervene(edit=edit), artifact=edit, info=info)


@register("rmu_like")
def prepare_rmu_like(task: EditTask, layer: Optional[int] = None, coeff: float = 1.0, temp: float = 0.05) -> Prepared:
    """Gated random-direction push (`inference.rmu_like`)."""
    edit, info = inference.rmu_like(task.params, task.cfg, task.tokenizer, task.forget_rows, task.retain_rows,
                                    layer, coeff, temp, task.seed)
    return Prepared("rmu_like", intervene=Intervene(edit=edit), artifact=edit, info=info)


# -------------------------------------------------------------------------------------- TimeROME

_CACHE: dict = {}


def _facts(task: EditTask):
    return F.make_facts(task.tokenizer, task.forget_rows, eos_or_default(task.tokenizer, task.cfg))


def traced_coordinate(task: EditTask, n_trace: int = 8, tcfg: tr.TraceConfig = tr.TraceConfig()) -> tr.Coordinate:
    """Stage 1-2 on the first `n_trace` forget facts that name their subject (cached per model/split)."""
    key = ("coord", id(task.params), task.split, n_trace, tcfg)
    if key not in _CACHE:
        facts = [f for f in _facts(task) if f.key_source == "subject"][:n_trace]
        if not facts:
            raise ValueError(f"timerome: no forget row of {task.split} names its subject; pass layer=")
        res = pipeline.trace_facts(task.params, task.cfg, facts, tcfg, batch=len(facts), progress=False)
        _CACHE[key] = tr.select(res.tie_bar)[0]
    return _CACHE[key]


def _memory(task: EditTask, coord: tr.Coordinate, lam, target_text: str):
    key = ("mem", id(task.params), task.split, tuple(coord), lam, target_text)
    if key not in _CACHE:
        _CACHE[key] = pipeline.install(task.params, task.cfg, task.tokenizer, _facts(task), coord, alpha=1.0, q=0,
                                       lam=lam, target_text=target_text)
    return _CACHE[key]


@register("timerome")
def prepare_timerome(task: EditTask, alpha: float = 2.0, q: int = 4, lam: Optional[float] = None,
                     layer: Optional[int] = None, step: int = -1, module: str = "resid", n_trace: int = 8,
                     target_text: str = pipeline.DEFAULT_TARGET) -> Prepared:
    """TimeROME-DLM Eq. 12 at (alpha, q): the traced coordinate (or `layer`/`module`/`step` given)."""
    coord = traced_coordinate(task, n_trace) if layer is None else tr.Coordinate(int(layer), int(step),
                                                                                 module_id(module))
    memory, info = _memory(task, coord, lam, target_text)
    mem = pipeline.with_hparams(memory, alpha, q)
    return Prepared("timerome", intervene=Intervene(edit=mem), artifact=mem, info={"install": info})


@register("gated")
def prepare_gated(task: EditTask, alpha: float = 4.0, q: int = 4, lam: Optional[float] = None,
                  layer: Optional[int] = None, step: int = -1, module: str = "resid", n_trace: int = 8,
                  percentile: Optional[float] = gate_lib.DEFAULT_PERCENTILE,
                  target_text: str = pipeline.DEFAULT_TARGET) -> Prepared:
    """The gated edit memory (docs/gated_memory.md) at the traced coordinate: Eq. 12 applied only
    where a whitened answer-slot key matches, threshold calibrated on `calibration_rows()`."""
    coord = traced_coordinate(task, n_trace) if layer is None else tr.Coordinate(int(layer), int(step),
                                                                                 module_id(module))
    key = ("gated", id(task.params), task.split, tuple(coord), lam, target_text, percentile)
    if key not in _CACHE:
        _CACHE[key] = pipeline.install(task.params, task.cfg, task.tokenizer, _facts(task), coord, alpha=1.0,
                                       q=0, lam=lam, target_text=target_text, gate=True, percentile=percentile)
    memory, info = _CACHE[key]
    mem = pipeline.with_hparams(memory, alpha, q)
    return Prepared("gated", intervene=Intervene(edit=mem), artifact=mem, info={"install": info})


@register("random_layer")
def prepare_random_layer(task: EditTask, alpha: float = 2.0, q: int = 4, lam: Optional[float] = None,
                         target_text: str = pipeline.DEFAULT_TARGET) -> Prepared:
    """The TimeROME memory at a random resid layer drawn from task.seed (sanity baseline)."""
    layer = int(np.random.Generator(np.random.PCG64(task.seed)).integers(task.cfg.n_layers))
    memory, info = _memory(task, tr.Coordinate(layer, -1, 0), lam, target_text)
    mem = pipeline.with_hparams(memory, alpha, q)
    return Prepared("random_layer", intervene=Intervene(edit=mem), artifact=mem, info={"install": info, "layer": layer})
