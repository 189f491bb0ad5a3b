"""Turn a `train_default.py` run folder into the packaged HF LLaDA-layout model folders.

    python experiments/package_default.py experiments/runs/default_v2

writes timerome_jax/assets/tofu_target/ and tofu_retain/ (config.json in LLaDA's field names,
model.safetensors, tokenizer files) with `hf_weights.save_pretrained`, so the default path runs exactly the
`load_pretrained` code a real LLaDA-8B checkpoint runs, then loads each back and checks the
round trip bit for bit.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from timerome_jax.backbone import hf_weights  # noqa: E402
from timerome_jax.backbone.config import ModelConfig  # noqa: E402
from timerome_jax.backbone.model import param_shapes  # noqa: E402
from timerome_jax.backbone.tokenizer import load_tokenizer  # noqa: E402
from timerome_jax.tofu.models import write_reference_info  # noqa: E402


def load_run(run: Path, name: str):
    cfg = ModelConfig(**json.loads((run / "config.json").read_text()))
    z = np.load(run / f"{name}.npz")
    shapes = param_shapes(cfg)
    params = jax.tree_util.tree_map_with_path(lambda p, s: np.asarray(z[jax.tree_util.keystr(p)]), shapes,
                                              is_leaf=lambda s: isinstance(s, tuple))
    return params, cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run")
    ap.add_argument("--out", default=str(ROOT / "timerome_jax" / "assets"))
    ap.add_argument("--tokenizer", default=str(ROOT / "timerome_jax" / "assets" / "tokenizer"))
    a = ap.parse_args(argv)
    run = Path(a.run)
    for name in ("target", "retain"):
        params, cfg = load_run(run, name)
        tok = load_tokenizer(a.tokenizer, cfg)
        dest = Path(a.out) / f"tofu_{name}"
        hf_weights.save_pretrained(params, cfg, str(dest), tokenizer=tok, dtype="float32")
        if name == "retain":  # the FQ reference must say which retain set it saw (tofu.models)
            write_reference_info(dest, "retain99", recipe="experiments/train_default.py: the target's recipe "
                                 "on retain99 instead of full", run=str(run))
        back, cfg2, _ = hf_weights.load_pretrained(str(dest))
        same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back)))
        if not same or cfg2.replace(max_seq_len=cfg.max_seq_len) != cfg.replace(max_seq_len=cfg.max_seq_len):
            raise SystemExit(f"round trip of {dest} failed")
        size = sum(f.stat().st_size for f in dest.iterdir())
        print(f"{dest}: {size / 1e6:.1f} MB, round trip exact")


if __name__ == "__main__":
    main()
