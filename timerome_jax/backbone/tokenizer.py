"""Tokenizer wrapper around a Hugging Face *fast* tokenizer loaded from a local folder.

The folder must hold `tokenizer.json` (and usually `tokenizer_config.json` /
`special_tokens_map.json`, which name the special tokens). Loading goes through transformers'
`PreTrainedTokenizerFast`, so no remote code is ever run.

Token-id conventions (docs/backbone_facts.md §1.4 Special tokens, §2 Dream-7B, §3 DiffuLLaMA-7B): LLaDA's mask token is "<|mdm_mask|>" (126336), Dream's is
"<|mask|>" (151666); LLaMA tokenizers (DiffuLLaMA) have none and the model config supplies one
(fallback 811). `Tokenizer.mask_id` is the tokenizer's own mask token if it names one (through
`mask_token` or one of the known mask strings), else the id given by the model config.
"""
from __future__ import annotations

import os
import shutil
from typing import Iterable, Optional

from transformers import PreTrainedTokenizerFast

from timerome_jax.io import require_file

# Known mask-token spellings, most specific first.
MASK_TOKEN_STRINGS = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")
EOS_TOKEN_STRINGS = ("<|endoftext|>", "</s>", "<eos>")
# Files that make up a HF tokenizer; copied verbatim when a tokenizer is re-saved.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")


def eos_or_default(tokenizer, cfg) -> int:
    """The tokenizer's end-of-sequence id, or `cfg.eos_token_id` when it has none (or no `.eos_id`)."""
    eos = getattr(tokenizer, "eos_id", None)
    return cfg.eos_token_id if eos is None else int(eos)


class TokenizerError(ValueError):
    """A tokenizer folder is missing, unreadable or disagrees with the model config."""


class PromptTooLongError(ValueError):
    """A prompt (plus generation canvas) does not fit the model's context window."""


def check_length(n_tokens: int, cfg, what: str = "prompt") -> None:
    """Raise `PromptTooLongError` if a sequence of `n_tokens` exceeds `cfg.max_seq_len`.

    Used by the sampler/eval before building a canvas: n_tokens = prompt + generated length.
    """
    if n_tokens > cfg.max_seq_len:
        raise PromptTooLongError(
            f"{what} has {n_tokens} tokens but the model's context window (max_seq_len) is "
            f"{cfg.max_seq_len} tokens ({cfg.family}); shorten it or reduce the generation length")


class Tokenizer:
    """Thin, framework-free view of a HF fast tokenizer.

    encode(text) -> list[int]  (no special tokens added)
    decode(ids)  -> str        (special tokens skipped)
    mask_id, eos_id, pad_id: int (or None when neither the tokenizer nor the config defines one)
    vocab_size: number of token ids the tokenizer can produce (base vocab + added tokens)
    """

    def __init__(self, hf_tokenizer, source_dir: Optional[str] = None, mask_id: Optional[int] = None):
        self.hf = hf_tokenizer
        self.source_dir = source_dir
        own = own_mask_id(hf_tokenizer)
        self._mask_id = own if own is not None else mask_id

    # --- ids ---------------------------------------------------------------------------------
    @property
    def mask_id(self) -> Optional[int]:
        return self._mask_id

    @property
    def eos_id(self) -> Optional[int]:
        if self.hf.eos_token_id is not None:
            return int(self.hf.eos_token_id)
        return _lookup(self.hf, EOS_TOKEN_STRINGS)

    @property
    def pad_id(self) -> Optional[int]:
        if self.hf.pad_token_id is not None:
            return int(self.hf.pad_token_id)
        return self.eos_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    # --- text <-> ids --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS or any other added special token."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping special tokens (mask, eos, pad, ...)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a token string, or None when it is not in the vocabulary."""
        tid = self.hf.get_vocab().get(token)
        return None if tid is None else int(tid)

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the tokenizer files into the existing folder `path`.

        Copies the original files verbatim when the tokenizer came from a folder (so a converted
        checkpoint carries exactly the tokenizer it was converted with), else uses save_pretrained.
        """
        if self.source_dir is not None:
            copied = False
            for name in TOKENIZER_FILES:
                src = os.path.join(self.source_dir, name)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(path, name))
                    copied = True
            if copied:
                return
        self.hf.save_pretrained(path)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, mask_id={self.mask_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}, source_dir={self.source_dir!r})")


def _lookup(hf_tok, names) -> Optional[int]:
    vocab = hf_tok.get_vocab()
    for name in names:
        if name in vocab:
            return int(vocab[name])
    return None


def own_mask_id(hf_tok) -> Optional[int]:
    """The mask id the tokenizer itself defines (its `mask_token`, or a known mask string), or None."""
    if getattr(hf_tok, "mask_token", None) is not None and hf_tok.mask_token_id is not None:
        return int(hf_tok.mask_token_id)
    return _lookup(hf_tok, MASK_TOKEN_STRINGS)


def has_tokenizer(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "tokenizer.json"))


def load_tokenizer(path: str, cfg=None) -> Tokenizer:
    """Load the fast tokenizer in folder `path`.

    cfg: optional ModelConfig. When given, the tokenizer's own mask token (if it defines one) must
    equal `cfg.mask_token_id`, else `TokenizerError`; a tokenizer without a mask token takes the
    config's id (DiffuLLaMA). Raises `TokenizerError` if the folder has no tokenizer.json.
    """
    require_file(path, "tokenizer.json", TokenizerError, "tokenizer folder",
                 " (a fast tokenizer file is required)")
    try:
        hf_tok = PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as e:  # corrupt json, bad tokenizer_config ...
        raise TokenizerError(f"cannot load the tokenizer in {path!r}: {type(e).__name__}: {e}") from e
    tok = Tokenizer(hf_tok, source_dir=os.path.abspath(path),
                    mask_id=None if cfg is None else cfg.mask_token_id)
    if cfg is not None:
        check_mask_agrees(tok, cfg, path)
    return tok


def check_mask_agrees(tok: Tokenizer, cfg, where: str = "") -> None:
    """Raise `TokenizerError` if the tokenizer's own mask token id differs from cfg.mask_token_id."""
    own = own_mask_id(tok.hf)
    if own is not None and own != cfg.mask_token_id:
        name = tok.hf.convert_ids_to_tokens(own)
        raise TokenizerError(
            f"tokenizer{(' in ' + repr(where)) if where else ''} has mask token {name!r} with id {own}, "
            f"but the model config says mask_token_id={cfg.mask_token_id}")
    if cfg.mask_token_id >= cfg.vocab_size:
        raise TokenizerError(f"mask_token_id={cfg.mask_token_id} is outside the model vocab ({cfg.vocab_size})")
