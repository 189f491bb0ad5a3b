"""Hugging Face `config.json` <-> ModelConfig. With `hf_weights`, the only place HF names live.

Supported families (docs/backbone_facts.md §1-§5), dispatched on `architectures` and fields, never
on model_type (LLaDA-MoE's config says model_type "llada"):

  architectures            family       key layout      notes
  LLaDAModelLM             llada        llada           model.transformer.* (OLMo names)
  MMadaModelLM             mmada        llada           = LLaDA, vocab resized
  LLaDAMoEModelLM          llada_moe    lladamoe        OLMoE-like, per-head QK-norm, 64 experts
  DreamModel               dream        qwen2           qkv bias, GQA, logits_shift
  LlamaForCausalLM         diffullama   llama           logits_shift, mask id from tokenizer/811

Config fields are whitelisted per family (penzai's idea): a known field with an unsupported value,
or an unknown field that is not null/false/0/empty, raises HFConfigError naming the field.
"""
from __future__ import annotations

import json

from timerome_jax.backbone.config import ModelConfig
from timerome_jax.io import require_file


class HFConfigError(ValueError):
    """config.json is missing, unreadable, of an unsupported architecture, or has unsupported fields."""

ARCHITECTURES = {
    "LLaDAModelLM": "llada",
    "MMadaModelLM": "mmada",
    "LLaDAMoEModelLM": "llada_moe",
    "DreamModel": "dream",
    "LlamaForCausalLM": "diffullama",
}
LAYOUT = {"llada": "llada", "mmada": "llada", "llada_moe": "lladamoe", "dream": "qwen2", "diffullama": "llama"}
LOGITS_SHIFT = {"llada": False, "mmada": False, "llada_moe": False, "dream": True, "diffullama": True}
# Mask ids used when config.json does not name one (docs/backbone_facts.md §1.4 Special tokens,
# §2 Dream-7B, §3 DiffuLLaMA-7B, §4 LLaDA-MoE-7B-A1B).
DEFAULT_MASK_ID = {"llada": 126336, "mmada": 126336, "llada_moe": 156895, "dream": 151666, "diffullama": 811}

# HF bookkeeping fields that never change the forward computation (any value accepted).
COMMON_IGNORED = frozenset({
    "architectures", "model_type", "auto_map", "torch_dtype", "dtype", "transformers_version",
    "_name_or_path", "name_or_path", "use_cache", "bos_token_id", "initializer_range", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "pruned_heads",
    "tie_encoder_decoder", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "tokenizer_class",
    "task_specific_params", "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id",
    "cross_attention_hidden_size", "tf_legacy_loss", "keys_to_ignore_at_inference",
    "quantization_config_applied", "_attn_implementation_autoset", "gradient_checkpointing",
    "output_router_logits", "router_aux_loss_coef", "attention_dropout",
})


# =================================================================================================
# config.json -> ModelConfig
# =================================================================================================
_MISSING = object()


def _harmless(v) -> bool:
    """Values of an *unknown* field that cannot change the forward: a disabled/empty setting."""
    return v is None or v is False or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0) \
        or v == "" or v == [] or v == {}


class _Fields:
    """Reads a config dict while recording which fields were handled; `finish` rejects the rest."""

    def __init__(self, d: dict, family: str):
        self.d, self.family, self.used = d, family, set()

    def get(self, key, default=_MISSING):
        self.used.add(key)
        if key in self.d and self.d[key] is not None:
            return self.d[key]
        if default is _MISSING:
            raise HFConfigError(f"config.json ({self.family}) lacks the required field {key!r}")
        return default

    def int(self, key, default=_MISSING) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            raise HFConfigError(f"config.json field {key!r} must be an integer, got {v!r}")
        return int(v)

    def float(self, key, default=_MISSING) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise HFConfigError(f"config.json field {key!r} must be a number, got {v!r}")
        return float(v)

    def expect(self, key, allowed, default=_MISSING, why: str = ""):
        """Field must take one of `allowed` values (after applying the HF class default)."""
        self.used.add(key)
        v = self.d.get(key, default)
        if v is _MISSING:
            raise HFConfigError(f"config.json ({self.family}) lacks the required field {key!r}")
        if not any(v == a and isinstance(v, bool) == isinstance(a, bool) for a in allowed):
            raise HFConfigError(
                f"config.json field {key!r}={v!r} is not supported for family {self.family!r} "
                f"(supported: {sorted(map(repr, allowed))}){'; ' + why if why else ''}")
        return v

    def ignore(self, *keys):
        """Known fields with no effect on the inference forward."""
        self.used.update(keys)

    def finish(self):
        for k, v in self.d.items():
            if k in self.used or k in COMMON_IGNORED:
                continue
            if not _harmless(v):
                raise HFConfigError(
                    f"config.json field {k!r}={v!r} is not understood for family {self.family!r}; "
                    f"refusing to guess what it changes (unknown fields are accepted only when "
                    f"null/false/0/empty)")


def detect_family(d: dict) -> str:
    """Family of a config.json dict from `architectures` and fields (never model_type)."""
    archs = d.get("architectures")
    if not archs:
        raise HFConfigError("config.json has no 'architectures' list; cannot tell which model this is "
                            f"(supported: {sorted(ARCHITECTURES)})")
    if isinstance(archs, str):
        archs = [archs]
    arch = archs[0]
    moe_fields = any(k in d for k in ("num_experts", "expert_intermediate_size"))
    if arch in ("LLaDAModelLM", "LLaDAMoEModelLM") and moe_fields:
        return "llada_moe"  # LLaDA-MoE checkpoints may reuse LLaDA names; the fields decide
    if arch not in ARCHITECTURES:
        raise HFConfigError(f"unsupported architecture {arch!r} in config.json; supported: "
                            f"{sorted(ARCHITECTURES)}")
    fam = ARCHITECTURES[arch]
    if fam == "llada_moe" and not moe_fields:
        raise HFConfigError(f"architecture {arch!r} but config.json has no num_experts/expert_intermediate_size")
    if fam != "llada_moe" and moe_fields:
        raise HFConfigError(f"architecture {arch!r} with MoE fields (num_experts/expert_intermediate_size) "
                            "is not a supported combination")
    return fam


def _token_id(v):
    """HF token-id fields may be an int or a list of ints (several EOS tokens): take the first."""
    if isinstance(v, (list, tuple)):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def _rope(r: _Fields, default_theta: float):
    """(theta, partial_rotary_factor|None) from rope_theta / rope_scaling / rope_parameters (5.x)."""
    theta = r.get("rope_theta", None)
    partial = None
    rp = r.get("rope_parameters", None)
    if rp is not None:
        if not isinstance(rp, dict):
            raise HFConfigError(f"config.json field 'rope_parameters' must be a dict, got {rp!r}")
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind != "default":
            raise HFConfigError(f"config.json field 'rope_parameters' has rope_type={kind!r}; only plain "
                                "(default) RoPE is supported")
        extra = set(rp) - {"rope_theta", "rope_type", "type", "partial_rotary_factor"}
        if extra:
            raise HFConfigError(f"config.json field 'rope_parameters' has unsupported entries {sorted(extra)}")
        theta = rp.get("rope_theta", theta)
        partial = rp.get("partial_rotary_factor")
    rs = r.get("rope_scaling", None)
    if rs is not None:
        kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else rs
        if kind not in (None, "default"):
            raise HFConfigError(f"config.json field 'rope_scaling'={rs!r} is not supported (plain RoPE only)")
    return float(default_theta if theta is None else theta), partial


def _llada_config(d: dict, family: str) -> ModelConfig:
    r = _Fields(d, family)
    D, H, L = r.int("d_model"), r.int("n_heads"), r.int("n_layers")
    n_kv = r.get("n_kv_heads", None)
    mqa = r.get("multi_query_attention", None)
    if n_kv is None:
        n_kv = 1 if mqa else H
    elif mqa is not None and int(n_kv) != (1 if mqa else H):  # OLMo's effective_n_kv_heads rule
        raise HFConfigError(f"config.json sets both multi_query_attention={mqa!r} and n_kv_heads={n_kv!r}")
    mlp_ratio = r.int("mlp_ratio", 4)
    d_ff = r.int("mlp_hidden_size", mlp_ratio * D)
    vocab = r.int("vocab_size")
    emb = r.int("embedding_size", vocab)
    if emb < vocab:
        raise HFConfigError(f"config.json embedding_size={emb} is smaller than vocab_size={vocab}")
    r.expect("activation_type", {"silu"}, "swiglu", "the llama block multiplies by up_proj itself")
    r.expect("block_type", {"llama"}, "sequential")
    r.expect("block_group_size", {1}, 1, "grouped blocks change the key names")
    r.expect("alibi", {False}, False)
    r.expect("rope", {True}, False, "without RoPE the model uses learned positions (wpe)")
    r.expect("rope_full_precision", {True}, True)
    r.expect("attention_layer_norm", {False}, False, "LLaDA QK-norm is not implemented")
    r.expect("input_emb_norm", {False}, False)
    r.expect("layer_norm_type", {"rms"}, "default")
    r.expect("layer_norm_with_affine", {True}, True)
    r.expect("include_bias", {False}, False)
    r.expect("bias_for_layer_norm", {False, None}, None)
    r.expect("scale_logits", {False}, False)
    qkv_bias = bool(r.get("include_qkv_bias", False))
    tie = bool(r.get("weight_tying", True))  # LLaDA ModelConfig default is True
    eos = _token_id(r.get("eos_token_id", 126081))
    pad = _token_id(r.get("pad_token_id", eos))
    mask = _token_id(r.get("mask_token_id", DEFAULT_MASK_ID[family]))
    # training-only / implementation-only fields (dropout is inactive at inference)
    r.ignore("alibi_bias_max", "flash_attention", "attention_dropout", "residual_dropout", "embedding_dropout",
             "attention_layer_norm_with_affine", "init_device", "init_fn", "init_std", "init_cutoff_factor",
             "precision", "tie_word_embeddings",  # LLaDA's code reads weight_tying, not this
             # MMaDA extras: multimodal bookkeeping, no effect on the text forward
             "llm_vocab_size", "llm_model_path", "codebook_size", "num_vq_tokens", "num_new_special_tokens",
             "new_vocab_size")
    cfg = ModelConfig(
        family=family, vocab_size=emb, d_model=D, n_layers=L, n_heads=H, n_kv_heads=int(n_kv),
        head_dim=D // H, d_ff=d_ff, rope_theta=r.float("rope_theta", 10000.0),
        norm_eps=r.float("rms_norm_eps", 1e-5), qkv_bias=qkv_bias, tie_embeddings=tie,
        logits_shift=False, mask_token_id=mask, pad_token_id=pad, eos_token_id=eos,
        max_seq_len=r.int("max_sequence_length", 1024))
    r.finish()
    if D % H:
        raise HFConfigError(f"config.json d_model={D} is not a multiple of n_heads={H}")
    return cfg


def _qwen2_llama_config(d: dict, family: str) -> ModelConfig:
    r = _Fields(d, family)
    D, H, L = r.int("hidden_size"), r.int("num_attention_heads"), r.int("num_hidden_layers")
    n_kv = r.int("num_key_value_heads", H)
    hd = r.int("head_dim", D // H)
    r.expect("hidden_act", {"silu"}, "silu")
    if family == "dream":
        r.expect("use_sliding_window", {False}, False)
        r.ignore("sliding_window", "max_window_layers")  # only read when use_sliding_window
        lt = r.get("layer_types", None)
        if lt is not None and any(t != "full_attention" for t in lt):
            raise HFConfigError(f"config.json field 'layer_types' has non-full attention layers: {sorted(set(lt))}")
        qkv_bias, theta_default, eps_default = True, 10000.0, 1e-6
        eos_default, pad_default = 151643, 151643
    else:
        r.expect("attention_bias", {False}, False, "o_proj bias is not implemented")
        r.expect("mlp_bias", {False}, False)
        r.ignore("pretraining_tp")  # only splits matmuls into slices; same result
        qkv_bias, theta_default, eps_default = False, 10000.0, 1e-6
        eos_default, pad_default = 2, None
    theta, partial = _rope(r, theta_default)
    if partial not in (None, 1, 1.0):
        raise HFConfigError(f"partial_rotary_factor={partial!r} is not supported for {family}")
    eos = _token_id(r.get("eos_token_id", eos_default))
    pad = _token_id(r.get("pad_token_id", pad_default))
    mask = _token_id(r.get("mask_token_id", DEFAULT_MASK_ID[family]))
    cfg = ModelConfig(
        family=family, vocab_size=r.int("vocab_size"), d_model=D, n_layers=L, n_heads=H, n_kv_heads=n_kv,
        head_dim=hd, d_ff=r.int("intermediate_size"), rope_theta=theta,
        norm_eps=r.float("rms_norm_eps", eps_default), qkv_bias=qkv_bias,
        tie_embeddings=bool(r.get("tie_word_embeddings", False)), logits_shift=True, mask_token_id=mask,
        pad_token_id=eos if pad is None else pad, eos_token_id=eos,
        max_seq_len=r.int("max_position_embeddings", 2048))
    r.finish()
    return cfg


def _lladamoe_config(d: dict) -> ModelConfig:
    family = "llada_moe"
    r = _Fields(d, family)
    D, H, L = r.int("hidden_size"), r.int("num_attention_heads"), r.int("num_hidden_layers")
    n_kv = r.int("num_key_value_heads", H)
    hd = D // H  # modeling_lladamoe: head_dim = hidden_size // num_heads, o_proj is D -> D
    r.expect("hidden_act", {"silu"}, "silu")
    r.expect("attention_bias", {False}, False)
    r.expect("clip_qkv", {None}, None)
    r.expect("moe_router_enable_expert_bias", {None, False}, None, "the expert_bias buffer is not implemented")
    r.expect("moe_router_score_function", {None, "softmax"}, None)
    r.expect("shared_expert_intermediate_size", {None, 0}, None, "shared experts are not implemented")
    freq = r.get("moe_layer_freq")
    if not isinstance(freq, (list, tuple)) or len(freq) != L or any(int(f) == 0 for f in freq):
        raise HFConfigError(f"config.json field 'moe_layer_freq'={freq!r}: only all-MoE layers "
                            f"(a list of {L} non-zero entries) are supported")
    prf = r.get("partial_rotary_factor", None)
    theta, prf2 = _rope(r, 10000.0)
    prf = prf2 if prf2 is not None else prf
    if prf in (None, -1, 1, 1.0):
        rot = None
    elif 0 < float(prf) < 1 and int(hd * float(prf)) % 2 == 0:
        rot = int(hd * float(prf))
    else:
        raise HFConfigError(f"config.json field 'partial_rotary_factor'={prf!r} is not supported")
    # norm_topk_prob is forced False in modeling_lladamoe.py; routed_scaling_factor and the router
    # group fields are stored but never read by that forward; dense_intermediate_size only sizes dense
    # layers, which moe_layer_freq rules out.
    r.ignore("norm_topk_prob", "routed_scaling_factor", "router_num_group", "router_topk_group",
             "dense_intermediate_size", "qk_layernorm")
    eos = _token_id(r.get("eos_token_id", 156892))
    pad = _token_id(r.get("pad_token_id", eos))
    cfg = ModelConfig(
        family=family, vocab_size=r.int("vocab_size"), d_model=D, n_layers=L, n_heads=H, n_kv_heads=n_kv,
        head_dim=hd, d_ff=0, rope_theta=theta, rotary_dim=rot, norm_eps=r.float("rms_norm_eps", 1e-5),
        qk_norm=bool(d.get("qk_layernorm") or False), n_experts=r.int("num_experts"),
        n_experts_per_tok=r.int("num_experts_per_tok"), d_expert=r.int("expert_intermediate_size"),
        norm_topk_prob=False, tie_embeddings=bool(r.get("tie_word_embeddings", False)), logits_shift=False,
        mask_token_id=_token_id(r.get("mask_token_id", DEFAULT_MASK_ID[family])), pad_token_id=pad,
        eos_token_id=eos, max_seq_len=r.int("max_position_embeddings", 4096))
    r.finish()
    return cfg


def config_from_hf(d: dict) -> ModelConfig:
    """ModelConfig from a parsed HF config.json dict (family detected from `architectures`/fields).

    Raises HFConfigError naming the field for: unsupported architecture, missing required field,
    a known field with an unsupported value, or an unknown field that is not null/false/0/empty.
    """
    if not isinstance(d, dict):
        raise HFConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
    fam = detect_family(d)
    if LAYOUT[fam] == "llada":
        return _llada_config(d, fam)
    if fam == "llada_moe":
        return _lladamoe_config(d)
    return _qwen2_llama_config(d, fam)


def read_config_json(path: str) -> dict:
    """Parsed `path/config.json` (HFConfigError if the folder or file is missing or not JSON)."""
    f = require_file(path, "config.json", HFConfigError, "checkpoint folder",
                     "; is this a Hugging Face model folder?")
    try:
        with open(f) as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFConfigError(f"{f}: not valid JSON ({e})") from e


# =================================================================================================
# ModelConfig -> config.json (save_pretrained)
# =================================================================================================
def _check_representable(cfg: ModelConfig):
    lay = LAYOUT[cfg.family]
    if cfg.logits_shift != LOGITS_SHIFT[cfg.family]:
        raise HFConfigError(f"{cfg.family} checkpoints have logits_shift={LOGITS_SHIFT[cfg.family]}, "
                            f"the config says {cfg.logits_shift}")
    if cfg.is_moe != (lay == "lladamoe"):
        raise HFConfigError(f"family {cfg.family!r} with n_experts={cfg.n_experts} has no HF layout")
    if cfg.qk_norm and lay != "lladamoe":
        raise HFConfigError(f"qk_norm is not representable in the {lay} layout")
    if cfg.rotary_dim is not None and lay != "lladamoe":
        raise HFConfigError(f"rotary_dim={cfg.rotary_dim} is not representable in the {lay} layout")
    if cfg.norm_topk_prob:
        raise HFConfigError("norm_topk_prob=True is not representable (LLaDA-MoE forces it off)")
    if lay == "qwen2" and not cfg.qkv_bias:
        raise HFConfigError("the Dream/Qwen2 layout always has q/k/v biases (qkv_bias=True)")
    if lay in ("llama", "lladamoe") and cfg.qkv_bias:
        raise HFConfigError(f"qkv_bias is not representable in the {lay} layout")
    if lay in ("llada", "lladamoe") and cfg.head_dim * cfg.n_heads != cfg.d_model:
        raise HFConfigError(f"the {lay} layout needs head_dim * n_heads == d_model")


def hf_config_dict(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The config.json dict of `cfg` in its family's HF layout (inverse of `config_from_hf`)."""
    _check_representable(cfg)
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16"}[dtype]
    fam = cfg.family
    if LAYOUT[fam] == "llada":
        d = {
            "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
            "architectures": ["MMadaModelLM" if fam == "mmada" else "LLaDAModelLM"],
            "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
            "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
            "d_model": cfg.d_model, "embedding_dropout": 0.0, "embedding_size": cfg.vocab_size,
            "eos_token_id": cfg.eos_token_id, "flash_attention": False, "include_bias": False,
            "include_qkv_bias": cfg.qkv_bias, "init_cutoff_factor": None, "init_device": "meta",
            "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
            "layer_norm_with_affine": True, "mask_token_id": cfg.mask_token_id,
            "max_sequence_length": cfg.max_seq_len, "mlp_hidden_size": cfg.d_ff, "mlp_ratio": 4,
            "model_type": "mmada" if fam == "mmada" else "llada", "multi_query_attention": None,
            "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "n_layers": cfg.n_layers,
            "pad_token_id": cfg.pad_token_id, "precision": "amp_bf16", "residual_dropout": 0.0,
            "rms_norm_eps": cfg.norm_eps, "rope": True, "rope_full_precision": True,
            "rope_theta": cfg.rope_theta, "scale_logits": False, "torch_dtype": torch_dtype,
            "use_cache": False, "vocab_size": cfg.vocab_size, "weight_tying": cfg.tie_embeddings,
        }
    elif LAYOUT[fam] == "lladamoe":
        d = {
            "architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "attention_bias": False,
            "attention_dropout": 0.0, "clip_qkv": None, "dense_intermediate_size": cfg.d_ff or None,
            "eos_token_id": cfg.eos_token_id, "expert_intermediate_size": cfg.d_expert, "hidden_act": "silu",
            "hidden_size": cfg.d_model, "initializer_range": 0.02, "mask_token_id": cfg.mask_token_id,
            "max_position_embeddings": cfg.max_seq_len, "moe_layer_freq": [1] * cfg.n_layers,
            "moe_router_enable_expert_bias": False, "moe_router_score_function": "softmax",
            "norm_topk_prob": False, "num_attention_heads": cfg.n_heads, "num_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.n_experts_per_tok, "num_hidden_layers": cfg.n_layers,
            "num_key_value_heads": cfg.n_kv_heads, "output_router_logits": False,
            "pad_token_id": cfg.pad_token_id,
            "partial_rotary_factor": 1.0 if cfg.rotary_dim is None else cfg.rotary_dim / cfg.head_dim,
            "qk_layernorm": cfg.qk_norm, "rms_norm_eps": cfg.norm_eps, "rope_scaling": None,
            "rope_theta": cfg.rope_theta, "routed_scaling_factor": 1, "router_aux_loss_coef": 0.01,
            "shared_expert_intermediate_size": None, "tie_word_embeddings": cfg.tie_embeddings,
            "torch_dtype": torch_dtype, "use_cache": False, "vocab_size": cfg.vocab_size,
        }
    else:
        d = {
            "architectures": ["DreamModel" if fam == "dream" else "LlamaForCausalLM"],
            "model_type": "Dream" if fam == "dream" else "llama",
            "attention_dropout": 0.0, "eos_token_id": cfg.eos_token_id, "hidden_act": "silu",
            "hidden_size": cfg.d_model, "initializer_range": 0.02, "intermediate_size": cfg.d_ff,
            "mask_token_id": cfg.mask_token_id, "max_position_embeddings": cfg.max_seq_len,
            "num_attention_heads": cfg.n_heads, "num_hidden_layers": cfg.n_layers,
            "num_key_value_heads": cfg.n_kv_heads, "pad_token_id": cfg.pad_token_id,
            "rms_norm_eps": cfg.norm_eps, "rope_scaling": None, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": torch_dtype, "use_cache": False,
            "vocab_size": cfg.vocab_size,
        }
        if cfg.head_dim * cfg.n_heads != cfg.d_model:
            d["head_dim"] = cfg.head_dim
        if fam == "dream":
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
        else:
            d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1, head_dim=cfg.head_dim)
    return d
