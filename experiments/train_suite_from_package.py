"""One more `train_suite.py` stage of a packaged target, started from its packaged folder
(`timerome_jax/assets/tofu_target_dream`, `tofu_target_moe`, or the LLaDA `tofu_target`) rather
than a run's .npz files.

    python experiments/train_suite_from_package.py INIT_DIR --groups moe --out runs/moe4 --budget-s 240
    python experiments/train_suite_from_package.py INIT_DIR --groups llada --out runs/para --budget-s 240

With `--groups llada` only the target is trained (the group's reference models are dropped): this
continues the packaged target on the suite's augmented data, to see whether it learns to answer
paraphrased questions without losing the original wording.

The packaged weights (bf16 storage) are read in float32 and written to INIT_DIR/<model>.npz with
this run's config, after checking that every parameter name and shape matches `init_params`; then
`train_suite.main` runs with `--init INIT_DIR`, lr 6e-4, 200 warm-up steps, bfloat16 activations
and the suite's augmentation (further arguments are passed on). Stage 3 of the packaged targets:
`--groups dream --budget-s 260` and `--groups moe --budget-s 260`, one per H200, seed 2.
"""
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "experiments"), str(ROOT)]
import jax  # noqa: E402
import numpy as np  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import train_suite  # noqa: E402
from timerome_jax.backbone.checkpoint import load_model  # noqa: E402
from timerome_jax.backbone.model import init_params  # noqa: E402

PACKAGED = {"dream": "target_dream", "moe": "target_moe", "llada": "target"}


def write_init(init: Path, tiny: bool = False) -> None:
    """INIT_DIR/<model>.npz for every packaged Dream / MoE target, in train_suite's format."""
    init.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(ROOT / "timerome_jax" / "assets" / "tokenizer" / "tokenizer.json"))
    eos, mask = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|mdm_mask|>")
    for group, name in PACKAGED.items():
        cfg = train_suite.model_config(group, tok.get_vocab_size(), mask, eos, tiny)
        params, _, _ = load_model(str(ROOT / "timerome_jax" / "assets" / f"tofu_{name}"), dtype="float32")
        like = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
        got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        want = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(like)[0]}
        if got.keys() != want.keys():
            raise SystemExit(f"tofu_{name}: parameter names differ from train_suite's {group} model: "
                             f"{sorted(set(got) ^ set(want))}")
        bad = [k for k in got if got[k].shape != want[k].shape]
        if bad:
            raise SystemExit(f"tofu_{name}: shapes differ from train_suite's {group} model at {bad}")
        flat = {k: np.asarray(v, np.float32) for k, v in got.items()}
        flat["__config__"] = np.asarray(json.dumps(dataclasses.asdict(cfg)))
        np.savez(init / f"{name}.npz", **flat)
        print(f"tofu_{name} -> {init / (name + '.npz')}", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: train_suite_from_package.py INIT_DIR [train_suite args]")
    init = Path(argv[0])
    train_suite.GROUPS["llada"] = [("target", "full")]
    write_init(init)
    train_suite.main(["--groups", "dream,moe", "--init", str(init), "--lr", "6e-4", "--warmup", "200",
                      "--compute-dtype", "bfloat16", "--seed", "2"] + argv[1:])


if __name__ == "__main__":
    main()
