"""A small, faithful PyTorch LLaDA / LLaDA-MoE, written from the facts in docs/backbone_facts.md (§1 LLaDA, §4 LLaDA-MoE).

Module and parameter names are the real ones, so `state_dict()` keys equal the HF checkpoints':

  LLaDA (modeling_llada.py):   model.transformer.wte.weight,
                               model.transformer.blocks.{i}.{attn_norm,q_proj,k_proj,v_proj,attn_out,
                                                             ff_norm,ff_proj,up_proj,ff_out}.weight,
                               model.transformer.ln_f.weight, model.transformer.ff_out.weight
  LLaDA-MoE (modeling_lladamoe.py): model.embed_tokens.weight,
                               model.layers.{i}.input_layernorm.weight,
                               model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, self_attn.{q,k}_norm.weight,
                               model.layers.{i}.post_attention_layernorm.weight,
                               model.layers.{i}.mlp.gate.weight,
                               model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight,
                               model.norm.weight, lm_head.weight

Hook points (other code hangs forward hooks on exactly these): in an LLaDA block the attention
sub-layer output is the output of `attn_out`, the MLP output is the output of `ff_out`, and the
block output is the block's return value. In an LLaDA-MoE layer: `self_attn.o_proj`, `mlp`, layer.

Attention is bidirectional SDPA with an optional additive key-padding mask (the fixed dllm
behaviour; no query masking, so no NaN rows). Works in float32 and bfloat16, on CPU or GPU, and can
be built at LLaDA-8B shape (`device="meta"`/"cuda", `dtype=torch.bfloat16`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from timerome_jax.io import atomic_path


# ------------------------------------------------------------------------------------------------
# config views (HF config.json dicts -> the few numbers the forward needs)
# ------------------------------------------------------------------------------------------------
class _BlockArgs:
    """The attention geometry both config views share, read under each config's own key names."""

    def _read_geometry(self, d: dict, width: str, heads: str, kv_heads: str, layers: str):
        self.d_model = int(d[width])
        self.n_heads = int(d[heads])
        self.n_kv_heads = int(d.get(kv_heads) or self.n_heads)
        self.n_layers = int(d[layers])
        self.head_dim = self.d_model // self.n_heads
        self.eps = float(d.get("rms_norm_eps", 1e-5))

    @staticmethod
    def _check_supported(d: dict, family: str, supported: dict):
        """ValueError naming the first key of `supported` (key -> (test, what is supported)) that
        `d` sets to a value the reference does not implement."""
        for k, (ok, want) in supported.items():
            if k in d and not ok(d[k]):
                raise ValueError(f"torch_ref {family} supports {k}={want} only, got {d[k]!r}")


def _is(want):
    return lambda v: v == want, repr(want)


class LLaDAArgs(_BlockArgs):
    """The LLaDA fields of a config.json dict (LLaDA names), validated for the llama block."""

    def __init__(self, d: dict):
        self._read_geometry(d, "d_model", "n_heads", "n_kv_heads", "n_layers")
        self.hidden = int(d.get("mlp_hidden_size") or d.get("mlp_ratio", 4) * self.d_model)
        self.embedding_size = int(d.get("embedding_size") or d["vocab_size"])
        self.rope_theta = float(d.get("rope_theta", 10000.0))
        self.weight_tying = bool(d.get("weight_tying", False))
        self.qkv_bias = bool(d.get("include_qkv_bias", False))
        self.rope_full_precision = bool(d.get("rope_full_precision", True))
        self._check_supported(d, "LLaDA", {
            "block_type": _is("llama"), "activation_type": _is("silu"), "layer_norm_type": _is("rms"),
            "rope": _is(True), "alibi": _is(False), "include_bias": _is(False),
            "attention_layer_norm": _is(False), "scale_logits": _is(False), "input_emb_norm": _is(False)})


class LLaDAMoEArgs(_BlockArgs):
    """The LLaDAMoEConfig fields of a config.json dict."""

    def __init__(self, d: dict):
        self._read_geometry(d, "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
        self.vocab_size = int(d["vocab_size"])
        self.n_experts = int(d["num_experts"])
        self.top_k = int(d["num_experts_per_tok"])
        self.expert_hidden = int(d["expert_intermediate_size"])
        self.rope_theta = float(d["rope_theta"])
        self.qk_layernorm = bool(d.get("qk_layernorm", False))
        prf = d.get("partial_rotary_factor")
        prf = 1.0 if prf in (None, -1) else float(prf)
        self.rotary_dim = int(self.head_dim * prf)
        self.tie = bool(d.get("tie_word_embeddings", False))
        self._check_supported(d, "LLaDA-MoE", {
            "attention_bias": (lambda v: not v, "False"), "clip_qkv": (lambda v: v is None, "None"),
            "moe_layer_freq": (lambda v: all(int(f) != 0 for f in v), "all 1 (all-MoE layers)"),
            "shared_expert_intermediate_size": (lambda v: v in (None, 0), "None (no shared expert)"),
            "moe_router_enable_expert_bias": (lambda v: not v, "False")})


def _key_padding_bias(attention_mask: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    """[B,T] (1 = real token) -> additive [B,1,1,T] mask (0 / finfo.min), or None."""
    if attention_mask is None:
        return None
    m = attention_mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)


# ------------------------------------------------------------------------------------------------
# LLaDA (modeling_llada.py structure)
# ------------------------------------------------------------------------------------------------
class RMSLayerNorm(nn.Module):
    """LLaDA RMSNorm: normalise in float32, cast back to the input dtype, then scale."""

    def __init__(self, size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        og = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(og)


class RotaryEmbedding(nn.Module):
    """LLaDA RoPE: half-split rotate_half, positions arange(key_len), rotated in float32."""

    def __init__(self, head_dim: int, theta: float, full_precision: bool = True):
        super().__init__()
        self.dim, self.theta, self.full_precision = head_dim, theta, full_precision

    def get_rotary_embedding(self, seq_len: int, device):
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float) / self.dim))
        seq = torch.arange(seq_len, device=device, dtype=torch.float)
        freqs = torch.einsum("i , j -> i j", seq, inv_freq)
        positions = torch.cat((freqs, freqs), dim=-1)
        return positions.sin()[None, None, :, :], positions.cos()[None, None, :, :]

    @staticmethod
    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def apply_rotary_pos_emb(self, pos_sin, pos_cos, t):
        return ((t * pos_cos) + (self.rotate_half(t) * pos_sin)).to(t.dtype)

    def forward(self, q, k):
        q_, k_ = (q.float(), k.float()) if self.full_precision else (q, k)
        with torch.autocast(q.device.type, enabled=False):
            query_len, key_len = q_.shape[-2], k_.shape[-2]
            pos_sin, pos_cos = self.get_rotary_embedding(key_len, q_.device)
            pos_sin, pos_cos = pos_sin.type_as(q_), pos_cos.type_as(q_)
            q_ = self.apply_rotary_pos_emb(pos_sin[:, :, key_len - query_len:key_len, :],
                                           pos_cos[:, :, key_len - query_len:key_len, :], q_)
            k_ = self.apply_rotary_pos_emb(pos_sin, pos_cos, k_)
        return q_.type_as(q), k_.type_as(k)


class _LlamaQKV(nn.Module):
    """What a LLaDA block and a LLaDA-MoE attention share: the config view `a` and the q_proj /
    k_proj / v_proj Linears (both checkpoints use these names), and the split into heads."""

    def __init__(self, a: _BlockArgs, bias: bool, device=None, dtype=None):
        super().__init__()
        self.a = a
        D, hd, kw = a.d_model, a.head_dim, dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(D, a.n_heads * hd, bias=bias, **kw)
        self.k_proj = nn.Linear(D, a.n_kv_heads * hd, bias=bias, **kw)
        self.v_proj = nn.Linear(D, a.n_kv_heads * hd, bias=bias, **kw)

    def split_heads(self, q, k, v):
        """[B,T,H*hd] projections -> q [B,H,T,hd], k and v [B,Hkv,T,hd]."""
        a, (B, T) = self.a, q.shape[:2]
        return (q.view(B, T, a.n_heads, a.head_dim).transpose(1, 2),
                k.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2),
                v.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2))


class LLaDALlamaBlock(_LlamaQKV):
    """Pre-norm llama block: x + attn_out(Attn(q,k,v)(attn_norm x)); + ff_out(silu(ff_proj m) * up_proj m)."""

    def __init__(self, a: LLaDAArgs, device=None, dtype=None):
        super().__init__(a, a.qkv_bias, device, dtype)
        kw = dict(device=device, dtype=dtype)
        D, hd = a.d_model, a.head_dim
        self.attn_norm = RMSLayerNorm(D, a.eps, **kw)
        self.ff_norm = RMSLayerNorm(D, a.eps, **kw)
        self.attn_out = nn.Linear(a.n_heads * hd, D, bias=False, **kw)
        self.ff_proj = nn.Linear(D, a.hidden, bias=False, **kw)
        self.up_proj = nn.Linear(D, a.hidden, bias=False, **kw)
        self.ff_out = nn.Linear(a.hidden, D, bias=False, **kw)
        self.act = nn.SiLU()
        self.rotary_emb = RotaryEmbedding(hd, a.rope_theta, a.rope_full_precision)

    def attention(self, q, k, v, attention_bias=None):
        B, T, _ = q.shape
        a = self.a
        q, k, v = self.split_heads(q, k, v)
        q, k = self.rotary_emb(q, k)
        if a.n_kv_heads != a.n_heads:  # GQA as in modeling_llada: repeat_interleave over heads
            k = k.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1, output_size=a.n_heads)
            v = v.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1, output_size=a.n_heads)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, dropout_p=0.0, is_causal=False)
        att = att.transpose(1, 2).contiguous().view(B, T, a.n_heads * a.head_dim)
        return self.attn_out(att)

    def forward(self, x, attention_bias=None):
        x_normed = self.attn_norm(x)
        q, k, v = self.q_proj(x_normed), self.k_proj(x_normed), self.v_proj(x_normed)
        x = x + self.attention(q, k, v, attention_bias)
        og_x = x
        x = self.ff_norm(x)
        x, x_up = self.ff_proj(x), self.up_proj(x)
        x = self.act(x) * x_up
        x = self.ff_out(x)
        return og_x + x


class LLaDAModel(nn.Module):
    def __init__(self, a: LLaDAArgs, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.a = a
        mods = dict(wte=nn.Embedding(a.embedding_size, a.d_model, **kw),
                    ln_f=RMSLayerNorm(a.d_model, a.eps, **kw),
                    blocks=nn.ModuleList([LLaDALlamaBlock(a, **kw) for _ in range(a.n_layers)]))
        if not a.weight_tying:
            mods["ff_out"] = nn.Linear(a.d_model, a.embedding_size, bias=False, **kw)
        self.transformer = nn.ModuleDict(mods)

    def forward(self, input_ids, attention_mask=None):
        x = self.transformer.wte(input_ids)
        bias = _key_padding_bias(attention_mask, x.dtype)
        for block in self.transformer.blocks:
            x = block(x, bias)
        x = self.transformer.ln_f(x)
        if self.a.weight_tying:
            return F.linear(x, self.transformer.wte.weight, None)
        return self.transformer.ff_out(x)


class LLaDAModelLM(nn.Module):
    """LLaDA-8B-style masked diffusion LM. forward(input_ids [B,T], attention_mask [B,T]|None)
    -> logits [B,T,V], no shift (logits[:, i] predicts token i)."""

    def __init__(self, cfg_dict: dict, device=None, dtype=None):
        super().__init__()
        self.config_dict = dict(cfg_dict)
        self.model = LLaDAModel(LLaDAArgs(cfg_dict), device=device, dtype=dtype)

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids, attention_mask)


# ------------------------------------------------------------------------------------------------
# LLaDA-MoE (modeling_lladamoe.py structure, OLMoE-like)
# ------------------------------------------------------------------------------------------------
class LLaDAMoERMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class LLaDAMoERotaryEmbedding(nn.Module):
    """HF default RoPE (partial-rotary aware): cos/sin in float32, cast to the activation dtype."""

    def __init__(self, rotary_dim: int, theta: float, device=None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        pos = position_ids[:, None, :].float()
        with torch.autocast(x.device.type, enabled=False):
            freqs = (inv @ pos).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class LLaDAMoEAttention(_LlamaQKV):
    def __init__(self, a: LLaDAMoEArgs, device=None, dtype=None):
        super().__init__(a, False, device, dtype)
        kw = dict(device=device, dtype=dtype)
        self.o_proj = nn.Linear(a.d_model, a.d_model, bias=False, **kw)
        if a.qk_layernorm:
            self.q_norm = LLaDAMoERMSNorm(a.head_dim, a.eps, **kw)
            self.k_norm = LLaDAMoERMSNorm(a.head_dim, a.eps, **kw)

    def forward(self, hidden_states, attention_bias, position_embeddings):
        a = self.a
        bsz, q_len, _ = hidden_states.size()
        q = self.q_proj(hidden_states)
        k = self.k_proj(hidden_states)
        if a.qk_layernorm:  # per-head RMSNorm before RoPE
            q = self.q_norm(q.reshape(-1, a.head_dim)).reshape(bsz, q_len, -1)
            k = self.k_norm(k.reshape(-1, a.head_dim)).reshape(bsz, q_len, -1)
        v = self.v_proj(hidden_states)
        q, k, v = self.split_heads(q, k, v)
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rd = cos.shape[-1]
        q = torch.cat(((q[..., :rd] * cos) + (_rotate_half(q[..., :rd]) * sin), q[..., rd:]), dim=-1)
        k = torch.cat(((k[..., :rd] * cos) + (_rotate_half(k[..., :rd]) * sin), k[..., rd:]), dim=-1)
        g = a.n_heads // a.n_kv_heads
        if g > 1:  # HF repeat_kv
            k = k[:, :, None].expand(bsz, a.n_kv_heads, g, q_len, a.head_dim).reshape(bsz, a.n_heads, q_len, a.head_dim)
            v = v[:, :, None].expand(bsz, a.n_kv_heads, g, q_len, a.head_dim).reshape(bsz, a.n_heads, q_len, a.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).contiguous().view(bsz, q_len, a.d_model)
        return self.o_proj(out)


class LLaDAMoEMLP(nn.Module):
    def __init__(self, D: int, F_: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.gate_proj = nn.Linear(D, F_, bias=False, **kw)
        self.up_proj = nn.Linear(D, F_, bias=False, **kw)
        self.down_proj = nn.Linear(F_, D, bias=False, **kw)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LLaDAMoESparseMoeBlock(nn.Module):
    """Softmax router in float32, top-k, probabilities NOT renormalised (forced off in the real code)."""

    def __init__(self, a: LLaDAMoEArgs, device=None, dtype=None):
        super().__init__()
        self.num_experts, self.top_k = a.n_experts, a.top_k
        self.gate = nn.Linear(a.d_model, a.n_experts, bias=False, device=device, dtype=dtype)
        self.experts = nn.ModuleList([LLaDAMoEMLP(a.d_model, a.expert_hidden, device, dtype)
                                      for _ in range(a.n_experts)])

    def forward(self, hidden_states):
        b, t, d = hidden_states.shape
        hidden_states = hidden_states.view(-1, d)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros((b * t, d), dtype=hidden_states.dtype, device=hidden_states.device)
        expert_mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[e])
            if top_x.numel() == 0:
                continue
            cur = self.experts[e](hidden_states[top_x]) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, cur.to(hidden_states.dtype))
        return final.reshape(b, t, d)


class LLaDAMoEDecoderLayer(nn.Module):
    def __init__(self, a: LLaDAMoEArgs, device=None, dtype=None):
        super().__init__()
        self.self_attn = LLaDAMoEAttention(a, device, dtype)
        self.mlp = LLaDAMoESparseMoeBlock(a, device, dtype)
        self.input_layernorm = LLaDAMoERMSNorm(a.d_model, a.eps, device, dtype)
        self.post_attention_layernorm = LLaDAMoERMSNorm(a.d_model, a.eps, device, dtype)

    def forward(self, hidden_states, attention_bias, position_embeddings):
        residual = hidden_states
        h = self.self_attn(self.input_layernorm(hidden_states), attention_bias, position_embeddings)
        hidden_states = residual + h
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class LLaDAMoEModel(nn.Module):
    def __init__(self, a: LLaDAMoEArgs, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList([LLaDAMoEDecoderLayer(a, device, dtype) for _ in range(a.n_layers)])
        self.norm = LLaDAMoERMSNorm(a.d_model, a.eps, device, dtype)
        self.rotary_emb = LLaDAMoERotaryEmbedding(a.rotary_dim, a.rope_theta, device=device if device != "meta" else None)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed_tokens(input_ids)
        pos = torch.arange(input_ids.shape[1], device=h.device)[None]
        pe = self.rotary_emb(h, pos)
        bias = _key_padding_bias(attention_mask, h.dtype)
        for layer in self.layers:
            h = layer(h, bias, pe)
        return self.norm(h)


class LLaDAMoEModelLM(nn.Module):
    """LLaDA-MoE-7B-A1B-style LM. forward(input_ids, attention_mask|None) -> logits [B,T,V] (no shift)."""

    def __init__(self, cfg_dict: dict, device=None, dtype=None):
        super().__init__()
        self.config_dict = dict(cfg_dict)
        a = LLaDAMoEArgs(cfg_dict)
        self.tie = a.tie
        self.model = LLaDAMoEModel(a, device, dtype)
        if not a.tie:
            self.lm_head = nn.Linear(a.d_model, a.vocab_size, bias=False, device=device, dtype=dtype)

    def forward(self, input_ids, attention_mask=None):
        h = self.model(input_ids, attention_mask)
        return F.linear(h, self.model.embed_tokens.weight) if self.tie else self.lm_head(h)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic, test-friendly random weights: every matrix ~ N(0, 1/fan_in), every norm weight
    1 + 0.1 N(0,1), every bias 0.1 N(0,1). Large enough that attention is far from uniform and a
    wrong transpose, swap or norm mapping changes the logits a lot. Works on any torch module."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if p.ndim == 1 and "norm" in name:
            v = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif p.ndim == 1:
            v = 0.1 * torch.randn(shape, generator=g)
        else:
            v = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        p.copy_(v.to(p.dtype))
    return model


def save_hf_folder(model: nn.Module, cfg_dict: dict, path: str, dtype: Optional[torch.dtype] = None,
                   n_shards: int = 1) -> None:
    """Write `path/config.json` and the model's state_dict as safetensors (HF layout).

    n_shards > 1 splits the keys over `model-0000k-of-0000n.safetensors` files plus a
    `model.safetensors.index.json` weight map, like `save_pretrained` does for big models.
    dtype: optionally cast every tensor (e.g. torch.bfloat16) before writing.
    """
    os.makedirs(path, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous().clone()
          for k, v in model.state_dict().items()}

    def atomic(name, write):
        with atomic_path(os.path.join(path, name)) as tmp:
            write(tmp)

    def write_json(obj):
        def w(fp):
            with open(fp, "w") as f:
                json.dump(obj, f, indent=2, sort_keys=True)
        return w

    atomic("config.json", write_json(cfg_dict))
    if n_shards <= 1:
        atomic("model.safetensors", lambda fp: save_file(sd, fp, metadata={"format": "pt"}))
        return
    keys = list(sd)
    per = -(-len(keys) // n_shards)
    weight_map, total = {}, 0
    for s in range(n_shards):
        part = keys[s * per:(s + 1) * per]
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        atomic(name, lambda fp, part=part: save_file({k: sd[k] for k in part}, fp, metadata={"format": "pt"}))
        for k in part:
            weight_map[k] = name
            total += sd[k].numel() * sd[k].element_size()
    atomic("model.safetensors.index.json", write_json({"metadata": {"total_size": total}, "weight_map": weight_map}))


def load_hf_folder(path: str, device=None, dtype=None) -> nn.Module:
    """Build the LLaDA / LLaDA-MoE torch model described by `path/config.json` and load its
    safetensors (strict: every key must match). For benchmarks against real checkpoints."""
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    archs = d.get("architectures") or []
    if "num_experts" in d or any("moe" in a.lower() for a in archs):
        model = LLaDAMoEModelLM(d, device=device, dtype=dtype)
    else:
        model = LLaDAModelLM(d, device=device, dtype=dtype)
    sd = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, name)))
    model.load_state_dict(sd, strict=True)
    return model
