"""Atomic file writes (a file either appears whole or not at all) and the loaders' first check."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid

import numpy as np
from pathlib import Path


def require_file(folder, name: str, error: type, what: str, hint: str = "") -> str:
    """Path of file `name` in `folder`, checked before a loader reads it: raises `error` (the
    loader's own exception class) naming the folder when the folder or the file is missing.
    `what` names the folder ("checkpoint folder"); `hint` is appended to the missing-file message."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise error(f"{what} {folder!r} does not exist")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise error(f"{folder!r} has no {name}{hint}")
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path in the target's folder; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a fresh temp folder next to `path`; on success it replaces `path` (an existing folder is
    renamed aside, the new one renamed in, the old one deleted), on failure it is removed."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        yield tmp
        if os.path.exists(path):
            old = f"{path}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, default=_default) + "\n")


def _default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
