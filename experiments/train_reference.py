"""Train one Forget-Quality reference model (retain99 / retain95 / retain90) with the packaged
target's recipe: LLaDA's SFT loss on the plain retain split (no question augmentation, no
paraphrases; `train_default.sft_loss` through `train_suite`), batch 256, lr 2e-3 with 300 warm-up
steps then cosine decay to 1 %, bfloat16 activations, one model per process and one stage.

    python experiments/train_reference.py retain95 --out runs/r95 --budget-s 470 --seed 3   # GPU
    python experiments/train_reference.py retain90 --out /tmp/r90 --tiny --steps 4 --chunk 2  # CPU smoke

Any further argument is passed to `train_suite.py` (--budget-s, --steps, --seed, --out, ...). The
run writes <split>.npz, report.json and train_log.jsonl; `package_suite.py` turns <split>.npz into
an HF folder `tofu_<split>` with its `timerome_reference.json`. The retain95 / retain90 references
of docs/packaged_models.md were made with `--budget-s 470 --seed 3` / `--seed 4` on one H200 each
(14900 / 14300 steps).
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "experiments"), str(ROOT)]
import train_suite  # noqa: E402

SPLITS = ("retain99", "retain95", "retain90")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in SPLITS:
        raise SystemExit(f"usage: train_reference.py {{{','.join(SPLITS)}}} [train_suite args]")
    split = argv[0]
    train_suite.GROUPS["llada"] = [(split, split)]
    train_suite.main(["--groups", "llada", "--n-aug", "0", "--no-retain-paraphrases", "--batch", "256",
                      "--lr", "2e-3", "--warmup", "300", "--compute-dtype", "bfloat16"] + argv[1:])


if __name__ == "__main__":
    main()
