"""The Forget Quality reference: the retain model's forget truth ratios, from the files packaged with
the retain model, a cache in the output folder, or computed by evaluating the retain model.

The reference must be the model trained on the split's retain set (forget01 -> retain99, forget05 ->
retain95, forget10 -> retain90; `models.retain_model_for`). `resolve_reference` picks it or checks
a given one, and `cached_retain_tr` refuses a mismatch unless `override=True`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from timerome_jax.backbone.checkpoint import load_model_with_tokenizer
from timerome_jax.io import write_json
from timerome_jax.tofu import data as tofu
from timerome_jax.tofu.evaluate import evaluate, spread_rows
from timerome_jax.tofu.models import (MissingReferenceError, ReferenceMismatchError, check_reference,
                                      expected_retain_split, retain_model_for, retain_split_of, truth_ratios_only)
from timerome_jax.tofu.truth_ratios import forget_tr_by_index, load_retain_tr

AUTO = "auto"


def retain_tr_cache_path(out_dir, split: str, n_mc: int, estimator: str = "auto") -> Path:
    """Where `cached_retain_tr` keeps the retain model's forget TRs for (split, n_mc, estimator)."""
    return Path(out_dir) / f"retain_forget_tr_{split}_nmc{n_mc}_{estimator}.json"


def resolve_reference(split: str, retain_model=AUTO, override: bool = False) -> dict:
    """Which reference model Forget Quality on `split` uses, as a JSON-ready record:
    {"split", "model" (a folder, or None when there is none), "retain_split" (what the folder
    records), "expected" (retain99/95/90), "reference_override" (bool), "message" (why None)}.

    retain_model: "auto"/None = the packaged reference for the split (`models.retain_model_for`);
    a folder = that one, checked against the split (`models.check_reference`: a mismatch or an
    unrecorded retain set raises ReferenceMismatchError unless `override`)."""
    want = expected_retain_split(split)
    rec = {"split": split, "model": None, "retain_split": None, "expected": want, "reference_override": False,
           "message": None}
    if retain_model in (None, AUTO):
        try:
            folder = retain_model_for(split)
        except MissingReferenceError as e:
            rec["message"] = str(e)
            return rec
        info = check_reference(split, folder)
    else:
        if not Path(retain_model).is_dir():
            rec["message"] = f"no reference model at {retain_model}: Forget Quality is None"
            return rec
        info = check_reference(split, retain_model, override=override)
    rec.update(model=info["model"], retain_split=info["retain_split"],
               reference_override=bool(override) and info["retain_split"] != want)
    return rec


def _forget_keys(split: str, limit: Optional[int]) -> list[str]:
    n = len(tofu.load_split(f"{split}_perturbed", subjects=False))
    return [str(i) for i in spread_rows(n, limit)]


def _usable(d: dict, split: str, n_mc: int, estimator: str, limit, keys: list[str]) -> dict:
    """The by_seed TRs of a reference file if it was computed for this setting (same split, n_mc,
    estimator, limit) and covers the forget rows evaluated, else {}."""
    if (d.get("split", split) != split or d.get("n_mc", n_mc) != n_mc or d.get("estimator", estimator) != estimator
            or d.get("limit") != limit):
        return {}
    return {s: v for s, v in d.get("by_seed", {}).items() if all(k in v for k in keys)}


def cached_retain_tr(out_dir, split: str, seeds: Sequence[int], n_mc: int, retain_model=AUTO,
                     estimator: str = "auto", limit: Optional[int] = None, batch_size: int = 16,
                     progress: bool = True, loader=None, length_bucket: int = 32,
                     override: bool = False, record: Optional[dict] = None) -> Optional[dict]:
    """The reference model's forget TRs {seed: {row: TR}} for `seeds`, from the reference JSON
    bundled in the reference folder (`<folder>/reference/`) or the cache JSON in `out_dir` when they
    have them, else computed (loading the reference) and added to the cache.

    retain_model: "auto"/None = the packaged reference matching `split`; a folder is checked
    against the split (`resolve_reference`; a mismatch raises unless `override`). Returns None when
    there is no reference (e.g. forget05 before a retain95 model is packaged): FQ is then None.
    record: a dict that receives `resolve_reference`'s record (for the report)."""
    ref = resolve_reference(split, retain_model, override)
    if record is not None:
        record.update(ref)
    if ref["model"] is None:
        return None
    retain_model = ref["model"]
    path = retain_tr_cache_path(out_dir, split, n_mc, estimator)
    keys = _forget_keys(split, limit)
    have = {}
    packaged = Path(retain_model) / "reference" / path.name  # shipped with the model (experiments/retain_reference.py)
    if packaged.is_file():
        with open(packaged, encoding="utf-8") as f:
            have = _usable(json.load(f), split, n_mc, estimator, limit, keys)
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("model") == str(retain_model):
            have.update(_usable(d, split, n_mc, estimator, limit, keys))
    missing = [s for s in seeds if str(s) not in have]
    if not missing:
        return {k: have[k] for k in map(str, seeds)}
    if truth_ratios_only(retain_model):
        raise MissingReferenceError(
            f"{split}: the reference {retain_model} ships only its forget truth ratios "
            f"({shipped_settings(retain_model) or 'none'}), not for n_mc={n_mc}, limit={limit}, "
            f"estimator={estimator!r}, seeds {missing}. Evaluate with a shipped setting, or train the "
            f"{ref['expected']} weights (experiments/train_reference.py {ref['expected']}, then "
            f"experiments/package_suite.py) and pass them with --retain-model")
    params, cfg, tok = (loader or load_model_with_tokenizer)(retain_model)
    res = evaluate(params, cfg, tok, split, metrics=("forget_tr",), n_mc=n_mc, seeds=missing,
                   batch_size=batch_size, progress=progress, limit=limit, estimator=estimator,
                   length_bucket=length_bucket)
    have.update(forget_tr_by_index(res))
    os.makedirs(out_dir, exist_ok=True)
    payload = {"kind": "timerome_retain_forget_tr", "model": str(retain_model), "split": split, "n_mc": n_mc,
               "estimator": estimator, "limit": limit, "row_selection": res["row_selection"],
               "retain_split": ref["retain_split"], "by_seed": have}
    write_json(path, payload)
    return {k: have[k] for k in map(str, seeds)}


def shipped_settings(model_dir) -> str:
    """The settings a reference folder ships truth ratios for, as text ("forget05 n_mc=4 limit=40
    seeds 0-4; ..."), "" when it ships none."""
    out = []
    for f in sorted((Path(model_dir) / "reference").glob("retain_forget_tr_*.json")):
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        seeds = ",".join(sorted(d.get("by_seed", {}), key=int))
        out.append(f"{d.get('split')} n_mc={d.get('n_mc')} limit={d.get('limit')} seeds {seeds}")
    return "; ".join(out)


def load_reference_tr(path, split: str, override: bool = False) -> tuple[dict, dict]:
    """Read a reference forget-TR file (`save_retain_tr` / `cached_retain_tr` format) for `split`
    and check its retain set like `resolve_reference`: the file's "retain_split", else the metadata
    of the model folder it names. Returns ({seed: {row: TR}}, record as in `resolve_reference`)."""
    by_seed = load_retain_tr(path)
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    if d.get("split") not in (None, split):
        raise ValueError(f"{path} holds truth ratios of {d['split']}'s forget set, not {split}'s")
    want = expected_retain_split(split)
    have = d.get("retain_split")
    if have is None and d.get("model") and Path(d["model"]).is_dir():
        have = retain_split_of(d["model"])
    if have != want and not override:
        raise ReferenceMismatchError(
            f"{split}: the reference truth ratios {path} come from a model trained on "
            f"{have or 'an unrecorded retain set'}, but {split}'s Forget Quality needs a model trained on {want}. "
            f"Pass the reference override flag to use them anyway (the report then says reference_override: true)")
    rec = {"split": split, "model": d.get("model"), "tr_file": str(path), "retain_split": have, "expected": want,
           "reference_override": bool(override) and have != want, "message": None}
    return by_seed, rec
