"""The TOFU models packaged with timerome-jax (HF LLaDA-layout folders under `timerome_jax/assets/`)
and the Forget Quality reference that goes with each forget split.

TOFU's FQ compares the evaluated model's forget-set truth ratios with those of a model fine-tuned
only on the matching retain set (forget01 -> retain99, forget05 -> retain95, forget10 -> retain90):
a retain99 model has seen 8 of the 10 forget05 authors, so it is no reference for forget05.

Every reference folder records the retain set it was trained on in `timerome_reference.json`
next to its config.json:

    {"kind": "timerome_tofu_reference", "retain_split": "retain95", "forget_split": "forget05", ...}

`retain_model_for(split)` returns the packaged reference for a split (`tofu_retain99/95/90`; the
older `tofu_retain` folder is the retain99 one) and `check_reference` refuses a folder whose retain
set does not match the split unless the caller overrides it explicitly.

A reference folder may hold only its metadata and `reference/` (the model's forget truth ratios for
given settings), without weights: the 50 MB weights budget holds the retain99 model but not the
retain95 / retain90 ones. Such a folder serves Forget Quality for the settings it ships
(its metadata says `"weights_packaged": false`; `truth_ratios_only`); other settings need the weights
(`experiments/train_reference.py`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from timerome_jax.io import write_json

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "tofu_target"

RETAIN_FOR_SPLIT = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
REFERENCE_INFO = "timerome_reference.json"
REFERENCE_KIND = "timerome_tofu_reference"
# packaged folders searched for each retain set, first match wins (tofu_retain predates the split names)
PACKAGED_REFERENCES = {
    "retain99": (ASSETS / "tofu_retain99", ASSETS / "tofu_retain"),
    "retain95": (ASSETS / "tofu_retain95",),
    "retain90": (ASSETS / "tofu_retain90",),
}


class MissingReferenceError(FileNotFoundError):
    """No packaged reference model exists for a forget split (Forget Quality cannot be computed)."""


class ReferenceMismatchError(ValueError):
    """A reference model was trained on a retain set that does not match the forget split."""


def expected_retain_split(split: str) -> str:
    """The retain set whose model is the FQ reference for forget `split` (forget05 -> retain95)."""
    if split not in RETAIN_FOR_SPLIT:
        raise ValueError(f"split must be one of {tuple(RETAIN_FOR_SPLIT)}, got {split!r}")
    return RETAIN_FOR_SPLIT[split]


def reference_info(model_dir) -> Optional[dict]:
    """The reference metadata of a model folder (its `timerome_reference.json`), or None if absent."""
    path = Path(model_dir) / REFERENCE_INFO
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read reference metadata {path}: {e}") from e
    if not isinstance(d, dict) or d.get("kind") != REFERENCE_KIND or d.get("retain_split") not in PACKAGED_REFERENCES:
        raise ValueError(f"{path}: expected kind {REFERENCE_KIND!r} and retain_split one of "
                         f"{tuple(PACKAGED_REFERENCES)}, got kind={d.get('kind')!r}, "
                         f"retain_split={d.get('retain_split')!r}" if isinstance(d, dict) else f"{path}: not a JSON object")
    return d


def write_reference_info(model_dir, retain_split: str, **extra) -> Path:
    """Record in `model_dir` that it is an FQ reference trained on `retain_split` (retain99/95/90).
    extra: anything worth keeping (recipe, steps, source run); written atomically."""
    if retain_split not in PACKAGED_REFERENCES:
        raise ValueError(f"retain_split must be one of {tuple(PACKAGED_REFERENCES)}, got {retain_split!r}")
    forget = {v: k for k, v in RETAIN_FOR_SPLIT.items()}[retain_split]
    path = Path(model_dir) / REFERENCE_INFO
    write_json(path, {"kind": REFERENCE_KIND, "retain_split": retain_split, "forget_split": forget, **extra})
    return path


def retain_split_of(model_dir) -> Optional[str]:
    """The retain set a reference folder was trained on (from its metadata), None when not recorded."""
    info = reference_info(model_dir)
    return None if info is None else info["retain_split"]


def truth_ratios_only(model_dir) -> bool:
    """Whether a reference folder ships only its truth ratios: its metadata says
    `"weights_packaged": false` (no weights to load; `reference/` holds the TRs)."""
    info = reference_info(model_dir)
    return info is not None and info.get("weights_packaged") is False


def retain_model_for(split: str) -> Path:
    """The packaged reference model folder for forget `split` (forget01 -> the retain99 model, ...).

    Raises MissingReferenceError (naming the folders looked at) when none is packaged, and
    ReferenceMismatchError when a packaged folder records another retain set."""
    want = expected_retain_split(split)
    for folder in PACKAGED_REFERENCES[want]:
        if (folder / "config.json").is_file() or truth_ratios_only(folder):
            check_reference(split, folder)
            return folder
    raise MissingReferenceError(
        f"no packaged {want} reference model for {split} (looked for "
        f"{', '.join(str(f) for f in PACKAGED_REFERENCES[want])}): Forget Quality needs a model trained on "
        f"{want} only; pass one with --retain-model, or FQ stays None")


def check_reference(split: str, model_dir, override: bool = False) -> dict:
    """Check that `model_dir` is the right FQ reference for forget `split`.

    Returns {"model", "retain_split" (None when unrecorded), "expected", "override"}; raises
    ReferenceMismatchError when the recorded retain set differs from the expected one, or is not
    recorded, unless `override` (the caller then reports "reference_override": true)."""
    want = expected_retain_split(split)
    have = retain_split_of(model_dir)
    info = {"model": str(model_dir), "retain_split": have, "expected": want, "override": bool(override)}
    if have == want or override:
        return info
    if have is None:
        raise ReferenceMismatchError(
            f"{split}: the reference {model_dir} does not record its retain set ({REFERENCE_INFO} is missing); "
            f"expected a model trained on {want}. Pass the reference override flag to use it anyway "
            f"(the report then says reference_override: true), or record it with models.write_reference_info")
    raise ReferenceMismatchError(
        f"{split}: the reference {model_dir} was trained on {have}, but {split}'s Forget Quality needs a model "
        f"trained on {want} (a {have} model has seen forget authors of {split}). Pass the reference override "
        f"flag to use it anyway (the report then says reference_override: true)")


def _default_retain() -> Path:
    for folder in PACKAGED_REFERENCES["retain99"]:
        if (folder / "config.json").is_file():
            return folder
    return PACKAGED_REFERENCES["retain99"][0]


DEFAULT_RETAIN_MODEL = _default_retain()  # the forget01 (retain99) reference
PACKAGED_RETAIN_TR = DEFAULT_RETAIN_MODEL / "reference"  # bundled retain-model forget TRs
