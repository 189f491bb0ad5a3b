"""Train the byte-level BPE tokenizer of the packaged default models on TOFU text.

Deterministic: same data + same vocab size -> same tokenizer.json. Special tokens follow LLaDA's
names: <|endoftext|> (EOS, also used as padding, as LLaDA SFT pads with EOS) and <|mdm_mask|>.

    python experiments/train_tokenizer.py --out timerome_jax/assets/tokenizer --vocab 2048
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from timerome_jax.io import atomic_dir
from timerome_jax.tofu.data import PROMPT_TEMPLATE as PROMPT

SPECIALS = ["<|endoftext|>", "<|mdm_mask|>"]
TEXT_FIELDS = ("question", "answer", "paraphrased_answer", "paraphrased_question", "perturbed_answer",
               "option1", "option2", "option3", "option4")


def tofu_texts(data_dir: Path):
    """Every string of every TOFU file (questions, answers, paraphrases, perturbations, IDK lines)."""
    for f in sorted(data_dir.glob("*.json")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            for k in TEXT_FIELDS:
                v = row.get(k)
                if isinstance(v, str) and "question" in k:
                    yield PROMPT.format(question=v)  # learn merges for the template too
                elif isinstance(v, str):
                    yield v
                elif isinstance(v, list):
                    yield from (s for s in v if isinstance(s, str))
    idk = data_dir / "idontknow.jsonl"
    if idk.exists():
        yield from (l.strip() for l in idk.read_text().splitlines() if l.strip())
    yield "Question: Answer: I don't know."


def train(data_dir: Path, vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(tofu_texts(data_dir)), trainer=trainer)
    return tok


def save(tok: Tokenizer, out: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json atomically."""
    with atomic_dir(out) as d:
        tmp = Path(d)
        tok.save(str(tmp / "tokenizer.json"))
        special = {"eos_token": SPECIALS[0], "pad_token": SPECIALS[0], "mask_token": SPECIALS[1]}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, **special}, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "timerome_jax" / "data" / "tofu"),
                    help="folder of the TOFU json files (default: the packaged copy)")
    ap.add_argument("--out", default="timerome_jax/assets/tokenizer")
    ap.add_argument("--vocab", type=int, default=2048)
    a = ap.parse_args(argv)
    tok = train(Path(a.data), a.vocab)
    save(tok, Path(a.out))
    print(f"vocab {tok.get_vocab_size()} -> {a.out}; mask id {tok.token_to_id(SPECIALS[1])}, eos id {tok.token_to_id(SPECIALS[0])}")


if __name__ == "__main__":
    main()
