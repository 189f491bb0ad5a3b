"""The two TOFU evaluation protocols of `timerome eval` and `experiments/full_protocol.py`.

quick (the CLI default, sized for a 2-core CPU): 40 rows of every set spread over its authors
    (`evaluate.spread_rows`), n_mc 8, 1 seed, greedy generation of 128 tokens in 32 steps.
full (TOFU's protocol, docs/tofu_protocol.md): every row, n_mc 16, 5 seeds, greedy generation at
    TOFU's length (200 new tokens: open-unlearning's `max_new_tokens: 200`, legacy TOFU's
    `max_length: 200`) clipped to the model's context (`fit_gen_length`), one token per step.

Forget Quality in both uses the reference trained on the split's retain set (`tofu.models`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from timerome_jax.diffusion.sampler import SamplerConfig
from timerome_jax.tofu import data as tofu
from timerome_jax.tofu.evaluate import SET_FILES

TOFU_GEN_LENGTH = 200  # TOFU's generation length (new tokens), see the module docstring


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What an evaluation protocol fixes. limit None = every row; gen_length None = TOFU's 200
    clipped to the context (`fit_gen_length`); the sampler commits tokens_per_step tokens a step."""

    name: str
    limit: Optional[int]
    n_mc: int
    seeds: tuple
    gen_length: Optional[int]
    block_length: int
    tokens_per_step: int


QUICK = Protocol("quick", limit=40, n_mc=8, seeds=(0,), gen_length=128, block_length=32, tokens_per_step=4)
FULL = Protocol("full", limit=None, n_mc=16, seeds=(0, 1, 2, 3, 4), gen_length=None, block_length=16, tokens_per_step=1)
PROTOCOLS = {p.name: p for p in (QUICK, FULL)}


def longest_prompt(tokenizer, splits=tofu.FORGET_SPLITS) -> int:
    """Tokens in the longest evaluation prompt over the forget sets of `splits` and the retain /
    real-authors / world-facts sets (every set the TOFU evaluation generates from)."""
    names = [f"{s}_perturbed" for s in splits] + list(SET_FILES.values())
    return max(len(tokenizer.encode(tofu.format_prompt(r["question"])))
               for n in names for r in tofu.load_split(n, subjects=False))


def fit_gen_length(max_seq_len: int, prompt_len: int, block_length: int, requested: int = TOFU_GEN_LENGTH) -> int:
    """The generation length used: `requested` (TOFU's 200) when it fits after the longest prompt
    in the model's context, else the largest multiple of `block_length` that does."""
    room = max_seq_len - prompt_len
    if room >= requested:
        return requested
    gl = room // block_length * block_length
    if gl < block_length:
        raise ValueError(f"no room to generate: max_seq_len {max_seq_len} - longest prompt {prompt_len} = "
                         f"{max_seq_len - prompt_len} tokens < block_length {block_length}")
    return gl


def sampler_for(p: Protocol, gen_length: int) -> SamplerConfig:
    """Greedy low-confidence-remasking sampler of protocol `p` for `gen_length` new tokens; blocks
    of the largest divisor of gen_length not above p.block_length (200 tokens: blocks of 10)."""
    block = max(d for d in range(1, min(p.block_length, gen_length) + 1) if gen_length % d == 0)
    steps = max(1, gen_length // p.tokens_per_step)
    return SamplerConfig(steps=steps, block_length=block, temperature=0.0, remasking="low_confidence")


def resolve_gen_length(p: Protocol, cfg, tokenizer) -> int:
    """The protocol's generation length for a model (`fit_gen_length` when p.gen_length is None)."""
    if p.gen_length is not None:
        return p.gen_length
    return fit_gen_length(cfg.max_seq_len, longest_prompt(tokenizer), p.block_length)


def protocol_notes(result: dict) -> str:
    """Markdown lines saying how an `evaluate` result was obtained: rows, n_mc, seeds, generation,
    and the Forget Quality reference (its retain set, and whether it was overridden)."""
    n = result.get("n_rows", {})
    rows = ", ".join(f"{k} {v}" for k, v in n.items())
    sel = "all rows" if not result.get("limit") else f"{result['limit']} rows per set spread over it"
    s = result.get("sampler", {})
    lines = [f"- split {result['split']}, protocol {result.get('protocol', '?')}"
             + (f" (overridden: {', '.join(result['protocol_overrides'])})" if result.get("protocol_overrides") else "")
             + f"; {sel} ({rows}); n_mc {result['n_mc']}; seeds {result['seeds']}; generation "
               f"{result.get('gen_length')} tokens, {s.get('steps')} steps, blocks of {s.get('block_length')}"]
    ref = result.get("reference") or {}
    if ref.get("model"):
        lines.append(f"- Forget Quality reference: {ref['model']} (trained on {ref.get('retain_split') or 'unrecorded'}; "
                     f"{result['split']} expects {ref.get('expected')})"
                     + ("; **reference_override: true**" if ref.get("reference_override") else ""))
    elif ref:
        lines.append(f"- Forget Quality: None ({ref.get('message') or 'no reference'})")
    return "\n".join(lines)
