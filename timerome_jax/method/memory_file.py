"""Edit-memory files: one .npz with the arrays and a JSON header (format name and version).

`save` writes atomically; `load` checks format, version, checksum, shapes and (optionally) the
model fingerprint and coordinate, raising `MemoryFileError`, `ModelMismatchError` or
`CoordinateMismatchError` with the file and field in the message.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Optional, Union

import numpy as np

from timerome_jax.backbone.config import MODULES, module_id
from timerome_jax.io import atomic_path
from timerome_jax.method.memory import EditMemory, from_arrays, make_gate, n_facts

FORMAT_NAME = "timerome-edit-memory"
# 2: optional gate (arrays gate_K, gate_mu, gate_P; header "gate");
# 3: the gate's sequence latch (array gate_n_slots; header gate.tau_seq, null = never latches);
# 4: header gate.token, whether the gate has a per-token gate (`Gate.token`)
FORMAT_VERSION = 4
# version-1 files load as ungated memories, version-2 gates without a latch; in version-2/3 files
# the token gate is present when tau < TAU_OFF (a higher tau never fires: same outputs without it)
READ_VERSIONS = (1, 2, 3, 4)


class MemoryFileError(ValueError):
    """An edit-memory file is missing pieces, corrupt, truncated or of another format version."""


class ModelMismatchError(ValueError):
    """An edit-memory file was built for another model (fingerprint mismatch)."""


class CoordinateMismatchError(ValueError):
    """An edit-memory file sits at another (layer, module[, step]) than expected."""


_ARRAYS = ("U", "Dm", "G", "active")
_GATE_ARRAYS_V2 = ("gate_K", "gate_mu", "gate_P")
_GATE_ARRAYS = _GATE_ARRAYS_V2 + ("gate_n_slots",)
_RESERVED = ("format", "format_version", "fingerprint", "layer", "module", "step", "alpha", "q",
             "lam", "capacity", "d_model", "n_facts", "sha256")
_RESERVED_V2 = _RESERVED + ("gate",)


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in _ARRAYS + tuple(k for k in _GATE_ARRAYS if k in arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(mem: EditMemory, path: Union[str, os.PathLike], meta: Optional[dict] = None) -> None:
    """Write `mem` to one .npz file, atomically (temp file in the same folder, then os.replace).

    The file holds U, Dm, G, active (and gate_K, gate_mu, gate_P, gate_n_slots for a gated memory)
    and a JSON header (entry "meta"): format name and version, fingerprint, layer, module name, step,
    alpha, q, lam, capacity, d_model, n_facts, gate ({"tau", "on", "tau_seq", "token"} or null;
    tau_seq null = the latch never fires; token: has a per-token gate), a sha256 of the arrays, and
    the caller's `meta` (e.g. target_text, fact_ids; JSON-serialisable, keys must
    not clash with the reserved ones above).
    """
    path = os.fspath(path)
    arrays = {"U": np.asarray(mem.U, np.float32), "Dm": np.asarray(mem.Dm, np.float32),
              "G": np.asarray(mem.G, np.float32), "active": np.asarray(mem.active, bool)}
    if mem.gate is not None:
        arrays.update(gate_K=np.asarray(mem.gate.K, np.float32), gate_mu=np.asarray(mem.gate.mu, np.float32),
                      gate_P=np.asarray(mem.gate.P, np.float32),
                      gate_n_slots=(np.zeros(mem.capacity, np.int32) if mem.gate.n_slots is None
                                    else np.asarray(mem.gate.n_slots, np.int32)))
    gate = None
    if mem.gate is not None:
        ts = np.inf if mem.gate.tau_seq is None else float(mem.gate.tau_seq)
        gate = {"tau": float(mem.gate.tau), "on": bool(mem.gate.on),
                "tau_seq": None if not np.isfinite(ts) else ts, "token": bool(mem.gate.token)}
    user = dict(meta or {})
    clash = sorted(set(user) & set(_RESERVED_V2))
    if clash:
        raise ValueError(f"save: meta keys {clash} are reserved for the memory's own fields")
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
              "fingerprint": mem.fingerprint, "layer": int(mem.layer),
              "module": MODULES[mem.module], "step": int(mem.step), "alpha": float(mem.alpha),
              "q": int(mem.q), "lam": float(mem.lam), "capacity": mem.capacity,
              "d_model": mem.d_model, "n_facts": n_facts(mem), "gate": gate, "sha256": _digest(arrays), **user}
    try:
        blob = json.dumps(header, sort_keys=True).encode()
    except TypeError as e:
        raise ValueError(f"save: meta is not JSON-serialisable ({e})") from None
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add ".npz"
        np.savez(f, meta=np.frombuffer(blob, np.uint8), **arrays)
        f.flush()
        os.fsync(f.fileno())


def _norm_coordinate(coord) -> tuple:
    if len(coord) not in (2, 3):
        raise ValueError(f"expect_coordinate must be (layer, module) or (layer, module, step), "
                         f"got {coord!r}")
    out = (int(coord[0]), module_id(coord[1]))
    return out + ((int(coord[2]),) if len(coord) == 3 else ())


def load(path: Union[str, os.PathLike], expect_fingerprint: Optional[str] = None,
         expect_coordinate: Optional[tuple] = None):
    """Read a memory written by `save` -> (EditMemory, meta dict with every header field).

    expect_fingerprint: raise `ModelMismatchError` unless the file was built for this model.
    expect_coordinate: (layer, module) or (layer, module, step), module a name or id; raise
    `CoordinateMismatchError` on a mismatch. A corrupt, truncated or foreign file, or another
    format version, raises `MemoryFileError`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"edit-memory file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise MemoryFileError(f"{path}: not an edit-memory .npz file")
            missing = [k for k in ("meta",) + _ARRAYS if k not in z.files]
            if missing:
                raise MemoryFileError(f"{path}: not an edit-memory file (missing entries {missing})")
            header = json.loads(bytes(z["meta"]).decode())
            arrays = {k: z[k] for k in _ARRAYS + _GATE_ARRAYS if k in z.files}
    except MemoryFileError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError) as e:
        raise MemoryFileError(f"{path}: corrupt or truncated edit-memory file "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise MemoryFileError(f"{path}: not an edit-memory file (format "
                              f"{header.get('format') if isinstance(header, dict) else header!r})")
    version = header.get("format_version")
    if version not in READ_VERSIONS:
        raise MemoryFileError(f"{path}: edit-memory format version {version!r}; "
                              f"this library reads versions {list(READ_VERSIONS)}")
    missing = [k for k in (_RESERVED if version == 1 else _RESERVED_V2) if k not in header]
    if missing:
        raise MemoryFileError(f"{path}: header lacks fields {missing}")
    if _digest(arrays) != header["sha256"]:
        raise MemoryFileError(f"{path}: array checksum mismatch (file corrupt)")
    C, D = header["capacity"], header["d_model"]
    gate_h = header.get("gate")
    has_gate = [k for k in _GATE_ARRAYS if k in arrays]
    need = _GATE_ARRAYS if version >= 3 else _GATE_ARRAYS_V2
    if (gate_h is None and has_gate) or (gate_h is not None and sorted(has_gate) != sorted(need)):
        raise MemoryFileError(f"{path}: header gate {gate_h!r} and gate arrays {has_gate} disagree")
    need_h = {"tau", "on", "token"} if version >= 4 else {"tau", "on"}
    if gate_h is not None and not (isinstance(gate_h, dict) and need_h <= set(gate_h)
                                   and isinstance(gate_h.get("token", True), bool)):
        raise MemoryFileError(f"{path}: header field gate must have {sorted(need_h)} or be null, got {gate_h!r}")
    want = {"U": (C, D), "Dm": (C, D), "G": (C, C), "active": (C,)}
    if gate_h is not None:
        R = arrays["gate_P"].shape[0] if arrays["gate_P"].ndim == 2 else -1
        want.update(gate_K=(C, R), gate_mu=(D,), gate_P=(R, D))
        if version >= 3:
            want["gate_n_slots"] = (C,)
    for k, shp in want.items():
        if arrays[k].shape != shp:
            raise MemoryFileError(f"{path}: entry {k} has shape {arrays[k].shape}, header says {shp}")
    if expect_fingerprint is not None and header["fingerprint"] != expect_fingerprint:
        raise ModelMismatchError(f"{path}: edit memory was built for model "
                                 f"{header['fingerprint']!r}, not {expect_fingerprint!r}")
    if expect_coordinate is not None:
        want_c = _norm_coordinate(expect_coordinate)
        have = (header["layer"], module_id(header["module"]), header["step"])[: len(want_c)]
        if have != want_c:
            fmt = lambda c: (c[0], MODULES[c[1]]) + tuple(c[2:])
            raise CoordinateMismatchError(f"{path}: edit memory sits at (layer, module, step) "
                                          f"{fmt(have)}, expected {fmt(want_c)}")
    gate = None
    if gate_h is not None:
        ts = gate_h.get("tau_seq")
        try:
            gate = make_gate(arrays["gate_K"], arrays["gate_mu"], arrays["gate_P"], gate_h["tau"], gate_h["on"],
                             n_slots=arrays.get("gate_n_slots"), tau_seq=np.inf if ts is None else float(ts),
                             token=gate_h.get("token"))
        except (ValueError, TypeError) as e:
            raise MemoryFileError(f"{path}: bad gate fields ({e})") from None
    mem = from_arrays(arrays["U"], arrays["Dm"], arrays["G"], arrays["active"], header["lam"],
                      header["alpha"], header["q"], header["layer"], module_id(header["module"]),
                      header["step"], header["fingerprint"], gate)
    return mem, header
