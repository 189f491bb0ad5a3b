"""Turn `train_suite.py` run folders into packaged HF-layout model folders.

    python experiments/package_suite.py RUN [RUN ...] [--out timerome_jax/assets] [--dtype bfloat16]

Each model is taken from the last RUN that has its <model>.npz (the LLaDA group and the
Dream/MoE group may come from different calls) and written with `hf.save_pretrained` in its
family's layout, tokenizer included:

    target -> tofu_target            (LLaDA layout)      retain99/95/90 -> tofu_retain99/95/90
    target_dream -> tofu_target_dream (Dream / Qwen2 keys) target_moe -> tofu_target_moe (LLaDA-MoE)

Each folder is loaded back through `hf.load_pretrained(path, dtype="float32")` and must equal the
params rounded to the storage dtype bit for bit, with the same config. With --check, the
forget01 quick check (`train_suite.quick_check`, same MC key) is run on the float32 params and on
the stored ones, so the cost of bf16 storage is visible. The summed size of the written weights
must stay within --max-mb (the package budget).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
from timerome_jax.backbone import hf_weights as hf  # noqa: E402
from timerome_jax.backbone.model import param_shapes  # noqa: E402
from timerome_jax.backbone.tokenizer import load_tokenizer  # noqa: E402
from timerome_jax.io import write_json  # noqa: E402
from timerome_jax.tofu.models import write_reference_info  # noqa: E402
from train_suite import GROUPS, npz_config, quick_check  # noqa: E402

FOLDER = {"target": "tofu_target", "retain99": "tofu_retain99", "retain95": "tofu_retain95",
          "retain90": "tofu_retain90", "target_dream": "tofu_target_dream", "target_moe": "tofu_target_moe"}


def load_model_npz(run: Path, name: str):
    """(params as numpy float32 tree, ModelConfig) of <run>/<name>.npz (config under `__config__`)."""
    z = np.load(run / f"{name}.npz")
    cfg = npz_config(z)
    params = jax.tree_util.tree_map_with_path(lambda p, s: np.asarray(z[jax.tree_util.keystr(p)], np.float32),
                                              param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
    return params, cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=str(ROOT / "timerome_jax" / "assets"))
    ap.add_argument("--tokenizer", default=str(ROOT / "timerome_jax" / "assets" / "tokenizer"))
    ap.add_argument("--data", default=str(ROOT / "timerome_jax" / "data" / "tofu"))
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="storage dtype")
    ap.add_argument("--max-mb", type=float, default=50.0)
    ap.add_argument("--check", action="store_true", help="forget01 quick check, float32 vs stored params")
    ap.add_argument("--n-mc", type=int, default=8)
    a = ap.parse_args(argv)
    all_names = [n for g in GROUPS.values() for n, _ in g]
    src = {}
    for run in map(Path, a.runs):
        for n in all_names:
            if (run / f"{n}.npz").exists():
                src[n] = run
    if not src:
        raise SystemExit(f"no <model>.npz of {all_names} in {a.runs}")
    summary, total = {}, 0
    for name, run in src.items():
        params, cfg = load_model_npz(run, name)
        tok = load_tokenizer(a.tokenizer, cfg)
        dest = Path(a.out) / FOLDER[name]
        hf.save_pretrained(params, cfg, str(dest), tokenizer=tok, dtype=a.dtype)
        if name.startswith("retain"):
            rep = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else {}
            args, m = rep.get("args", {}), rep.get("models", {}).get(name, {})
            write_reference_info(dest, name, recipe="experiments/train_suite.py", run=str(run),
                                 train_recipe=args.get("recipe"), init=args.get("init"), steps=m.get("steps"),
                                 n_aug=args.get("n_aug"), retain_paraphrases=not args.get("no_retain_paraphrases"),
                                 device=rep.get("device"))
        back, cfg2, _ = hf.load_pretrained(str(dest), dtype="float32")
        np_dt = np.float32 if a.dtype == "float32" else ml_dtypes.bfloat16
        stored = jax.tree.map(lambda x: np.asarray(x).astype(np_dt).astype(np.float32), params)
        same = all(np.array_equal(x, np.asarray(y)) for x, y in zip(jax.tree.leaves(stored), jax.tree.leaves(back)))
        norm = lambda c: c.replace(max_seq_len=0, dtype="float32", attn_impl="xla", layer_unroll=1)
        if not same or norm(cfg2) != norm(cfg):
            raise SystemExit(f"round trip of {dest} failed (params equal: {same}; configs {cfg} vs {cfg2})")
        size = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
        total += size
        rec = {"from": str(run), "folder": str(dest), "family": cfg.family, "weights_mb": round(size / 1e6, 2),
               "round_trip": "exact"}
        if a.check:
            tk = Tokenizer.from_file(str(Path(a.tokenizer) / "tokenizer.json"))
            eos = tk.token_to_id("<|endoftext|>")
            T = 224
            key = jax.random.key(1)
            f32 = quick_check(jax.tree.map(jnp.asarray, params), cfg, tk, Path(a.data), T, eos, key, a.n_mc)
            st = quick_check(back, cfg2.replace(max_seq_len=cfg.max_seq_len), tk, Path(a.data), T, eos, key, a.n_mc)
            rec["check_float32"], rec[f"check_stored_{a.dtype}"] = f32, st
        summary[name] = rec
        print(json.dumps({name: rec}), flush=True)
    summary["total_weights_mb"] = round(total / 1e6, 2)
    print(json.dumps({"total_weights_mb": summary["total_weights_mb"], "max_mb": a.max_mb}))
    write_json(Path(a.runs[-1]) / "package_report.json", summary)
    if total > a.max_mb * 1e6:
        raise SystemExit(f"packaged weights total {total / 1e6:.1f} MB > --max-mb {a.max_mb}")


if __name__ == "__main__":
    main()
