"""Compute each packaged reference model's per-sample forget-set truth ratios (the reference that
Forget Quality's KS test compares against) and bundle them with the model, so `timerome demo` and
`timerome eval` need not recompute them (TOFU users otherwise have to download retain logs).

    python experiments/retain_reference.py [--force]

For every packaged reference (`tofu.models.retain_model_for`: forget01 -> retain99, forget05 ->
retain95, forget10 -> retain90; splits without one are skipped) it writes
timerome_jax/assets/<folder>/reference/retain_forget_tr_<split>_nmc<n>_auto.json for the settings
of `timerome eval`'s quick protocol (n_mc 8, 40 spread rows, seed 0) and of the demo (n_mc 4, 40
rows, seeds 0-4), plus forget01 at n_mc 16 over every row (seeds 0-2), which a CPU can afford.
Files that already hold those seeds are kept unless --force. The full protocol's reference TRs
(n_mc 16, every row, seeds 0-4) come from experiments/full_protocol.py, which writes them in this
format under <out>/references/.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timerome_jax.backbone.checkpoint import load_model_with_tokenizer  # noqa: E402
from timerome_jax.io import write_json  # noqa: E402
from timerome_jax.tofu import data as tofu  # noqa: E402
from timerome_jax.tofu import evaluate as ev  # noqa: E402
from timerome_jax.tofu.models import MissingReferenceError, retain_model_for, retain_split_of  # noqa: E402
from timerome_jax.tofu.protocol import QUICK  # noqa: E402
from timerome_jax.tofu.reference import retain_tr_cache_path  # noqa: E402
from timerome_jax.tofu.truth_ratios import forget_tr_by_index  # noqa: E402


def settings(split):
    """(n_mc, limit, seeds) bundled for `split`."""
    out = [(QUICK.n_mc, QUICK.limit, QUICK.seeds), (4, 40, (0, 1, 2, 3, 4))]
    if split == "forget01":
        out.append((16, None, (0, 1, 2)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="recompute files that exist")
    a = ap.parse_args(argv)
    for split in tofu.FORGET_SPLITS:
        try:
            folder = retain_model_for(split)
        except MissingReferenceError as e:
            print(f"skip {split}: {e}")
            continue
        loaded = None
        for n_mc, limit, seeds in settings(split):
            path = folder / "reference" / retain_tr_cache_path(".", split, n_mc).name
            if path.is_file() and not a.force:
                d = json.loads(path.read_text())
                if d.get("limit") == limit and all(str(s) in d["by_seed"] for s in seeds):
                    print(f"keep {path}")
                    continue
            loaded = loaded or load_model_with_tokenizer(folder)
            params, cfg, tok = loaded
            res = ev.evaluate(params, cfg, tok, split, metrics=("forget_tr",), n_mc=n_mc, seeds=seeds, limit=limit,
                              batch_size=40)
            write_json(path, {"kind": "timerome_retain_forget_tr", "model": f"packaged:{folder.name}",
                              "split": split, "n_mc": n_mc, "estimator": "auto", "limit": limit,
                              "row_selection": res["row_selection"], "retain_split": retain_split_of(folder),
                              "by_seed": forget_tr_by_index(res)})
            print(path)


if __name__ == "__main__":
    main()
