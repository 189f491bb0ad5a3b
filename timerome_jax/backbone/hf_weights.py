"""Hugging Face safetensors folders <-> params: key maps, strict loading, streaming save.

Loading is strict: every expected HF tensor must be present exactly once with the right shape, and
nothing unexpected may be left over (config.json is translated by `hf_config`). Stacked [L, ...]
(and [L, E, ...]) arrays are preallocated once on the device and filled tensor by tensor from
`safetensors.safe_open` (each tensor transposed and cast on the device), so host memory holds one
tensor at a time and a sharded 8B checkpoint never needs a second full copy. Saving transposes each
leaf on the device and streams its tensors out.
"""
from __future__ import annotations

import functools
import json
import os
import re
from contextlib import ExitStack
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.hf_config import LAYOUT, config_from_hf, hf_config_dict, read_config_json
from timerome_jax.backbone.model import param_shapes, stack as stack_layers
from timerome_jax.backbone.tokenizer import Tokenizer, TokenizerError, has_tokenizer, load_tokenizer, own_mask_id
from timerome_jax.io import atomic_dir


class CheckpointError(ValueError):
    """The safetensors files do not match the expected keys/shapes, or a file is unreadable."""


_SAFE_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
# Tensors some checkpoints carry that are pure functions of the config (old Llama rotary buffers).
_IGNORABLE_KEYS = (re.compile(r".*\.rotary_emb\.inv_freq$"),)


# =================================================================================================
# key maps: HF key -> (our leaf path, index into the leaf, transpose?)
# =================================================================================================
def key_map(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """Every HF tensor name of `cfg`'s layout -> (param path, leading index, transpose [out,in]->[in,out]).

    Together the entries fill every leaf of `model.param_shapes(cfg)` exactly once.
    """
    lay = LAYOUT[cfg.family]
    m: dict = {}

    def put(key, path, idx=(), t=False):
        assert key not in m, key
        m[key] = (path, idx, t)

    if lay == "llada":
        p = "model.transformer."
        put(p + "wte.weight", ("embed",))
        put(p + "ln_f.weight", ("final_norm",))
        if not cfg.tie_embeddings:
            put(p + "ff_out.weight", ("lm_head",), (), True)
        names = {"attn_norm": ("attn_norm", False), "q_proj": ("wq", True), "k_proj": ("wk", True),
                 "v_proj": ("wv", True), "attn_out": ("wo", True), "ff_norm": ("mlp_norm", False),
                 "ff_proj": ("w_gate", True), "up_proj": ("w_up", True), "ff_out": ("w_down", True)}
        for i in range(cfg.n_layers):
            for hf, (ours, t) in names.items():
                put(f"{p}blocks.{i}.{hf}.weight", ("layers", ours), (i,), t)
            if cfg.qkv_bias:
                for hf, ours in (("q_proj", "bq"), ("k_proj", "bk"), ("v_proj", "bv")):
                    put(f"{p}blocks.{i}.{hf}.bias", ("layers", ours), (i,))
        return m

    # qwen2 / llama / lladamoe share the HF Llama naming
    put("model.embed_tokens.weight", ("embed",))
    put("model.norm.weight", ("final_norm",))
    if not cfg.tie_embeddings:
        put("lm_head.weight", ("lm_head",), (), True)
    for i in range(cfg.n_layers):
        b = f"model.layers.{i}."
        put(b + "input_layernorm.weight", ("layers", "attn_norm"), (i,))
        put(b + "post_attention_layernorm.weight", ("layers", "mlp_norm"), (i,))
        for hf, ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            put(f"{b}self_attn.{hf}.weight", ("layers", ours), (i,), True)
        if cfg.qkv_bias:
            for hf, ours in (("q_proj", "bq"), ("k_proj", "bk"), ("v_proj", "bv")):
                put(f"{b}self_attn.{hf}.bias", ("layers", ours), (i,))
        if cfg.qk_norm:
            put(b + "self_attn.q_norm.weight", ("layers", "q_norm"), (i,))
            put(b + "self_attn.k_norm.weight", ("layers", "k_norm"), (i,))
        mlp = (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down"))
        if cfg.is_moe:
            put(b + "mlp.gate.weight", ("layers", "router"), (i,), True)
            for e in range(cfg.n_experts):
                for hf, ours in mlp:
                    put(f"{b}mlp.experts.{e}.{hf}.weight", ("layers", ours), (i, e), True)
        else:
            for hf, ours in mlp:
                put(f"{b}mlp.{hf}.weight", ("layers", ours), (i,), True)
    return m


def _leaf_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    out = {}
    for k, v in param_shapes(cfg).items():
        if isinstance(v, dict):
            out.update({(k, kk): tuple(vv) for kk, vv in v.items()})
        else:
            out[(k,)] = tuple(v)
    return out


def _expected_hf_shape(leaf_shape, idx, t):
    s = tuple(leaf_shape[len(idx):])
    return s[::-1] if t else s


# =================================================================================================
# reading safetensors
# =================================================================================================
class _Files:
    """Open safetensors files of one folder; maps every key to its file, reads tensors as numpy."""

    def __init__(self, path: str, stack: ExitStack):
        self.stack, self.path = stack, path
        self.np, self.pt = {}, {}
        self.key_file: dict[str, str] = {}
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    wm = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
            files = sorted(set(wm.values()))
            for name in files:
                if not os.path.isfile(os.path.join(path, name)):
                    some = next(k for k, v in wm.items() if v == name)
                    raise CheckpointError(f"{index} maps {some!r} to {name!r}, which does not exist in {path}")
        else:
            wm = None
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            if not files:
                hint = " (PyTorch .bin checkpoints are not supported; convert to safetensors)" \
                    if any(n.endswith(".bin") for n in os.listdir(path)) else ""
                raise CheckpointError(f"no *.safetensors files in {path}{hint}")
        for name in files:
            h = self._open(name, "numpy")
            for k in h.keys():
                if k in self.key_file:
                    raise CheckpointError(f"tensor {k!r} appears twice: in {self.key_file[k]} and in {name}")
                self.key_file[k] = name
        if wm is not None:
            for k, name in wm.items():
                if self.key_file.get(k) != name:
                    raise CheckpointError(f"model.safetensors.index.json maps {k!r} to {name}, but "
                                          f"{'it is in ' + self.key_file[k] if k in self.key_file else 'no file holds it'}")
            extra = sorted(set(self.key_file) - set(wm))
            if extra:
                raise CheckpointError(f"{self.key_file[extra[0]]} holds {extra[0]!r}, which "
                                      "model.safetensors.index.json does not list")

    def _open(self, name: str, framework: str):
        cache = self.np if framework == "numpy" else self.pt
        if name not in cache:
            fp = os.path.join(self.path, name)
            try:
                cache[name] = self.stack.enter_context(safe_open(fp, framework=framework))
            except Exception as e:  # SafetensorError: truncated, bad header, ...
                raise CheckpointError(f"{fp}: unreadable safetensors file (truncated or corrupt?): {e}") from e
        return cache[name]

    def shape_dtype(self, key):
        name = self.key_file[key]
        s = self._open(name, "numpy").get_slice(key)
        return tuple(s.get_shape()), s.get_dtype()

    def read(self, key) -> np.ndarray:
        name = self.key_file[key]
        _, dt = self.shape_dtype(key)
        try:
            if dt != "BF16":
                return self._open(name, "numpy").get_tensor(key)
            # numpy has no bfloat16: read through torch and reinterpret the bits as ml_dtypes.bfloat16
            try:
                import torch  # optional (the `test` extra): the fastest bf16 reader
            except ImportError:
                with jax.default_device(jax.devices("cpu")[0]):
                    return np.asarray(self._open(name, "flax").get_tensor(key))
            t = self._open(name, "pt").get_tensor(key)
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.path, name)}: cannot read tensor {key!r}: {e}") from e


def _fmt_keys(keys, n=8):
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def load_params(path: str, cfg: ModelConfig, dtype: Optional[str] = None):
    """Read the safetensors in folder `path` into the params tree of `cfg` (strict).

    dtype: "float32" | "bfloat16" | None (None: bfloat16 if every tensor is stored as BF16, else
    float32). Returns (params, dtype_used). Raises CheckpointError naming the key/file on any
    missing, unexpected, duplicated or mis-shaped tensor, or an unreadable file.
    """
    kmap = key_map(cfg)
    leaves = _leaf_shapes(cfg)
    with ExitStack() as stack:
        files = _Files(path, stack)
        present = set(files.key_file)
        missing = set(kmap) - present
        if missing:
            raise CheckpointError(f"{path}: {len(missing)} tensor(s) expected for family {cfg.family!r} are "
                                  f"missing: {_fmt_keys(missing)}")
        unexpected = {k for k in present - set(kmap) if not any(p.match(k) for p in _IGNORABLE_KEYS)}
        if unexpected:
            k0 = sorted(unexpected)[0]
            raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensor(s) for family {cfg.family!r} "
                                  f"(first in {files.key_file[k0]}): {_fmt_keys(unexpected)}")
        dts = set()
        for key, (leaf, idx, t) in kmap.items():
            shp, dt = files.shape_dtype(key)
            want = _expected_hf_shape(leaves[leaf], idx, t)
            if shp != want:
                raise CheckpointError(f"{os.path.join(path, files.key_file[key])}: tensor {key!r} has shape "
                                      f"{list(shp)}, expected {list(want)} from config.json")
            if dt not in _SAFE_DTYPES:
                raise CheckpointError(f"{os.path.join(path, files.key_file[key])}: tensor {key!r} has dtype "
                                      f"{dt}; supported: {sorted(_SAFE_DTYPES)}")
            dts.add(dt)
        if dtype is None:
            dtype = "bfloat16" if dts == {"BF16"} else "float32"
        np_dt = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
        by_leaf: dict = {}
        for key, (leaf, idx, t) in kmap.items():
            by_leaf.setdefault(leaf, []).append((key, idx, t))
        params: dict = {}
        for leaf, shape in leaves.items():
            entries = by_leaf.get(leaf, [])
            n_idx = len(entries[0][1]) if entries else 0
            filled = np.zeros(shape[:n_idx], bool)
            # one preallocated device buffer per stacked leaf; a whole-leaf tensor needs none
            buf = jnp.zeros(shape, np_dt) if n_idx else None
            for key, idx, t in entries:
                if filled[idx]:
                    raise CheckpointError(f"{leaf} index {idx} is filled twice (second time by {key!r})")
                if n_idx:
                    buf = _fill(buf, files.read(key), np.asarray(idx, np.int32).reshape(n_idx), transpose=t)
                else:
                    buf = _swap_cast(files.read(key), t, np.dtype(np_dt))
                filled[idx] = True
            if not filled.all():
                raise CheckpointError(f"param {'/'.join(leaf)} was not completely filled from {path}")
            node = params
            for part in leaf[:-1]:
                node = node.setdefault(part, {})
            node[leaf[-1]] = buf
            del buf
    return params, dtype


@functools.partial(jax.jit, static_argnames=("transpose", "dtype"))
def _swap_cast(x, transpose: bool, dtype):
    """x with its last two axes swapped when `transpose` (HF [out, in] <-> ours [in, out]), cast to
    dtype, on the device."""
    return (jnp.swapaxes(x, -1, -2) if transpose else x).astype(dtype)


@functools.partial(jax.jit, static_argnames=("transpose",), donate_argnums=(0,))
def _fill(buf, x, idx, transpose: bool):
    """buf [*lead, ...] with one file tensor x written at the lead index idx [n] int32, transposed from
    HF's [out, in] when `transpose` and cast to buf's dtype on the device (a host-side transpose of a
    large matrix is a strided copy, several times slower than the file read; the buffer is donated,
    so the update is in place)."""
    x = _swap_cast(x, transpose, buf.dtype)
    n = idx.shape[0]
    start = tuple(idx[i] for i in range(n)) + (0,) * x.ndim
    return jax.lax.dynamic_update_slice(buf, x.reshape((1,) * n + x.shape), start)


# =================================================================================================
# public API
# =================================================================================================
def load_pretrained(path: str, dtype: Optional[str] = None, attn_impl: str = "xla"):
    """Load a local HF MDLM folder -> (params, cfg, tokenizer or None).

    path: folder with config.json, *.safetensors (one file or shards with/without
          model.safetensors.index.json) and optionally tokenizer files (tokenizer.json, ...).
    dtype: params/compute dtype "float32" | "bfloat16" | None (= the checkpoint's: bfloat16 if all
           tensors are BF16, else float32).
    attn_impl: "xla" (CPU/tests) or "cudnn" (GPU bf16).
    Params follow `model.param_shapes(cfg)` (leaves are jax arrays of `dtype`).

    Mask id: config.json's mask_token_id; if config.json has none, the tokenizer's mask token,
    else the family default (DiffuLLaMA: 811). A tokenizer whose own mask token disagrees with an
    explicit config mask_token_id raises TokenizerError.
    """
    if dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"dtype must be None, 'float32' or 'bfloat16', got {dtype!r}")
    d = read_config_json(path)
    cfg = config_from_hf(d)
    tok = None
    if has_tokenizer(path):
        tok = load_tokenizer(path)
        own = own_mask_id(tok.hf)
        if d.get("mask_token_id") is None and own is not None:
            cfg = cfg.replace(mask_token_id=own)
        elif own is not None and own != cfg.mask_token_id:
            raise TokenizerError(
                f"tokenizer in {path!r} has mask token {tok.hf.convert_ids_to_tokens(own)!r} with id {own}, "
                f"but config.json says mask_token_id={cfg.mask_token_id}")
        if tok.vocab_size > cfg.vocab_size:
            raise TokenizerError(f"tokenizer in {path!r} has {tok.vocab_size} tokens but the model's vocab "
                                 f"is only {cfg.vocab_size}")
        tok = Tokenizer(tok.hf, source_dir=tok.source_dir, mask_id=cfg.mask_token_id)
    params, used = load_params(path, cfg, dtype)
    cfg = cfg.replace(dtype=used, attn_impl=attn_impl)
    return params, cfg, tok


def _write_safetensors(fp: str, entries, metadata: dict):
    """Stream a safetensors file. entries: list of (key, shape, st_dtype, producer() -> np.ndarray).

    The header is computed from shapes first, so tensors are produced and written one at a time.
    """
    itemsize = {"F32": 4, "BF16": 2, "F16": 2}
    header: dict[str, Any] = {"__metadata__": metadata}
    off = 0
    for key, shape, dt, _ in entries:
        n = int(np.prod(shape, dtype=np.int64)) * itemsize[dt]
        header[key] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the data section starts 8-byte aligned
    with open(fp, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for key, shape, dt, produce in entries:
            x = np.ascontiguousarray(produce())
            if tuple(x.shape) != tuple(shape):
                raise CheckpointError(f"internal: tensor {key!r} has shape {x.shape}, header says {shape}")
            f.write(memoryview(x.reshape(-1).view(np.uint8)))


def save_pretrained(params, cfg: ModelConfig, path: str, tokenizer: Optional[Tokenizer] = None,
                    dtype: str = "float32") -> None:
    """Write `params` as an HF folder in `cfg.family`'s layout: config.json (the family's real
    field names, e.g. LLaDA's d_model/n_heads/...; architectures ["LLaDAModelLM"]), model.safetensors
    ([out,in] weights) and the tokenizer files. Written atomically: a temp folder next to `path`
    is filled, then renamed. `load_pretrained(path)` gives back identical params.

    dtype: "float32" | "bfloat16" storage dtype of the tensors.
    params in either layout; unstacked ones are stacked first (a copy of the layer weights while
    saving).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    params = stack_layers(params)
    d = hf_config_dict(cfg, dtype)
    leaves = _leaf_shapes(cfg)
    for leaf, shape in leaves.items():
        node = params
        for part in leaf:
            if not isinstance(node, dict) or part not in node:
                raise CheckpointError(f"params lack {'/'.join(leaf)} required by the config")
            node = node[part]
        if tuple(node.shape) != shape:
            raise CheckpointError(f"params {'/'.join(leaf)} has shape {tuple(node.shape)}, config expects {shape}")
    np_dt, st_dt = (np.float32, "F32") if dtype == "float32" else (ml_dtypes.bfloat16, "BF16")
    kmap = key_map(cfg)
    by_leaf: dict = {}
    for key, (leaf, idx, t) in kmap.items():
        by_leaf.setdefault(leaf, []).append((key, idx, t))
    host: dict = {}  # one leaf on the host at a time

    def producer(leaf, idx, t):
        def produce():
            if host.get("leaf") != leaf:
                node = params
                for part in leaf:
                    node = node[part]
                host.clear()
                # in HF orientation and dtype, made on the device: each tensor is then a contiguous slice
                host.update(leaf=leaf, arr=np.asarray(jax.device_get(_swap_cast(node, t, np.dtype(np_dt)))))
            return host["arr"][idx]
        return produce

    entries = []
    for leaf in leaves:
        for key, idx, t in by_leaf[leaf]:
            entries.append((key, _expected_hf_shape(leaves[leaf], idx, t), st_dt, producer(leaf, idx, t)))
    with atomic_dir(path) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
        _write_safetensors(os.path.join(tmp, "model.safetensors"), entries, {"format": "pt"})
        host.clear()
        if tokenizer is not None:
            tokenizer.save(tmp)
