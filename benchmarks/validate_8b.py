"""`timerome validate` at the LLaDA-8B shape: a random bf16 checkpoint in the real HF layout with the
official modeling files beside it, checked against the library on the GPU.

    python benchmarks/validate_8b.py --out $OUT --official-dir .official/llada      # H200, ~3 min
    python benchmarks/validate_8b.py --out /tmp/r --official-dir DIR --tiny         # CPU, seconds

The checkpoint (random weights, `hf_weights.save_pretrained`, about 16 GB at 8B) is written to --work
(default: a temporary folder, removed afterwards); the official `modeling_llada.py` and
`configuration_llada.py` are copied in and config.json gets the `auto_map` a real LLaDA folder has.
Then `validate.validate` loads it in the library and through transformers' remote code and compares
logits and every hidden state, unpadded and left-padded. Writes OUT/validate_8b.json (+ .md) and
exits 1 when a tolerance is exceeded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import jax  # noqa: E402

from timerome_jax.backbone import hf_weights  # noqa: E402
from timerome_jax.backbone import validate as V  # noqa: E402
from timerome_jax.io import write_json, write_text  # noqa: E402

AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--official-dir", required=True, help="folder with modeling_llada.py + configuration_llada.py")
    ap.add_argument("--work", default=None, help="where to write the checkpoint (default: a temporary folder)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--tol", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default="unpadded,padded", help="comma list of unpadded, padded (default both)")
    args = ap.parse_args(argv)
    missing = [f for f in C.OFFICIAL_FILES if not os.path.isfile(os.path.join(args.official_dir, f))]
    if missing:
        print(f"error: --official-dir {args.official_dir!r} lacks {missing}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    dtype = args.dtype or ("bfloat16" if C.on_gpu() else "float32")
    cfg = C.model_config(args.tiny, dtype=dtype)
    work = args.work or tempfile.mkdtemp(prefix="validate_8b_")
    t0 = time.perf_counter()
    params = C.init_params(jax.random.key(args.seed), cfg, C.default_init_std(args.tiny))
    hf_weights.save_pretrained(params, cfg, work, dtype=dtype)
    del params
    for f in C.OFFICIAL_FILES:
        shutil.copyfile(os.path.join(args.official_dir, f), os.path.join(work, f))
    with open(os.path.join(work, "config.json")) as fh:
        conf = json.load(fh)
    conf["auto_map"] = AUTO_MAP
    write_json(os.path.join(work, "config.json"), conf)
    write_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        report = V.validate(work, dtype, tol=args.tol, impl="remote",
                            cases=tuple(c.strip() for c in args.cases.split(",") if c.strip()))
        report["validate_s"] = time.perf_counter() - t0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report.update({"status": "ok" if report["passed"] else "failed (tolerance exceeded)", "errors": {},
                   "checkpoint_write_s": write_s, "random_weights": True, "env": C.env_info(),
                   "official_dir": os.path.abspath(args.official_dir)})
    write_json(os.path.join(args.out, "validate_8b.json"), report)
    lines = V.summary_lines(report)
    write_text(os.path.join(args.out, "validate_8b.md"), "\n".join(["# timerome validate, LLaDA-8B shape", ""]
                                                                    + [f"    {x}" for x in lines]) + "\n")
    print("\n".join(lines), flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
