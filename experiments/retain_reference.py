"""Compute the packaged retain model's per-sample forget-set truth ratios (the reference that Forget
Quality's KS test compares against) and bundle them with the model, so `timerome demo` and
`timerome eval` need not recompute them (TOFU users otherwise have to download retain logs).

    python experiments/retain_reference.py

Writes timerome_jax/assets/tofu_retain/reference/retain_forget_tr_<split>_nmc<n>_auto.json for the
settings of the demo (forget01, n_mc 4, first 40 rows, seeds 0-4) and of `timerome eval`'s defaults
(forget01, n_mc 16, all rows, seeds 0-2).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timerome_jax.backbone.checkpoint import load_model_with_tokenizer  # noqa: E402
from timerome_jax.tofu import evaluate as ev  # noqa: E402
from timerome_jax.tofu.models import DEFAULT_RETAIN_MODEL, PACKAGED_RETAIN_TR  # noqa: E402
from timerome_jax.tofu.reference import retain_tr_cache_path  # noqa: E402
from timerome_jax.tofu.truth_ratios import forget_tr_by_index  # noqa: E402
from timerome_jax.io import write_json  # noqa: E402

SETTINGS = [("forget01", 4, 40, (0, 1, 2, 3, 4)), ("forget01", 16, None, (0, 1, 2))]


def main():
    params, cfg, tok = load_model_with_tokenizer(DEFAULT_RETAIN_MODEL)
    for split, n_mc, limit, seeds in SETTINGS:
        res = ev.evaluate(params, cfg, tok, split, metrics=("forget_tr",), n_mc=n_mc, seeds=seeds, limit=limit,
                          batch_size=40)
        path = PACKAGED_RETAIN_TR / retain_tr_cache_path(".", split, n_mc).name
        write_json(path, {"kind": "timerome_retain_forget_tr", "model": "packaged:tofu_retain", "split": split,
                          "n_mc": n_mc, "estimator": "auto", "limit": limit, "by_seed": forget_tr_by_index(res)})
        print(path)


if __name__ == "__main__":
    main()
