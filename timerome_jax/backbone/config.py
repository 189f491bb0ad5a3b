"""Model configuration: one frozen, hashable dataclass for every supported MDLM family.

HF field names never appear here; `timerome_jax.backbone.hf_config` translates HF `config.json` files into this.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

FAMILIES = ("llada", "mmada", "dream", "diffullama", "llada_moe")
MODULES = ("resid", "attn", "mlp")  # index = module id used by interventions and edits


def module_id(module) -> int:
    """Index of a module in `MODULES`, from its name or its id (a clear error on a typo or a bad id)."""
    if isinstance(module, str):
        if module not in MODULES:
            raise ValueError(f"unknown module {module!r}; expected one of {MODULES}")
        return MODULES.index(module)
    m = int(module)
    if not 0 <= m < len(MODULES):
        raise ValueError(f"module id {module!r} out of range; expected 0..{len(MODULES) - 1} {MODULES}")
    return m


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a masked-diffusion LM (LLaMA-style block, bidirectional attention).

    family:        one of FAMILIES; decides nothing numerically beyond the fields below.
    logits_shift:  True for families trained with the autoregressive alignment (Dream,
                   DiffuLLaMA): the hidden state at i-1 predicts token i. `forward` undoes it so
                   that logits[:, i] always predicts token i.
    n_experts:     0 for a dense SwiGLU MLP; otherwise a softmax top-k router over stacked experts
                   (LLaDA-MoE: probabilities are NOT renormalised over the top k).
    dtype:         activation/compute dtype ("float32" or "bfloat16"). Norms, softmax, router and
                   logits always run in float32.
    attn_impl:     "xla" (CPU, fp32, tests) or "cudnn" (GPU, bf16).
    layer_unroll:  layers per iteration of the layer `lax.scan` (1 = a rolled loop; >= n_layers =
                   fully unrolled). A run-time choice like attn_impl: it never changes a number.
    """

    family: str = "llada"
    vocab_size: int = 126464
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    d_ff: int = 12288
    rope_theta: float = 500000.0
    rotary_dim: Optional[int] = None  # None = full head_dim
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    qk_norm: bool = False
    n_experts: int = 0
    n_experts_per_tok: int = 0
    d_expert: int = 0
    norm_topk_prob: bool = False
    tie_embeddings: bool = False
    logits_shift: bool = False
    mask_token_id: int = 126336
    pad_token_id: int = 126081
    eos_token_id: int = 126081
    max_seq_len: int = 4096
    dtype: str = "float32"
    attn_impl: str = "xla"
    layer_unroll: int = 1

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.attn_impl not in ("xla", "cudnn"):
            raise ValueError(f"attn_impl must be 'xla' or 'cudnn', got {self.attn_impl!r}")
        if int(self.layer_unroll) != self.layer_unroll or self.layer_unroll < 1:
            raise ValueError(f"layer_unroll must be an integer >= 1, got {self.layer_unroll!r}")
        if self.n_experts and not (0 < self.n_experts_per_tok <= self.n_experts and self.d_expert > 0):
            raise ValueError("an MoE config needs 0 < n_experts_per_tok <= n_experts and d_expert > 0")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def rot_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def llada_8b() -> ModelConfig:
    """LLaDA-8B-Base/Instruct shape (docs/backbone_facts.md §1.1 Config)."""
    return ModelConfig()
