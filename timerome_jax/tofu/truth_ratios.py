"""The retain model's per-sample forget truth ratios (the Forget Quality reference) as a file.

Format (JSON): {"kind": "timerome_retain_forget_tr", "model", "split", "n_mc", "estimator", "limit",
"by_seed": {seed: {row: TR}}}, with row = the row index in the forget set (a string).
"""
from __future__ import annotations

import json

from timerome_jax.io import write_json


def forget_tr_by_index(result: dict) -> dict[str, dict[str, float]]:
    """{seed: {row: TR}} of the forget set from an `evaluate` result (needs forget_tr)."""
    out = {}
    for seed, per in result["per_seed"].items():
        if "forget_tr" not in per:
            raise ValueError("this result has no per-sample forget truth ratios (evaluate with 'forget_tr')")
        out[seed] = {k: v["score"] for k, v in per["forget_tr"]["value_by_index"].items()}
    return out


def save_retain_tr(path, result: dict, model: str = "") -> None:
    """Write the forget TRs of a retain-model `evaluate` result as JSON (atomically)."""
    payload = {"kind": "timerome_retain_forget_tr", "model": str(model), "split": result["split"],
               "n_mc": result["n_mc"], "estimator": result["estimator"], "limit": result["limit"],
               "by_seed": forget_tr_by_index(result)}
    write_json(path, payload)


def load_retain_tr(path) -> dict[str, dict[str, float]]:
    """{seed: {row: TR}} from a file written by `save_retain_tr`."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read retain truth ratios from {path}: {e}") from e
    if not isinstance(d, dict) or d.get("kind") != "timerome_retain_forget_tr" or "by_seed" not in d:
        raise ValueError(f"{path} is not a retain truth-ratio file (missing kind/by_seed)")
    return d["by_seed"]
