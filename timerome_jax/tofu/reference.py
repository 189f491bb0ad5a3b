"""The Forget Quality reference: the retain model's forget truth ratios, from the files packaged with
the retain model, a cache in the output folder, or computed by evaluating the retain model."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from timerome_jax.backbone.checkpoint import load_model_with_tokenizer
from timerome_jax.io import write_json
from timerome_jax.tofu.evaluate import evaluate
from timerome_jax.tofu.models import DEFAULT_RETAIN_MODEL, PACKAGED_RETAIN_TR
from timerome_jax.tofu.truth_ratios import forget_tr_by_index


def retain_tr_cache_path(out_dir, split: str, n_mc: int, estimator: str = "auto") -> Path:
    """Where `cached_retain_tr` keeps the retain model's forget TRs for (split, n_mc, estimator)."""
    return Path(out_dir) / f"retain_forget_tr_{split}_nmc{n_mc}_{estimator}.json"


def cached_retain_tr(out_dir, split: str, seeds: Sequence[int], n_mc: int, retain_model=DEFAULT_RETAIN_MODEL,
                     estimator: str = "auto", limit: Optional[int] = None, batch_size: int = 16,
                     progress: bool = True, loader=None, length_bucket: int = 32) -> Optional[dict]:
    """The retain model's forget TRs for `seeds`, from the reference JSON bundled with the packaged
    retain model or the cache JSON in `out_dir` when they have them, else computed (loading
    `retain_model`) and added to the cache. None if the model is absent."""
    path = retain_tr_cache_path(out_dir, split, n_mc, estimator)
    have = {}
    # the packaged retain model ships reference TRs (experiments/retain_reference.py writes them)
    packaged = PACKAGED_RETAIN_TR / path.name
    if packaged.is_file() and Path(retain_model).resolve() == DEFAULT_RETAIN_MODEL.resolve():
        with open(packaged, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("limit") == limit:
            have = dict(d["by_seed"])
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("limit") == limit and d.get("model") == str(retain_model):
            have.update(d["by_seed"])
    missing = [s for s in seeds if str(s) not in have]
    if not missing:
        return {k: have[k] for k in map(str, seeds)}
    if not Path(retain_model).is_dir():
        return None
    params, cfg, tok = (loader or load_model_with_tokenizer)(retain_model)
    res = evaluate(params, cfg, tok, split, metrics=("forget_tr",), n_mc=n_mc, seeds=missing,
                   batch_size=batch_size, progress=progress, limit=limit, estimator=estimator,
                   length_bucket=length_bucket)
    have.update(forget_tr_by_index(res))
    os.makedirs(out_dir, exist_ok=True)
    payload = {"kind": "timerome_retain_forget_tr", "model": str(retain_model), "split": split, "n_mc": n_mc,
               "estimator": estimator, "limit": limit, "by_seed": have}
    write_json(path, payload)
    return {k: have[k] for k in map(str, seeds)}
