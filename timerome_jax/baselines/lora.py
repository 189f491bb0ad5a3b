"""LoRA adapters for the stacked-layer params: their own pytree, the base weights never touched.

An adapter is {"A": {name: [L, Din, r]}, "B": {name: [L, r, Dout]}, "scale": f32 scalar} for chosen
layer matrices `name` (wq, wk, wv, wo, w_gate, w_up, w_down). `merge(params, adapter)` returns a NEW
params tree with W_l + scale * A_l @ B_l for every layer l; B starts at zero, so a fresh adapter
merges to the base params exactly (Hu et al., arXiv:2106.09685: A Gaussian, B zero, scale alpha / r).
Adapters are saved to one .npz atomically with a JSON header and a sha256 of the arrays, like the
edit memory (`method/memory.py`), and `load` checks both.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from timerome_jax.backbone import model
from timerome_jax.io import atomic_path

MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo")
FORMAT_NAME = "timerome_lora_adapter"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """A LoRA adapter file that is missing entries, corrupt, or of another format."""


def init(key, params, rank: int, targets: Sequence[str] = DEFAULT_TARGETS, alpha: Optional[float] = None,
         dtype=jnp.float32) -> dict:
    """A fresh adapter of rank `rank` on `targets` (A ~ N(0, 1/Din), B = 0); scale = alpha / rank
    (alpha None = rank, i.e. scale 1)."""
    if rank < 1:
        raise ValueError(f"lora.init: rank must be >= 1, got {rank}")
    shapes, L = model.layer_shapes(params), model.n_layers(params)  # either params layout
    bad = [t for t in targets if t not in MATRICES or t not in shapes or len(shapes[t]) != 2]
    if bad or not targets:
        raise ValueError(f"lora.init: targets {list(bad) or list(targets)} are not dense layer matrices; "
                         f"choose from {[m for m in MATRICES if m in shapes and len(shapes[m]) == 2]}")
    A, B = {}, {}
    for i, name in enumerate(sorted(targets)):
        din, dout = shapes[name]
        A[name] = (jax.random.normal(jax.random.fold_in(key, i), (L, din, rank), jnp.float32)
                   / np.sqrt(din)).astype(dtype)
        B[name] = jnp.zeros((L, rank, dout), dtype)
    scale = float(rank if alpha is None else alpha) / rank
    return {"A": A, "B": B, "scale": jnp.float32(scale)}


def _merged(w, a, b, scale):
    """w + scale * a @ b in float32, cast back to w's dtype; a [..., Din, r], b [..., r, Dout] with
    the same leading axes as w (one layer, or all L)."""
    d = jnp.einsum("...dr,...rf->...df", a.astype(jnp.float32), b.astype(jnp.float32))
    return (w.astype(jnp.float32) + scale * d).astype(w.dtype)


def merge(params, adapter: dict):
    """New params (same layout) with W + scale * A @ B on the adapter's matrices (A [L,Din,r],
    B [L,r,Dout]; the input tree is not modified)."""
    A, B, scale = adapter["A"], adapter["B"], adapter["scale"]
    if model.is_unstacked(params):  # layer by layer: no [L, ...] stack of the weights is built
        out = params
        for l in range(model.n_layers(params)):
            for n in A:
                out = model.with_layer_weight(out, n, l, _merged(model.layer_weight(params, n, l), A[n][l], B[n][l], scale))
        return out
    layers = dict(params["layers"], **{n: _merged(params["layers"][n], A[n], B[n], scale) for n in A})
    return dict(params, layers=layers)


def n_params(adapter: dict) -> int:
    """Trainable numbers in the adapter."""
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves((adapter["A"], adapter["B"]))))


def _arrays(adapter: dict) -> dict:
    out = {}
    for part in ("A", "B"):
        for name, a in adapter[part].items():
            out[f"{part}.{name}"] = np.asarray(a, np.float32)
    return out


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(str(arrays[k].shape).encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def save(adapter: dict, path: Union[str, os.PathLike], meta: Optional[dict] = None) -> None:
    """Write the adapter to one .npz atomically: arrays A.<name>, B.<name> and a JSON header
    (format, version, scale, rank, targets, sha256, and the caller's `meta`)."""
    arrays = _arrays(adapter)
    names = sorted(adapter["A"])
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "scale": float(adapter["scale"]),
              "rank": int(adapter["A"][names[0]].shape[-1]), "targets": names, "sha256": _digest(arrays)}
    clash = sorted(set(meta or {}) & set(header))
    if clash:
        raise ValueError(f"lora.save: meta keys {clash} are reserved")
    header.update(meta or {})
    blob = json.dumps(header, sort_keys=True).encode()
    with atomic_path(os.fspath(path)) as tmp, open(tmp, "wb") as f:
        np.savez(f, meta=np.frombuffer(blob, np.uint8), **arrays)
        f.flush()
        os.fsync(f.fileno())


def load(path: Union[str, os.PathLike]) -> tuple[dict, dict]:
    """Read an adapter written by `save` -> (adapter, header). Raises AdapterFileError on a foreign,
    corrupt or truncated file, FileNotFoundError when it does not exist."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA adapter file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise AdapterFileError(f"{path}: not a LoRA adapter file (no 'meta' entry)")
            header = json.loads(bytes(z["meta"]).decode())
            arrays = {k: z[k] for k in z.files if k != "meta"}
    except AdapterFileError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path}: corrupt or truncated LoRA adapter file ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise AdapterFileError(f"{path}: not a LoRA adapter file")
    if header.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{path}: adapter format version {header.get('format_version')!r}, "
                               f"this library reads {FORMAT_VERSION}")
    if _digest(arrays) != header.get("sha256"):
        raise AdapterFileError(f"{path}: array checksum mismatch (file corrupt)")
    adapter = {"A": {}, "B": {}, "scale": jnp.float32(header["scale"])}
    for name in header["targets"]:
        for part in ("A", "B"):
            key = f"{part}.{name}"
            if key not in arrays:
                raise AdapterFileError(f"{path}: missing entry {key}")
            adapter[part][name] = jnp.asarray(arrays[key])
    return adapter, header
