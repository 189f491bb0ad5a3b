"""Native Orbax checkpoints of converted models, and one loader for both checkpoint kinds.

A converted folder (written by `save`, e.g. via `python -m convert.to_orbax HF_DIR OUT_DIR`):

    OUT_DIR/timerome_config.json   {"format": ..., "config": ModelConfig fields, "param_dtype": ...}
    OUT_DIR/params/                Orbax (StandardCheckpointer) checkpoint of the params pytree
    OUT_DIR/tokenizer/             copy of the HF tokenizer files (absent if there was none)

`restore` rebuilds the abstract params tree from the stored ModelConfig (`model.param_shapes`) and
restores straight into the requested sharding, so no host copy of the whole model is needed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.hf_weights import load_pretrained
from timerome_jax.io import atomic_dir
from timerome_jax.backbone.model import param_shapes, resolve_layout, stack, unstack
from timerome_jax.backbone.tokenizer import Tokenizer, has_tokenizer, load_tokenizer

FORMAT = "timerome-orbax-v1"
META = "timerome_config.json"


class OrbaxCheckpointError(ValueError):
    """A converted checkpoint folder is missing pieces or does not match its stored config."""


def _is_shape(x):
    return isinstance(x, tuple)


def _leaf_dtype(params) -> str:
    dts = {str(x.dtype) for x in jax.tree.leaves(params)}
    if len(dts) != 1:
        raise OrbaxCheckpointError(f"params mix dtypes {sorted(dts)}; convert them to one dtype first")
    dt = dts.pop()
    if dt not in ("float32", "bfloat16"):
        raise OrbaxCheckpointError(f"params dtype {dt} is not float32/bfloat16")
    return dt


def save(params, cfg: ModelConfig, path: str, tokenizer: Optional[Tokenizer] = None) -> None:
    """Write params + config (+ tokenizer files) as a converted Orbax folder at `path`, atomically
    (built in a temp folder next to `path`, then renamed; an existing `path` is replaced).
    params in either layout; unstacked ones are stacked first (a copy of the layer weights while
    saving), since the folder always stores the stacked tree."""
    params = stack(params)
    want = param_shapes(cfg)
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    if jax.tree.structure(want, is_leaf=_is_shape) != jax.tree.structure(got, is_leaf=_is_shape) or \
            jax.tree.leaves(want, is_leaf=_is_shape) != jax.tree.leaves(got, is_leaf=_is_shape):
        raise OrbaxCheckpointError("params do not match param_shapes(cfg); refusing to save a checkpoint "
                                   "that cannot be restored")
    dtype = _leaf_dtype(params)  # before writing gigabytes, not after
    with atomic_dir(path) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, "params"), params)
        ckptr.wait_until_finished()
        meta = {"format": FORMAT, "config": cfg.to_dict(), "param_dtype": dtype}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            os.makedirs(os.path.join(tmp, "tokenizer"))
            tokenizer.save(os.path.join(tmp, "tokenizer"))


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))


def read_meta(path: str) -> tuple[ModelConfig, str]:
    """(ModelConfig, param dtype) stored in a converted folder."""
    f = os.path.join(path, META)
    if not os.path.isfile(f):
        raise OrbaxCheckpointError(f"{path!r} has no {META}; not a converted checkpoint")
    with open(f) as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT:
        raise OrbaxCheckpointError(f"{f}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    fields = ModelConfig.__dataclass_fields__
    extra = set(meta["config"]) - set(fields)
    if extra:
        raise OrbaxCheckpointError(f"{f}: unknown ModelConfig fields {sorted(extra)}")
    return ModelConfig(**meta["config"]), meta["param_dtype"]


def _check_stored_shapes(ckptr, pdir: str, shapes) -> None:
    """Compare the stored tree (Orbax metadata) with param_shapes(cfg) before reading any array."""
    try:
        stored = ckptr.metadata(pdir).item_metadata.tree
    except Exception as e:
        raise OrbaxCheckpointError(f"cannot read the Orbax metadata of {pdir}: {type(e).__name__}: {e}") from e
    want = dict(jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0])
    got = {p: tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
    for p in sorted(set(want) | set(got), key=str):
        name = jax.tree_util.keystr(p)
        if p not in got:
            raise OrbaxCheckpointError(f"{pdir} lacks params{name}, which the stored config requires")
        if p not in want:
            raise OrbaxCheckpointError(f"{pdir} holds params{name}, which the stored config does not have")
        if got[p] != tuple(want[p]):
            raise OrbaxCheckpointError(f"{pdir}: params{name} is stored with shape {got[p]}, the stored "
                                       f"config expects {tuple(want[p])}")


def restore(path: str, sharding: Any = None, dtype: Optional[str] = None):
    """Restore a converted folder -> (params, cfg, tokenizer or None).

    sharding: None (replicated on the first device), one `jax.sharding.Sharding` for every leaf, or a
              pytree of Shardings with the params' structure. Leaves are restored straight into it
              (the abstract tree is `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`).
    dtype:    optional "float32"/"bfloat16" to restore into (default: the stored dtype); cfg.dtype
              is set to it.
    """
    path = os.path.abspath(path)
    cfg, stored = read_meta(path)
    dt = dtype or stored
    if dt not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dt!r}")
    shapes = param_shapes(cfg)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        shard_tree = jax.tree.map(lambda _: sharding, shapes, is_leaf=_is_shape)
    else:
        shard_tree = sharding
        if jax.tree.structure(shard_tree) != jax.tree.structure(shapes, is_leaf=_is_shape):
            raise ValueError("sharding must be one Sharding or a pytree of Shardings shaped like the params")
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, jnp.dtype(dt), sharding=sh),
                            shapes, shard_tree, is_leaf=_is_shape)
    pdir = os.path.join(path, "params")
    if not os.path.isdir(pdir):
        raise OrbaxCheckpointError(f"{path!r} has no params/ folder")
    ckptr = ocp.StandardCheckpointer()
    _check_stored_shapes(ckptr, pdir, shapes)
    try:
        params = ckptr.restore(pdir, abstract)
    except Exception as e:
        raise OrbaxCheckpointError(f"cannot restore {pdir}: {type(e).__name__}: {e}") from e
    tdir = os.path.join(path, "tokenizer")
    tok = load_tokenizer(tdir, cfg) if has_tokenizer(tdir) else None
    return params, cfg.replace(dtype=dt), tok


def load_model(path: str, dtype: Optional[str] = None, attn_impl: Optional[str] = None, sharding: Any = None,
               layout: str = "auto"):
    """(params, cfg, tokenizer|None) from either a converted Orbax folder or an HF folder.

    A folder with `timerome_config.json` is restored with `restore(path, sharding, dtype)`; a
    folder with `config.json` is read with `hf_weights.load_pretrained(path, dtype)` (then placed with
    `sharding` if one is given). attn_impl overrides cfg.attn_impl when given.
    layout: "stacked" (params["layers"] one dict of [L, ...] arrays, a rolled layer scan),
            "unstacked" (a list of L per-layer dicts, an unrolled layer loop: the fast generation
            path on GPU) or "auto" (= unstacked when `jax.default_backend()` is "gpu", else
            stacked); see `model.resolve_layout` and docs/performance.md. `sharding` describes the
            stacked tree; unstacking slices each leaf on its devices and frees it right away.
    """
    want_layout = resolve_layout(layout)  # a bad value fails before anything is read
    if is_converted(path):
        params, cfg, tok = restore(path, sharding=sharding, dtype=dtype)
    elif os.path.isfile(os.path.join(path, "config.json")):
        params, cfg, tok = load_pretrained(path, dtype=dtype)
        if sharding is not None:
            params = jax.device_put(params, sharding)
    else:
        raise OrbaxCheckpointError(f"{path!r} is neither a converted checkpoint ({META}) nor a Hugging Face "
                                   "folder (config.json)")
    if attn_impl is not None:
        cfg = cfg.replace(attn_impl=attn_impl)
    if want_layout == "unstacked":
        params = unstack(params, consume=True)  # the loader's own arrays: nobody else holds them
    return params, cfg, tok


class NoTokenizerError(ValueError):
    """A model folder without tokenizer files (evaluation, tracing and editing need one)."""


def load_model_with_tokenizer(path, dtype: Optional[str] = None, attn_impl: str = "xla", layer_unroll: int = 1,
                              layout: str = "auto"):
    """(params, cfg, tokenizer) of a local HF or converted model folder (`load_model`) that must have a
    tokenizer; `layer_unroll` is set on the returned config (it only matters for stacked params);
    layout: "stacked" | "unstacked" | "auto" as in `load_model`."""
    resolve_layout(layout)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    params, cfg, tok = load_model(str(path), dtype=dtype, attn_impl=attn_impl, layout=layout)
    cfg = cfg.replace(layer_unroll=layer_unroll)
    if tok is None:
        raise NoTokenizerError(f"model folder {path} has no tokenizer files (tokenizer.json); evaluation, "
                               "tracing and editing need one")
    return params, cfg, tok
