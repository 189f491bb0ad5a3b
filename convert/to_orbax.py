"""Convert a Hugging Face MDLM folder into a native Orbax checkpoint, once.

    python -m convert.to_orbax HF_DIR OUT_DIR [--dtype bfloat16] [--overwrite]

Writes OUT_DIR/params (Orbax), OUT_DIR/timerome_config.json (the ModelConfig) and OUT_DIR/tokenizer
(a verbatim copy of the tokenizer files). Restore with `timerome_jax.backbone.checkpoint.restore(OUT_DIR)` or
`timerome_jax.backbone.checkpoint.load_model(OUT_DIR)`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from timerome_jax.backbone import checkpoint
from timerome_jax.backbone.hf_weights import load_pretrained


def convert(hf_dir: str, out_dir: str, dtype: str | None = None, overwrite: bool = False):
    """Load `hf_dir` strictly (hf_weights.load_pretrained) and write it to `out_dir`; returns the ModelConfig."""
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    params, cfg, tok = load_pretrained(hf_dir, dtype=dtype)
    checkpoint.save(params, cfg, out_dir, tokenizer=tok)
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.to_orbax", description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir", help="local Hugging Face model folder (config.json + *.safetensors)")
    ap.add_argument("out_dir", help="output folder for the Orbax checkpoint")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="parameter dtype (default: the checkpoint's own)")
    ap.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    a = ap.parse_args(argv)
    t0 = time.time()
    try:
        cfg = convert(a.hf_dir, a.out_dir, a.dtype, a.overwrite)
    except (ValueError, FileExistsError) as e:  # our loaders raise ValueError subclasses with clear text
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {a.hf_dir} ({cfg.family}, {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.dtype}) "
          f"-> {a.out_dir} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
