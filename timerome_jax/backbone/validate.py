"""Cross-framework validation of a checkpoint folder: the library against the checkpoint's own PyTorch code.

`validate(path)` loads the folder twice:

- in the library (`hf_weights.load_pretrained`);
- in PyTorch through transformers: the folder's own modeling files named by config.json's
  `auto_map` (remote code, `trust_remote_code=True`), or, for the Qwen2/Llama-based families
  (Dream, DiffuLLaMA) when the folder has no modeling files, transformers' built-in
  `Qwen2ForCausalLM` / `LlamaForCausalLM` made bidirectional by a ready 4D attention mask (a 4D
  mask is used as given, so no causal mask is added).

It runs a few prompts (each followed by mask tokens, as a denoising step sees them) unpadded (mask
tokens fill every prompt to one length) and left-padded with a padding mask, and compares the logits and every hidden state on the
real (non-pad) positions. Error of a tensor: max |library - torch| / max |torch| (relative to the
tensor's scale, so it is comparable across layers and dtypes). Hidden states follow the
transformers convention `hidden_states = (embeddings, block 0, ..., block L-2, final_norm(block L-1))`
that LLaDA's, LLaDA-MoE's, Qwen2's and Llama's modeling code all use; the logits cover block L-1.
AR-aligned families (Dream, DiffuLLaMA) have their torch logits shifted right by one as their
samplers do (the library's logits [:, i] predict token i).
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from timerome_jax.backbone import hf_config, hf_weights, model
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.io import write_json

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Masked diffusion language models denoise every position at once, so",
    "Question: who wrote the novel? Answer:",
)
# max error relative to the tensor's scale: float32 on CPU, bfloat16 (GPU) accumulates rounding per layer
DEFAULT_TOL = {"float32": 1e-4, "bfloat16": 5e-2}


class ValidationError(ValueError):
    """The folder cannot be validated (no PyTorch modeling code for it, unreadable files)."""


def _rel(a, b, valid) -> float:
    a, b = np.asarray(a, np.float64)[valid], np.asarray(b, np.float64)[valid]
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return float(np.max(np.abs(a - b)) / max(scale, 1e-30)) if b.size else 0.0


def _remote_files(path: str, d: dict) -> list[str]:
    files = sorted({v.split(".")[0] + ".py" for v in (d.get("auto_map") or {}).values() if isinstance(v, str)})
    return [f for f in files if os.path.isfile(os.path.join(path, f))]


def shim_remote_code(model_cls, device: str = "cpu") -> list[str]:
    """Let a checkpoint's remote-code model class written for transformers 4.x load under 5.x, in place,
    without editing its files. Each patch applies only where the attribute is absent, so nothing
    changes under a transformers that still provides it. Returns the names of the patches applied.

    - `all_tied_weights_keys`: transformers 5 sets it in `PreTrainedModel.post_init` and reads it
      while loading; LLaDA's `LLaDAModelLM` never calls `post_init`. `{}` = transformers ties nothing
      (LLaDA ties its own output layer when `weight_tying` is set).
    - `tie_weights`: transformers 5 calls it with keyword arguments (`missing_keys`, ...) that
      LLaDA's `tie_weights(self)` does not take; they are dropped (its own tying is kept).
    - `init_device`: LLaDA's `LLaDAModelLM.__init__` builds its `LLaDAModel` with `init_device =
      "cuda"`; on a machine without CUDA (device "cpu") the inner model is built on the CPU instead.

    A config without `use_cache` (transformers 5 dropped it from `PretrainedConfig`) is handled per
    instance by `shim_remote_config`."""
    import torch

    applied = []
    # a class default (unused by transformers 4.x); a model whose post_init runs sets its own
    # instance attribute over it
    if not hasattr(model_cls, "all_tied_weights_keys"):
        model_cls.all_tied_weights_keys = {}
        applied.append("all_tied_weights_keys={}")
    tie = model_cls.__dict__.get("tie_weights")
    if tie is not None and "missing_keys" not in inspect.signature(tie).parameters \
            and not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(tie).parameters.values()):
        @functools.wraps(tie)
        def tie_weights(self, *a, **kw):  # transformers 5 passes missing_keys=, recompute_mapping=
            return tie(self)

        model_cls.tie_weights = tie_weights
        applied.append("tie_weights(**kw)")
    mod = sys.modules.get(model_cls.__module__)
    inner = getattr(mod, "LLaDAModel", None)
    if inner is not None and inner.__module__ == model_cls.__module__ and device == "cpu" and not torch.cuda.is_available() \
            and not getattr(inner.__init__, "_timerome_cpu_shim", False):
        orig = inner.__init__

        @functools.wraps(orig)
        def init(self, config, *a, **kw):
            if getattr(config, "init_device", None) == "cuda":
                config.init_device = "cpu"
            orig(self, config, *a, **kw)

        init._timerome_cpu_shim = True
        inner.__init__ = init
        applied.append("init_device cuda->cpu")
    return applied


def shim_remote_config(config) -> list[str]:
    """Give a remote-code config the attributes transformers 4.x configs had and its modeling code
    reads (`use_cache`, default False: LLaDA has no KV cache), only where absent. Returns the
    names set."""
    applied = []
    if not hasattr(config, "use_cache"):
        config.use_cache = False
        applied.append("use_cache=False")
    return applied


def torch_model(path: str, dtype: str = "float32", device: str = "cpu", impl: str = "auto"):
    """(torch model in eval mode, description, family) for the folder's own PyTorch code.

    impl: "remote" (the auto_map modeling files, trust_remote_code), "builtin" (transformers'
    Qwen2/Llama classes; Dream and DiffuLLaMA only) or "auto" (remote when the files exist)."""
    import torch
    import transformers

    d = hf_config.read_config_json(path)
    family = hf_config.detect_family(d)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    files = _remote_files(path, d)
    if impl == "auto":
        impl = "remote" if files else "builtin"
    if impl == "remote":
        if not files:
            raise ValidationError(f"{path}: config.json's auto_map names no modeling file present in the folder "
                                  f"(auto_map: {d.get('auto_map')}); copy the checkpoint's modeling files there")
        amap = d["auto_map"]
        auto = "AutoModelForCausalLM" if "AutoModelForCausalLM" in amap else "AutoModel"
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        cls = get_class_from_dynamic_module(amap[auto], path)
        shims = shim_remote_code(cls, device)
        m = cls.from_pretrained(path, dtype=tdt)
        shims += shim_remote_config(m.config)
        desc = f"remote code {amap[auto]} ({', '.join(files)})" + (f"; shims: {', '.join(shims)}" if shims else "")
    elif impl == "builtin":
        builtin = {"dream": ("Qwen2Config", "Qwen2ForCausalLM"), "diffullama": ("LlamaConfig", "LlamaForCausalLM")}
        if family not in builtin:
            raise ValidationError(f"{path}: family {family!r} has no transformers built-in class; its folder needs "
                                  "the modeling files its config.json auto_map names")
        cname, mname = builtin[family]
        keep = {k: v for k, v in d.items() if k not in ("auto_map", "architectures", "model_type")}
        conf = getattr(transformers, cname)(**keep)
        conf._attn_implementation = "eager"
        m = getattr(transformers, mname).from_pretrained(path, config=conf, dtype=tdt)
        desc = f"transformers {mname} (built-in, bidirectional 4D mask)"
    else:
        raise ValueError(f"impl must be 'auto', 'remote' or 'builtin', got {impl!r}")
    return m.to(device).eval(), desc, family


def _torch_forward(m, ids: np.ndarray, key_mask: Optional[np.ndarray], builtin: bool, device: str):
    """(logits [B,T,V] float32 numpy, [hidden state [B,T,D] float32 numpy, ...])."""
    import torch

    ids_t = torch.as_tensor(ids, dtype=torch.long, device=device)
    kw = {}
    if builtin:  # a ready 4D additive mask: bidirectional attention, padded keys masked
        B, T = ids.shape
        dt = next(m.parameters()).dtype
        mask = torch.zeros((B, 1, T, T), dtype=dt, device=device)
        if key_mask is not None:
            km = torch.as_tensor(key_mask, dtype=torch.bool, device=device)[:, None, None, :].expand(B, 1, T, T)
            mask = mask.masked_fill(~km, torch.finfo(dt).min)
        kw["attention_mask"] = mask
    elif key_mask is not None:
        kw["attention_mask"] = torch.as_tensor(key_mask, dtype=torch.long, device=device)
    with torch.no_grad():
        out = m(input_ids=ids_t, output_hidden_states=True, **kw)
    return out.logits.float().cpu().numpy(), [h.float().cpu().numpy() for h in out.hidden_states]


def _jax_forward(params, cfg, ids: np.ndarray, key_mask: Optional[np.ndarray]):
    """(logits [B,T,V], [embeddings, block 0..L-2 outputs, final_norm(block L-1)]) as float32 numpy."""
    tokens = jnp.asarray(ids, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    pad = None if key_mask is None else jnp.asarray(key_mask, bool)
    out = _run(params, tokens, cfg, pad, Intervene(read_pos=pos))
    resid = np.asarray(out.acts["resid"], np.float32)  # [L, B, T, D]
    emb = np.asarray(model.embed(params, tokens, cfg), np.float32)
    last = np.asarray(model.rms_norm(out.acts["resid"][-1], params["final_norm"], cfg.norm_eps), np.float32)
    return np.asarray(out.logits, np.float32), [emb] + list(resid[:-1]) + [last]


_run = jax.jit(model.run, static_argnames=("cfg", "stop_layer"))


def prompt_ids(tokenizer, cfg, prompts: Sequence[str], n_mask: int = 8, seed: int = 0) -> list[list[int]]:
    """Token ids of each prompt followed by n_mask mask tokens (random ids when there is no tokenizer)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(p) if tokenizer is not None else \
            [int(t) for t in rng.integers(2, cfg.vocab_size, 6 + 3 * i)]
        ids = [t for t in ids if t != cfg.mask_token_id] + [cfg.mask_token_id] * n_mask
        out.append(ids)
    return out


CASES = ("unpadded", "padded")


def validate(path: str, dtype: Optional[str] = None, prompts: Sequence[str] = DEFAULT_PROMPTS,
             tol: Optional[float] = None, impl: str = "auto", device: Optional[str] = None,
             cases: Sequence[str] = CASES, layout: str = "auto") -> dict:
    """Compare the library with the folder's own PyTorch code; returns a report dict.

    dtype: "float32" | "bfloat16" | None (float32 on CPU, bfloat16 when JAX runs on a GPU).
    tol: max allowed error (relative to each tensor's max |value|; default DEFAULT_TOL[dtype]).
    Report: {"passed", "max_rel_err", "tol", "dtype", "torch", "family", "cases": {case: {"logits":
    err, "hidden": [err per hidden state]}}}; cases "unpadded" (prompts filled with mask tokens to one
    length, no padding) and "padded" (left-padded with a padding mask), errors over real positions.
    layout: params layout of the library side ("stacked" | "unstacked" | "auto" = unstacked on a
    GPU, as `checkpoint.load_model`), so the layout a user will run is the one checked; the report
    records it. cases: which of them to run. Some copies of LLaDA's modeling_llada.py ignore the padding mask
    or make it causal (docs/validate.md), so "padded" fails against them while "unpadded" agrees."""
    layout = model.resolve_layout(layout)
    bad = set(cases) - set(CASES)
    if bad or not cases:
        raise ValueError(f"validate: cases must be a non-empty subset of {CASES}, got {list(cases)}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValidationError(f"{path}: no config.json (not a checkpoint folder)")
    gpu = jax.default_backend() == "gpu"
    dtype = dtype or ("bfloat16" if gpu else "float32")
    device = device or ("cuda" if gpu else "cpu")
    tol = DEFAULT_TOL[dtype] if tol is None else float(tol)
    params, cfg, tok = hf_weights.load_pretrained(path, dtype, attn_impl="xla")
    if layout == "unstacked":
        params = model.unstack(params, consume=True)  # the loader's own arrays
    tm, desc, family = torch_model(path, dtype, device, impl)
    builtin = desc.startswith("transformers ")
    seqs = prompt_ids(tok, cfg, prompts)
    results = {}

    def compare(name, ids, key_mask):
        jl, jh = _jax_forward(params, cfg, ids, key_mask)
        tl, th = _torch_forward(tm, ids, key_mask, builtin, device)
        if cfg.logits_shift:
            tl = np.concatenate([tl[:, :1], tl[:, :-1]], axis=1)
        if len(th) != len(jh):
            raise ValidationError(f"{path}: the torch model returned {len(th)} hidden states, expected "
                                  f"{len(jh)} (embeddings + {cfg.n_layers} blocks)")
        valid = np.ones(ids.shape, bool) if key_mask is None else np.asarray(key_mask, bool)
        if cfg.logits_shift:  # shifted logits at a real position may come from the pad before it
            valid = valid & np.concatenate([valid[:, :1], valid[:, :-1]], axis=1)
        results[name] = {"logits": _rel(jl, tl, valid), "hidden": [_rel(a, b, valid) for a, b in zip(jh, th)]}

    T = max(len(s) for s in seqs)
    # unpadded: every prompt filled with mask tokens to one length, no padding mask; padded: the
    # same prompts with n_mask masks each, left-padded to that length (two shapes, two compiles)
    full = np.asarray([s + [cfg.mask_token_id] * (T - len(s)) for s in seqs], np.int32)
    if "unpadded" in cases:
        compare("unpadded", full, None)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids = np.full((len(seqs), T), pad_id, np.int32)
    km = np.zeros((len(seqs), T), bool)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):], km[i, T - len(s):] = s, True
    if "padded" in cases:
        compare("padded", ids, km)
    worst = max(max([c["logits"]] + c["hidden"]) for c in results.values())
    return {"model": str(path), "family": family, "layout": layout, "torch": desc, "dtype": dtype, "device": device,
            "n_layers": cfg.n_layers, "tol": tol, "max_rel_err": worst, "passed": bool(worst <= tol),
            "cases": results}


def summary_lines(report: dict) -> list[str]:
    """Human-readable lines: one per case (logits and worst hidden state), then the verdict."""
    lines = [f"{report['model']}: {report['family']}, {report['dtype']} on {report['device']}, torch = {report['torch']}"]
    for name, c in report["cases"].items():
        h = c["hidden"]
        worst = int(np.argmax(h))
        lines.append(f"  {name:12s} logits {c['logits']:.2e}   hidden max {h[worst]:.2e} (state {worst} of {len(h)})")
    verdict = "PASS" if report["passed"] else "FAIL"
    lines.append(f"{verdict}: max relative error {report['max_rel_err']:.2e} (tolerance {report['tol']:.1e})")
    return lines


def write_report(report: dict, path: str) -> None:
    """JSON report, written atomically."""
    write_json(path, report)
