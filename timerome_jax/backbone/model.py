"""The MDLM backbone as pure functions over a params pytree (every family, one code path).

Params layout (plain dicts; layers stacked on a leading axis L and run with `lax.scan`):

    embed      [V, D]
    layers     attn_norm [L, D]; wq [L, D, H*hd]; wk, wv [L, D, Hkv*hd]; wo [L, H*hd, D]
               (bq [L, H*hd], bk, bv [L, Hkv*hd] when qkv_bias)
               (q_norm, k_norm [L, hd] when qk_norm)
               mlp_norm [L, D]
               dense: w_gate, w_up [L, D, F]; w_down [L, F, D]
               moe:   router [L, D, E]; w_gate, w_up [L, E, D, Fe]; w_down [L, E, Fe, D]
    final_norm [D]
    lm_head    [D, V]   (absent when tie_embeddings)

Unstacked layout (`unstack`): the same tree with `layers` a Python list of L per-layer dicts
(separate arrays, no leading axis), in which a dense layer holds its projections that read the same
input side by side: wqkv [D, H*hd + 2*Hkv*hd] = wq|wk|wv and w_gate_up [D, 2F] = w_gate|w_up
(columns concatenated; `FUSED`). `run` accepts either layout; the unstacked one runs an unrolled
layer loop that reads each layer's own arrays, with no per-iteration copy of a layer out of the
stack, and one wide matmul where the stacked layout runs three or two (the batch-1 generation
path: a 128-token canvas streams wide weights faster; docs/performance.md). Code that reads or
writes layer weights goes through `n_layers`, `layer_shapes`, `layer_params`, `layer_weight`,
`stacked_weight`, `with_layer_weight`, `with_stacked_weights`, which speak of the separate
matrices (wq, w_gate, ...) in either layout, so it works with either;
`to_layout` converts (`checkpoint.load_model(layout="auto")` gives unstacked params on GPU,
stacked elsewhere).

Precision policy: matmuls in `cfg.dtype` with float32 accumulation; RMSNorm, RoPE, softmax, the
MoE router and the logits in float32.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from timerome_jax.backbone.config import ModelConfig
from timerome_jax.backbone.intervene import Intervene, apply_edit, apply_patch, apply_shift, read

RESID, ATTN, MLP = 0, 1, 2

# unstacked dense layers: fused matrix -> the separate matrices whose columns it concatenates
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


class Out(NamedTuple):
    """logits [B,T,V] float32 (None when the forward stopped early);
    acts: dict resid/attn/mlp -> [L, B, S, D] at `intervene.read_pos` (None when nothing is read)."""

    logits: Optional[jax.Array]
    acts: Optional[dict]


def cdtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def rms_norm(x, w, eps):
    """HF order: normalise in float32, cast back to the input dtype, then scale."""
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return (w.astype(jnp.float32) * y.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions, rot_dim: int, theta: float):
    """cos, sin [..., T, rot_dim] in float32, half-split (HF `rotate_half`) layout."""
    inv = 1.0 / (theta ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin, rot_dim: int):
    """x [B,T,N,hd]; rotate the first rot_dim dims in float32 (half split), pass the rest through."""
    xr, xp = x[..., :rot_dim].astype(jnp.float32), x[..., rot_dim:]
    half = rot_dim // 2
    # HF's rotate_half, concat(-x2, x1), written as the two halves reversed times (-1, 1): the same
    # numbers, and an elementwise op that XLA fuses with q's, k's and v's other consumers of the qkv
    # product (a concatenate is a kernel of its own on GPU)
    halves = xr.reshape(*xr.shape[:-1], 2, half)
    rot = (halves[..., ::-1, :] * jnp.asarray([[-1.0], [1.0]], jnp.float32)).reshape(xr.shape)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = (xr * c + rot * s).astype(x.dtype)
    return jnp.concatenate([out, xp], axis=-1) if xp.shape[-1] else out


def _mm(x, w, dt):
    """x @ w in dt, written in dt by the product itself (on GPU accumulated in float32 and rounded
    once, as a float32 product cast to dt would be): half the bytes of a float32 output, and a GEMM
    that writes dt can take the residual add after a sub-layer's last product as its epilogue."""
    return jnp.einsum("...d,df->...f", x.astype(dt), w.astype(dt), preferred_element_type=dt)


def attention_mask(pad_mask):
    """pad_mask, or None when it masks nothing (a host check of a concrete [B,T] bool array; None
    stays None). Attention without a mask is the same function, and on GPU cuDNN's unmasked kernel is
    the faster one: callers that hold the canvas before jitting (`sampler.generate`) pass this."""
    if pad_mask is None:
        return None
    return None if bool(np.all(np.asarray(pad_mask))) else pad_mask


def attention(q, k, v, pad_mask, cfg: ModelConfig):
    """Bidirectional attention. q [B,T,H,hd], k/v [B,T,Hkv,hd]; pad_mask [B,T] bool (keys only)."""
    if cfg.attn_impl == "cudnn":
        # cuDNN wants a mask/bias as long as the sequence on both axes: broadcast the key mask over queries
        b, t = q.shape[:2]
        mask = None if pad_mask is None else jnp.broadcast_to(pad_mask[:, None, None, :], (b, 1, t, t))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=False, implementation="cudnn")
    b, t, h, hd = q.shape
    g = h // k.shape[2]
    qg = q.reshape(b, t, k.shape[2], g, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / np.sqrt(hd)
    if pad_mask is not None:
        s = jnp.where(pad_mask[:, None, None, None, :], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return o.reshape(b, t, h, hd)


def attn_block(lp, x, cos, sin, pad_mask, cfg: ModelConfig):
    """Attention sub-layer output (before the residual add). x [B,T,D] -> [B,T,D]."""
    dt = cdtype(cfg)
    b, t, _ = x.shape
    n = rms_norm(x, lp["attn_norm"], cfg.norm_eps)
    if "wqkv" in lp:  # fused (unstacked layout, `fuse_layer`): one matmul, its columns split
        qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        q, k, v = jnp.split(_mm(n, lp["wqkv"], dt), [qd, qd + kvd], axis=-1)
    else:
        q, k, v = _mm(n, lp["wq"], dt), _mm(n, lp["wk"], dt), _mm(n, lp["wv"], dt)
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"].astype(dt), k + lp["bk"].astype(dt), v + lp["bv"].astype(dt)
    q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    if cfg.qk_norm:  # LLaDA-MoE: per-head RMSNorm before RoPE
        q = rms_norm(q, lp["q_norm"], cfg.norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.norm_eps)
    q, k = apply_rope(q, cos, sin, cfg.rot_dim), apply_rope(k, cos, sin, cfg.rot_dim)
    o = attention(q, k, v, pad_mask, cfg).reshape(b, t, cfg.n_heads * cfg.head_dim)
    return _mm(o, lp["wo"], dt)


def swiglu(x, w_gate, w_up, w_down, dt):
    return _mm(jax.nn.silu(_mm(x, w_gate, dt)) * _mm(x, w_up, dt), w_down, dt)


def mlp_block(lp, h, cfg: ModelConfig):
    """MLP sub-layer output (before the residual add). h [B,T,D] -> [B,T,D]."""
    dt = cdtype(cfg)
    m = rms_norm(h, lp["mlp_norm"], cfg.norm_eps)
    if "w_gate_up" in lp:  # fused (unstacked layout, `fuse_layer`)
        gate, up = jnp.split(_mm(m, lp["w_gate_up"], dt), 2, axis=-1)
        return _mm(jax.nn.silu(gate) * up, lp["w_down"], dt)
    if not cfg.is_moe:
        return swiglu(m, lp["w_gate"], lp["w_up"], lp["w_down"], dt)
    # Softmax router in float32, top-k, no renormalisation unless the config asks for it. Experts are
    # evaluated densely and weighted by a (mostly zero) routing matrix: simple and exact; the
    # wasted expert FLOPs only matter at LLaDA-MoE scale.
    logits = jnp.einsum("btd,de->bte", m.astype(jnp.float32), lp["router"].astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    topv, topi = jax.lax.top_k(probs, cfg.n_experts_per_tok)
    if cfg.norm_topk_prob:
        topv = topv / jnp.sum(topv, axis=-1, keepdims=True)
    route = jnp.sum(jax.nn.one_hot(topi, cfg.n_experts, dtype=jnp.float32) * topv[..., None], axis=-2)
    gate = jnp.einsum("btd,edf->btef", m.astype(dt), lp["w_gate"].astype(dt), preferred_element_type=jnp.float32)
    up = jnp.einsum("btd,edf->btef", m.astype(dt), lp["w_up"].astype(dt), preferred_element_type=jnp.float32)
    act = (jax.nn.silu(gate) * up).astype(dt)
    y = jnp.einsum("btef,efd->bted", act, lp["w_down"].astype(dt), preferred_element_type=jnp.float32)
    return jnp.einsum("bted,bte->btd", y, route).astype(dt)


def embed(params, tokens, cfg: ModelConfig):
    return params["embed"][tokens].astype(cdtype(cfg))


def run(params, tokens, cfg: ModelConfig, pad_mask=None, intervene: Optional[Intervene] = None,
        step=0, stop_layer: Optional[int] = None) -> Out:
    """Full forward with interventions.

    tokens [B,T] int32; pad_mask [B,T] bool (True = real token; None = no padding).
    step: int32 scalar, the denoising-step index seen by patches and edits.
    stop_layer: static; run layers 0..stop_layer only and return no logits (capture mode).
    """
    iv = intervene if intervene is not None else Intervene()
    step = jnp.asarray(step, jnp.int32)
    x = embed(params, tokens, cfg)
    if iv.noise is not None:
        x = x + iv.noise.astype(x.dtype)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    cos, sin = rope_tables(positions, cfg.rot_dim, cfg.rope_theta)
    layers = params["layers"]
    listed = isinstance(layers, (list, tuple))
    n_layers = len(layers) if listed else jax.tree.leaves(layers)[0].shape[0]

    def layer_params(l: int):
        return layers[l] if listed else jax.tree.map(lambda a: a[l], layers)

    n_run = n_layers if stop_layer is None else int(stop_layer) + 1
    if not 1 <= n_run <= n_layers:
        raise ValueError(f"run: stop_layer={stop_layer} out of range for a {n_layers}-layer model")
    edit = iv.edit
    e_layer = None
    if edit is not None:
        e_layer = int(edit.layer)  # static: the edit's layer is structure, like its module
        if not 0 <= e_layer < n_layers:
            raise ValueError(f"run: the edit sits at layer {e_layer}, the model has {n_layers} layers")

    def block(h, lp, l, edit_here: bool):
        e = edit if edit_here else None
        a = attn_block(lp, h, cos, sin, pad_mask, cfg)
        a = apply_edit(apply_shift(apply_patch(a, iv.patch, l, step, ATTN), iv.shift, l, ATTN), e, step, ATTN)
        h = h + a
        m = mlp_block(lp, h, cfg)
        m = apply_edit(apply_shift(apply_patch(m, iv.patch, l, step, MLP), iv.shift, l, MLP), e, step, MLP)
        h = h + m
        h = apply_edit(apply_shift(apply_patch(h, iv.patch, l, step, RESID), iv.shift, l, RESID), e, step, RESID)
        ys = None
        if iv.read_pos is not None:
            ys = {"resid": read(h, iv.read_pos), "attn": read(a, iv.read_pos), "mlp": read(m, iv.read_pos)}
        return h, ys

    def segment(h, lo: int, hi: int):
        # layers lo..hi-1 by a scan over their indices; each layer's weights are indexed from the
        # full stack inside the body (a static slice of the stack would be copied whole)
        def body(h, l):
            return block(h, jax.tree.map(lambda a: a[l], layers), l, False)

        if listed or cfg.layer_unroll >= hi - lo:  # fully unrolled: static layer indices, no loop at all
            ys = []
            for l in range(lo, hi):
                h, y = block(h, layer_params(l), jnp.int32(l), False)
                ys.append(y)
            return h, (None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys))
        return jax.lax.scan(body, h, jnp.arange(lo, hi, dtype=jnp.int32), unroll=cfg.layer_unroll)

    # No edit (or one past stop_layer): one scan. An edit: scan up to its layer, that layer with the
    # edit inline, scan the rest, so no layer pays for a per-layer "is this the edit layer?" test.
    if e_layer is None or e_layer >= n_run:
        h, acts = segment(x, 0, n_run)
    else:
        parts = []
        h = x
        if e_layer > 0:
            h, ys = segment(h, 0, e_layer)
            parts.append(ys)
        h, ys = block(h, layer_params(e_layer), jnp.int32(e_layer), True)
        parts.append(jax.tree.map(lambda a: a[None], ys))
        if e_layer + 1 < n_run:
            h, ys = segment(h, e_layer + 1, n_run)
            parts.append(ys)
        acts = None if iv.read_pos is None else jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
    if stop_layer is not None:
        return Out(None, acts)
    return Out(head(params, h, cfg), acts)


def head(params, h, cfg: ModelConfig):
    """Final norm + LM head, float32 logits aligned so that [:, i] predicts token i."""
    dt = cdtype(cfg)  # matmul in the compute dtype with float32 accumulation (as every other matmul)
    if cfg.logits_shift:  # AR-aligned families: hidden i-1 predicts token i (shifted before the
        h = jnp.concatenate([h[:, :1], h[:, :-1]], axis=1)  # head: [B,T,D], not the [B,T,V] logits)
    h = rms_norm(h, params["final_norm"], cfg.norm_eps).astype(dt)
    w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum("btd,dv->btv", h, w.astype(dt), preferred_element_type=jnp.float32)


def prime_edit(params, tokens, cfg: ModelConfig, pad_mask, slots, intervene: Optional[Intervene]):
    """Set the sequence latch of a gated edit from a probe of the same rows (jit-able).

    tokens [B,T] int32, pad_mask [B,T] bool, slots [B,T] bool: the answer (generation) positions.
    The probe masks every slot, runs layers 0..edit.layer with no intervention and hands the
    residuals at the edit's module to `edit.with_latch(h, slots)`. Edits without a latch (no
    `latches` attribute, or False) come back unchanged, without a probe.
    Returns the `Intervene` with the primed edit.
    """
    e = None if intervene is None else intervene.edit
    if e is None or not getattr(e, "latches", False):
        return intervene
    slots = jnp.asarray(slots, bool)
    probe = jnp.where(slots, cfg.mask_token_id, tokens)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    layer, module = int(e.layer), int(e.module)
    acts = run(params, probe, cfg, pad_mask, Intervene(read_pos=pos), step=0, stop_layer=layer).acts
    h = acts[("resid", "attn", "mlp")[module]][layer]
    return dataclasses.replace(intervene, edit=e.with_latch(h, slots))


def forward(params, tokens, cfg: ModelConfig, pad_mask=None, intervene: Optional[Intervene] = None, step=0):
    """Logits [B,T,V] float32 with [:, i] predicting token i, for every family."""
    return run(params, tokens, cfg, pad_mask, intervene, step).logits


def unstack(params, consume: bool = False) -> dict:
    """The same params with `layers` as a list of L per-layer dicts ([D, F] etc., no leading axis),
    each dense layer's q|k|v and gate|up matrices concatenated (`fuse_layer`).

    The arrays are new (sliced copies): drop the stacked tree afterwards to keep one copy in
    memory. consume=True deletes each stacked [L, ...] leaf as soon as it is sliced, so the peak is
    the model plus its largest leaf instead of twice the layers (the caller must not use `params`
    again; `checkpoint.load_model` does this). Already unstacked params are returned as they are."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    if not consume:
        per = {k: [a[l] for l in range(n)] for k, a in layers.items()}
    else:
        per = {}
        for k, a in layers.items():
            per[k] = jax.block_until_ready([a[l] for l in range(n)])
            if isinstance(a, jax.Array):
                a.delete()
    out = dict(params)
    out["layers"] = []
    for l in range(n):  # fused layer by layer, each layer's slices dropped as soon as it is fused
        out["layers"].append(fuse_layer({k: v[l] for k, v in per.items()}))
        for v in per.values():
            v[l] = None
    return out


def stack(params) -> dict:
    """Inverse of `unstack`: `layers` as one dict of [L, ...] arrays (stacked params pass through)."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return params
    out = dict(params)
    out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *[unfuse_layer(lp) for lp in layers])
    return out


def fuse_layer(lp: dict) -> dict:
    """One layer's dict with each `FUSED` group of 2-D matrices (a dense layer's) replaced by its
    column concatenation; MoE experts ([E, D, F]) and layers already fused pass through."""
    out = dict(lp)
    for fused, parts in FUSED.items():
        if all(p in lp and lp[p].ndim == 2 for p in parts):
            out[fused] = jnp.concatenate([out.pop(p) for p in parts], axis=1)
    return out


def fused_columns(lp: dict) -> dict:
    """{separate matrix name: (fused name, first column, end column)} for the fused matrices of one
    layer's dict (empty when it holds none); widths from wo [H*hd, D] and w_down [F, D]."""
    cols = {}
    if "wqkv" in lp:
        qd = lp["wo"].shape[0]
        kvd = (lp["wqkv"].shape[1] - qd) // 2
        cols.update(wq=("wqkv", 0, qd), wk=("wqkv", qd, qd + kvd), wv=("wqkv", qd + kvd, qd + 2 * kvd))
    if "w_gate_up" in lp:
        f = lp["w_down"].shape[0]
        cols.update(w_gate=("w_gate_up", 0, f), w_up=("w_gate_up", f, 2 * f))
    return cols


def _part(lp: dict, name: str, cols: dict) -> jax.Array:
    """Separate matrix `name` of one unstacked layer's dict: its columns of the fused matrix when
    `cols` (the layer's `fused_columns`) has it, else the array itself."""
    if name in cols:
        f, a, b = cols[name]
        return lp[f][:, a:b]
    return lp[name]


def unfuse_layer(lp: dict) -> dict:
    """Inverse of `fuse_layer`: the separate matrices as column slices of the fused ones."""
    cols = fused_columns(lp)
    out = {k: v for k, v in lp.items() if k not in FUSED}
    out.update({name: _part(lp, name, cols) for name in cols})
    return out


LAYOUTS = ("stacked", "unstacked", "auto")


def resolve_layout(layout: str) -> str:
    """"stacked" | "unstacked" for a layout choice in LAYOUTS; "auto" = "unstacked" when
    `jax.default_backend()` is "gpu" (per-layer arrays, no copy of a layer out of the stack in each
    step; docs/performance.md), else "stacked" (a rolled layer scan compiles fastest on CPU/TPU)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "auto":
        return "unstacked" if jax.default_backend() == "gpu" else "stacked"
    return layout


def is_unstacked(params) -> bool:
    """True when params["layers"] is a list of per-layer dicts (`unstack`), False when stacked."""
    return isinstance(params["layers"], (list, tuple))


def layout_of(params) -> str:
    """"stacked" or "unstacked": the layout of a params tree."""
    return "unstacked" if is_unstacked(params) else "stacked"


def to_layout(params, layout: str) -> dict:
    """params in `layout` ("stacked" | "unstacked" | "auto", see `resolve_layout`); params already in
    it pass through unchanged, otherwise the layer arrays are copied once (`stack` / `unstack`)."""
    return unstack(params) if resolve_layout(layout) == "unstacked" else stack(params)


def n_layers(params) -> int:
    """Number of layers L of a params tree in either layout."""
    layers = params["layers"]
    return len(layers) if is_unstacked(params) else int(jax.tree.leaves(layers)[0].shape[0])


def _check_layer(params, l) -> int:
    L = n_layers(params)
    if int(l) != l or not 0 <= int(l) < L:
        raise ValueError(f"layer {l!r} out of range for a {L}-layer model")
    return int(l)


def layer_params(params, l: int) -> dict:
    """Layer l's weights as a dict of arrays without the layer axis (e.g. wq [D, H*hd]), either layout
    (unstacked: the separate matrices sliced out of the fused ones, `unfuse_layer`)."""
    l = _check_layer(params, l)
    layers = params["layers"]
    return unfuse_layer(layers[l]) if is_unstacked(params) else jax.tree.map(lambda a: a[l], layers)


def layer_shapes(params) -> dict:
    """{weight name: shape of one layer's array (no layer axis)}, either layout; reads no data."""
    if is_unstacked(params):
        lp = params["layers"][0]
        shapes = {k: tuple(v.shape) for k, v in lp.items() if k not in FUSED}
        shapes.update({name: (lp[f].shape[0], b - a) for name, (f, a, b) in fused_columns(lp).items()})
        return shapes
    return {k: tuple(v.shape[1:]) for k, v in params["layers"].items()}


def _check_name(params, name: str) -> None:
    if name not in layer_shapes(params):
        raise KeyError(f"layer weight {name!r} not in the model (has {sorted(layer_shapes(params))})")


def layer_weight(params, name: str, l: int) -> jax.Array:
    """One weight `name` (a key of the layer dict, e.g. "w_down" [F, D]) of layer l, either layout
    (stacked: only that leaf is sliced)."""
    l = _check_layer(params, l)
    _check_name(params, name)
    if not is_unstacked(params):
        return params["layers"][name][l]
    lp = params["layers"][l]
    return _part(lp, name, fused_columns(lp))


def stacked_weight(params, name: str) -> jax.Array:
    """Weight `name` of every layer as one [L, ...] array: the stored array when stacked, a new
    stacked copy when unstacked."""
    _check_name(params, name)
    if not is_unstacked(params):
        return params["layers"][name]
    return jnp.stack([layer_weight(params, name, l) for l in range(n_layers(params))])


def with_layer_weight(params, name: str, l: int, value) -> dict:
    """A new params tree (same layout) with layer l's `name` set to value (its shape and dtype);
    every other array is shared with `params` (stacked: the one [L, ...] leaf is rebuilt)."""
    old = layer_weight(params, name, l)
    l = int(l)
    if tuple(value.shape) != tuple(old.shape):
        raise ValueError(f"with_layer_weight: {name}[{l}] has shape {tuple(old.shape)}, got {tuple(value.shape)}")
    value = jnp.asarray(value, old.dtype)
    out = dict(params)
    if is_unstacked(params):
        out["layers"] = list(params["layers"])
        out["layers"][l] = _with_parts(params["layers"][l], {name: value})
    else:
        out["layers"] = dict(params["layers"], **{name: params["layers"][name].at[l].set(value)})
    return out


def with_stacked_weights(params, weights: dict) -> dict:
    """A new params tree (same layout) with each weight `name` of every layer taken from
    weights[name] [L, ...] (unstacked params get its per-layer slices); other arrays are shared."""
    L, shapes = n_layers(params), layer_shapes(params)
    for name, w in weights.items():
        _check_name(params, name)
        if tuple(w.shape) != (L,) + shapes[name]:
            raise ValueError(f"with_stacked_weights: {name} must have shape {(L,) + shapes[name]}, "
                             f"got {tuple(w.shape)}")
    out = dict(params)
    if is_unstacked(params):
        out["layers"] = [_with_parts(lp, {n: w[l] for n, w in weights.items()}) for l, lp in enumerate(params["layers"])]
    else:
        out["layers"] = dict(params["layers"], **weights)
    return out


def _with_parts(lp: dict, values: dict) -> dict:
    """One unstacked layer's dict with the named separate matrices set (a fused one's columns are
    rewritten in a new array of the fused matrix's dtype; other matrices are taken as given)."""
    out, cols = dict(lp), fused_columns(lp)
    for name, v in values.items():
        if name in cols:
            f, a, b = cols[name]
            out[f] = out[f].at[:, a:b].set(jnp.asarray(v, out[f].dtype))
        else:
            out[name] = v
    return out


def param_shapes(cfg: ModelConfig) -> dict:
    """The expected params tree as {path: shape}; converters and `init_params` both use it."""
    L, D, V, hd = cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.head_dim
    qd, kvd = cfg.n_heads * hd, cfg.n_kv_heads * hd
    lay = {"attn_norm": (L, D), "wq": (L, D, qd), "wk": (L, D, kvd), "wv": (L, D, kvd), "wo": (L, qd, D),
           "mlp_norm": (L, D)}
    if cfg.qkv_bias:
        lay.update(bq=(L, qd), bk=(L, kvd), bv=(L, kvd))
    if cfg.qk_norm:
        lay.update(q_norm=(L, hd), k_norm=(L, hd))
    if cfg.is_moe:
        E, F = cfg.n_experts, cfg.d_expert
        lay.update(router=(L, D, E), w_gate=(L, E, D, F), w_up=(L, E, D, F), w_down=(L, E, F, D))
    else:
        lay.update(w_gate=(L, D, cfg.d_ff), w_up=(L, D, cfg.d_ff), w_down=(L, cfg.d_ff, D))
    shapes = {"embed": (V, D), "layers": lay, "final_norm": (D,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_params(key, cfg: ModelConfig, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random params (normal(std) matrices, unit norms) in the `param_shapes` layout."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda s: isinstance(s, tuple))[0]]
    keys = jax.random.split(key, len(flat))
    leaves = []
    for k, shp, path in zip(keys, flat, paths):
        if "norm" in path:
            leaves.append(jnp.ones(shp, dtype))
        else:
            leaves.append((std * jax.random.normal(k, shp)).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)
