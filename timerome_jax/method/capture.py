"""Capture of the edit memory's keys and values (paper §III-C, Eqs. 6-9; Algorithm 1 lines 10-13).

    u_z = mean_{S_z} h[x_cloze^{o_z}],  v_o = mean_{O_z} h[x_cloze^{o_z}],
    v_t = mean_{T_z} h[x_cloze^{t}],    d_z = v_t - v_o

`ClozeBatch` / `make_cloze_batch` lay out the cloze inputs, `capture` runs the (jitted) forward
stopped at the edit layer, and `model_fingerprint` names the model the keys came from.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import weakref
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from timerome_jax.backbone import model as model_lib
from timerome_jax.backbone.config import MODULES, ModelConfig, module_id
from timerome_jax.backbone.intervene import Intervene

DEFAULT_TARGET_TEXT = "I don't know."

# --------------------------------------------------------------------------------------------

class FactRows:
    """Base of the batch pytrees that lay out N facts one per row (every field leads with N)."""

    @property
    def n(self) -> int:
        return jax.tree.leaves(self)[0].shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClozeBatch(FactRows):
    """Cloze inputs of N facts (right-padded; positions padded with 0 and valid=False).

    tokens_o [N,T] int32: prompt + original object tokens (+eos), fully unmasked; pad_o [N,T] bool
    (True = real token). subj_pos [N,S] int32 / subj_valid [N,S] bool: subject positions S_z.
    obj_pos [N,P] / obj_valid [N,P]: object positions O_z in tokens_o.
    tokens_t [N,Tt], pad_t: prompt + target tokens (+eos); tgt_pos [N,Q] / tgt_valid [N,Q].
    """

    tokens_o: jax.Array
    pad_o: jax.Array
    subj_pos: jax.Array
    subj_valid: jax.Array
    obj_pos: jax.Array
    obj_valid: jax.Array
    tokens_t: jax.Array
    pad_t: jax.Array
    tgt_pos: jax.Array
    tgt_valid: jax.Array


def _encode(tokenizer, text) -> list:
    """Token ids of `text` without special tokens (HF tokenizers, `tokenizers.Tokenizer`, or a
    callable text -> ids); a sequence of ints passes through."""
    if not isinstance(text, str):
        return [int(t) for t in text]
    if hasattr(tokenizer, "encode"):
        try:
            out = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            out = tokenizer.encode(text)
    elif callable(tokenizer):
        out = tokenizer(text)
    else:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no .encode and is not callable")
    return [int(t) for t in getattr(out, "ids", out)]


def _pad(rows, fill, multiple: int):
    width = max(1, max(len(r) for r in rows))
    width = -(-width // multiple) * multiple
    out = np.full((len(rows), width), fill, np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        valid[i, : len(r)] = True
    return out, valid


def make_cloze_batch(tokenizer, prompts, subject_token_positions, objects,
                     target_text: Union[str, Sequence[str]] = DEFAULT_TARGET_TEXT,
                     cfg: Optional[ModelConfig] = None, pad_multiple: int = 8) -> ClozeBatch:
    """Build a `ClozeBatch` for N facts.

    prompts: N prompts, each token ids (or a str, encoded without special tokens);
    subject_token_positions: N lists of positions (into the prompt) of the subject tokens;
    objects: N original answers (str or ids); object = encode(answer) + [eos];
    target_text: the target t (one str for all facts, or N strs); target = encode(t) + [eos];
    cfg: gives eos/pad ids and max_seq_len (required). Sequence lengths are rounded up to a
    multiple of `pad_multiple` so batches of similar length share one compiled capture.
    """
    if cfg is None:
        raise ValueError("make_cloze_batch: cfg is required (it gives eos_token_id, pad_token_id)")
    n = len(prompts)
    if n == 0:
        raise ValueError("make_cloze_batch: no facts (prompts is empty)")
    if not (len(subject_token_positions) == len(objects) == n):
        raise ValueError(f"make_cloze_batch: {n} prompts, {len(subject_token_positions)} subject "
                         f"position lists and {len(objects)} objects; they must match")
    targets = [target_text] * n if isinstance(target_text, str) else list(target_text)
    if len(targets) != n:
        raise ValueError(f"make_cloze_batch: {len(targets)} target texts for {n} facts")
    eos = cfg.eos_token_id
    seq_o, seq_t, subj, objp, tgtp = [], [], [], [], []
    for i in range(n):
        p = _encode(tokenizer, prompts[i])
        o = _encode(tokenizer, objects[i]) + [eos]
        t = _encode(tokenizer, targets[i]) + [eos]
        s = [int(j) for j in subject_token_positions[i]]
        if not s:
            raise ValueError(f"make_cloze_batch: fact {i} has no subject positions")
        if min(s) < 0 or max(s) >= len(p):
            raise ValueError(f"make_cloze_batch: fact {i} subject positions {s} fall outside its "
                             f"prompt of {len(p)} tokens")
        for name, seq in (("object", p + o), ("target", p + t)):
            if len(seq) > cfg.max_seq_len:
                raise ValueError(f"make_cloze_batch: fact {i} {name} cloze has {len(seq)} tokens "
                                 f"> max_seq_len {cfg.max_seq_len}")
        seq_o.append(p + o)
        seq_t.append(p + t)
        subj.append(s)
        objp.append(list(range(len(p), len(p) + len(o))))
        tgtp.append(list(range(len(p), len(p) + len(t))))
    tok_o, pad_o = _pad(seq_o, cfg.pad_token_id, pad_multiple)
    tok_t, pad_t = _pad(seq_t, cfg.pad_token_id, pad_multiple)
    sp, sv = _pad(subj, 0, 1)
    op, ov = _pad(objp, 0, 1)
    tp, tv = _pad(tgtp, 0, 1)
    j = jnp.asarray
    return ClozeBatch(j(tok_o), j(pad_o), j(sp), j(sv), j(op), j(ov), j(tok_t), j(pad_t), j(tp), j(tv))


def _masked_mean(h, valid):
    w = valid.astype(jnp.float32)[..., None]
    return jnp.sum(h.astype(jnp.float32) * w, axis=1) / jnp.sum(w, axis=1)


def _pad_to(a, width: int, fill):
    return jnp.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill)


FIELDS = ("subject", "object", "target")


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "module"))
def capture_chunk(params, b: ClozeBatch, cfg: ModelConfig, layer: int, module: int):
    """Eqs. 6-8 for one chunk (jitted; module an int id): `b` of N facts -> (uvv [N,3,D] f32: u, v_o,
    v_t per fact; empty [N,3] bool: the fact has no valid subject / object / target position).
    One packed output (and the validity check computed here, not on the host before the call), so
    a capture brings its results to the host in one transfer (`finish_capture`)."""
    # the original and target sequences go through ONE forward of 2N rows (padded to one length):
    # at small N the capture is bound by reading the weights, so one pass instead of two halves it
    name = MODULES[module]
    n, n_s = b.tokens_o.shape[0], b.subj_pos.shape[1]
    T = max(b.tokens_o.shape[1], b.tokens_t.shape[1])
    pos_o = jnp.concatenate([b.subj_pos, b.obj_pos], axis=1)
    S = max(pos_o.shape[1], b.tgt_pos.shape[1])
    tokens = jnp.concatenate([_pad_to(b.tokens_o, T, cfg.pad_token_id), _pad_to(b.tokens_t, T, cfg.pad_token_id)])
    pad = jnp.concatenate([_pad_to(b.pad_o, T, False), _pad_to(b.pad_t, T, False)])
    pos = jnp.concatenate([_pad_to(pos_o, S, 0), _pad_to(b.tgt_pos, S, 0)])
    acts = model_lib.run(params, tokens, cfg, pad, Intervene(read_pos=pos), step=0,
                      stop_layer=layer).acts[name][layer]
    acts_o, acts_t = acts[:n], acts[n:, : b.tgt_pos.shape[1]]
    u = _masked_mean(acts_o[:, :n_s], b.subj_valid)
    v_o = _masked_mean(acts_o[:, n_s: pos_o.shape[1]], b.obj_valid)
    v_t = _masked_mean(acts_t, b.tgt_valid)
    empty = jnp.stack([~jnp.any(v, axis=1) for v in (b.subj_valid, b.obj_valid, b.tgt_valid)], axis=1)
    return jnp.stack([u, v_o, v_t], axis=1), empty


def layers_up_to(params, layer: int) -> dict:
    """params with only layers 0..layer when they are held one array per layer (`model.unstack`):
    a capture runs no further, and a jitted call pays per array it is handed. Stacked: unchanged."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)) and len(layers) > layer + 1:
        return {**params, "layers": list(layers[:layer + 1])}
    return params


def check_capture(cfg: ModelConfig, layer: int, module: Union[int, str]) -> int:
    """Validate a capture's coordinate (shared with `sharding.capture`); returns the module id.
    Facts without valid positions are reported by `finish_capture` (the check runs in the capture)."""
    m = module_id(module)
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"capture: layer {layer} out of range for a {cfg.n_layers}-layer model")
    return m


def finish_capture(uvv, empty) -> tuple:
    """`capture_chunk`'s outputs (uvv [N,3,D], empty [N,3]) -> (u, v_o, v_t) [N,D] float32 NumPy.
    One transfer (uvv); a fact without valid subject, object or target positions has a 0/0 mean,
    so `empty` is read only when a row is not finite, to say which. Raises on either."""
    uvv = np.asarray(jax.device_get(uvv), np.float32)
    bad = ~np.isfinite(uvv).all(axis=2)  # [N,3]
    if bad.any():
        _raise_if_empty(np.asarray(jax.device_get(empty)))
        raise ValueError(f"capture: facts {np.flatnonzero(bad.any(axis=1)).tolist()} have non-finite activations "
                         f"(check the weights and the inputs)")
    return uvv[:, 0], uvv[:, 1], uvv[:, 2]


def check_positions(batch: ClozeBatch) -> None:
    """Raise if a fact of `batch` has no valid subject, object or target position (reads the three
    validity masks on the host; `capture` does this check inside its jitted call instead)."""
    masks = jax.device_get((batch.subj_valid, batch.obj_valid, batch.tgt_valid))
    _raise_if_empty(np.stack([~np.asarray(v).any(axis=1) for v in masks], axis=1))


def _raise_if_empty(empty: np.ndarray) -> None:
    """empty [N,3] bool (no valid subject / object / target position) -> ValueError naming the facts."""
    for j, name in enumerate(FIELDS):
        rows = np.flatnonzero(empty[:, j])
        if rows.size:
            raise ValueError(f"capture: facts {rows.tolist()} have no valid {name} positions")


def capture(params, cfg: ModelConfig, batch: ClozeBatch, layer: int, module: Union[int, str],
            chunk: int = 16):
    """Eqs. 6-8 at (layer, module), denoising step 0, for every fact of `batch`.

    Returns (u, v_o, v_t), each [N,D] float32 NumPy (for the Eq. 11 float64 solve on the host).
    The forward stops at `layer`; facts run in chunks of `chunk` (the last chunk is padded with
    copies of fact 0, so every chunk has one shape and the capture compiles once per batch shape).
    """
    return finish_capture(*capture_on_device(params, cfg, batch, layer, module, chunk))


def capture_on_device(params, cfg: ModelConfig, batch: ClozeBatch, layer: int, module: Union[int, str],
                      chunk: int = 16):
    """`capture` without its read-back: (uvv [N,3,D] f32 = u, v_o, v_t per fact; empty [N,3] bool),
    device arrays, returned as soon as the capture is queued and not yet checked. Work on the keys
    can be queued behind it (`memory.build_on_device`) before anything waits; `finish_capture(uvv,
    empty)` then reads them back and raises on facts without valid positions."""
    m = check_capture(cfg, layer, module)
    params = layers_up_to(params, layer)
    n = batch.n
    chunk = max(1, min(int(chunk), n))
    if chunk == n:  # one chunk: no gathers, slices or concatenation (they cost as much as a small capture)
        return capture_chunk(params, batch, cfg, int(layer), m)
    return chunked(batch, n, chunk, lambda sub: capture_chunk(params, sub, cfg, int(layer), m))


def chunked(batch, n: int, step: int, run):
    """`run(sub)` on consecutive `step`-row chunks of `batch` (the last one padded with copies of
    row 0, so every chunk has one shape); returns a tuple of its outputs' first n rows, concatenated."""
    outs = []
    for start in range(0, n, step):
        idx = np.arange(start, start + step)
        idx = np.where(idx < n, idx, 0)
        res = run(jax.tree.map(lambda a: a[idx], batch))
        k = min(step, n - start)
        outs.append(tuple(r[:k] for r in res))
    return tuple(jnp.concatenate([o[i] for o in outs]) for i in range(len(outs[0])))

# --------------------------------------------------------------------------------------------
# Gate keys and calibration residuals (the gated memory, see `memory.Gate`)
# --------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg", "layer", "module"))
def slot_key_chunk(params, b: ClozeBatch, cfg: ModelConfig, layer: int, module: int):
    """Slot keys of one chunk: the mean residual over the object positions O_z of the cloze with
    every object token replaced by the mask token: `b` of N facts -> ([N,D] f32,)."""
    obj = jnp.zeros(b.tokens_o.shape, jnp.bool_).at[jnp.arange(b.n)[:, None], b.obj_pos].max(b.obj_valid)
    tokens = jnp.where(obj, cfg.mask_token_id, b.tokens_o)
    acts = model_lib.run(params, tokens, cfg, b.pad_o, Intervene(read_pos=b.obj_pos), step=0,
                      stop_layer=layer).acts[MODULES[module]][layer]
    return (_masked_mean(acts, b.obj_valid),)


def capture_slot_keys(params, cfg: ModelConfig, batch: ClozeBatch, layer: int, module: Union[int, str],
                      chunk: int = 16) -> jax.Array:
    """Gate keys at (layer, module), step 0: for every fact, the residual at its answer slots
    (object positions, answer + eos) averaged, with the whole answer masked, i.e. what the model
    holds where it is about to write this fact's answer. -> [N,D] float32."""
    m = check_capture(cfg, layer, module)
    check_positions(batch)
    params = layers_up_to(params, layer)
    n = batch.n
    chunk = max(1, min(int(chunk), n))
    if chunk == n:
        return slot_key_chunk(params, batch, cfg, int(layer), m)[0]
    return chunked(batch, n, chunk, lambda sub: slot_key_chunk(params, sub, cfg, int(layer), m))[0]


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "module"))
def _residual_chunk(params, tokens, pad, cfg: ModelConfig, layer: int, module: int):
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model_lib.run(params, tokens, cfg, pad, Intervene(read_pos=pos), step=0,
                      stop_layer=layer).acts[MODULES[module]][layer]


def capture_residuals(params, cfg: ModelConfig, tokens, pad, layer: int, module: Union[int, str],
                      chunk: int = 32) -> np.ndarray:
    """Residuals at (layer, module) of every real token: tokens, pad [N,T] (pad True = real) ->
    [n_real, D] float32 on the host (what a gate is whitened and thresholded with)."""
    m = module_id(module)
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"capture_residuals: layer {layer} out of range for a {cfg.n_layers}-layer model")
    tokens, pad = np.asarray(tokens, np.int32), np.asarray(pad, bool)
    if tokens.shape != pad.shape or tokens.ndim != 2:
        raise ValueError(f"capture_residuals: tokens {tokens.shape} and pad {pad.shape} must be one [N,T] shape")
    params = layers_up_to(params, layer)
    out = []
    for i in range(0, tokens.shape[0], chunk):
        t, p = tokens[i:i + chunk], pad[i:i + chunk]
        k = t.shape[0]
        if k < chunk:  # one compiled shape: pad the last chunk with copies of its first row
            t = np.concatenate([t, np.repeat(t[:1], chunk - k, 0)])
            p = np.concatenate([p, np.repeat(p[:1], chunk - k, 0)])
        a = np.asarray(_residual_chunk(params, jnp.asarray(t), jnp.asarray(p), cfg, int(layer), m))[:k]
        out.append(a[pad[i:i + chunk]])
    return np.concatenate(out).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------

# fields that change how the model is run, not which model it is
_FP_SKIP = ("dtype", "attn_impl", "layer_unroll", "max_seq_len")


# id(first leaf) -> ([weakref to every leaf], config key, fingerprint): jax arrays are immutable, so
# the same leaf objects are the same weights; an entry goes when its first leaf is collected
_FINGERPRINTS: dict = {}


def model_fingerprint(params, cfg: ModelConfig, cache: bool = True) -> str:
    """A short id of (architecture, weights): the config (minus dtype/attn_impl/layer_unroll/max_seq_len) and,
    for every param leaf, its path, shape and its first, middle and last rows rounded to bf16 (so
    the same weights loaded in f32 or bf16 agree). A fingerprint, not a full hash: two models that
    differ only away from those rows would collide.

    cache: computed once per params object whose leaves are all (concrete) jax arrays, which are
    immutable; later calls with the same leaf objects return it without reading the weights.
    NumPy leaves (mutable) are read every time."""
    ck = _config_key(cfg)
    leaves = jax.tree.leaves(params)
    if cache and leaves:  # the very leaf objects of a cached entry (which were all jax arrays)
        hit = _FINGERPRINTS.get(id(leaves[0]))
        if hit is not None and hit[1] == ck and len(hit[0]) == len(leaves) \
                and all(r() is x for r, x in zip(hit[0], leaves)):
            return hit[2]
    cacheable = cache and leaves and all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
                                         for x in leaves)
    fp = _fingerprint(params, cfg, ck)
    if cacheable:
        key = id(leaves[0])
        _FINGERPRINTS[key] = ([weakref.ref(x) for x in leaves], ck, fp)
        weakref.finalize(leaves[0], _FINGERPRINTS.pop, key, None)
    return fp


@functools.lru_cache(maxsize=64)
def _config_key(cfg: ModelConfig) -> str:
    """The config minus the fields that only change how the model runs, as sorted JSON (once per config)."""
    return json.dumps({k: v for k, v in cfg.to_dict().items() if k not in _FP_SKIP}, sort_keys=True)


def _fingerprint(params, cfg: ModelConfig, cfg_key: str) -> str:
    h = hashlib.sha256()
    h.update(cfg_key.encode())
    layers = params["layers"]
    # (path, shape, leaf, columns): columns = (first, end) of a fused matrix's part, else None
    flat = [(jax.tree_util.keystr(p), tuple(leaf.shape), leaf, None) for p, leaf in
            jax.tree_util.tree_flatten_with_path({k: v for k, v in params.items() if k != "layers"})[0]]
    if isinstance(layers, (list, tuple)):  # unstacked (`model.unstack`): the stacked layout's id
        cols = model_lib.fused_columns(layers[0])
        for name, shape in model_lib.layer_shapes(params).items():
            # a fused matrix's part: the fused arrays, sliced inside the jitted gather
            key, part = (cols[name][0], cols[name][1:]) if name in cols else (name, None)
            flat.append((f"['layers']['{name}']", (len(layers),) + shape, [lp[key] for lp in layers], part))
    else:
        flat += [(f"['layers']{jax.tree_util.keystr(p)}", tuple(leaf.shape), leaf, None)
                 for p, leaf in jax.tree_util.tree_flatten_with_path(layers)[0]]
    flat = sorted(flat, key=lambda t: t[0])
    # every row in one jitted gather and one transfer (row by row it was ~30 ms of syncs at 8B)
    rows = jax.device_get(_fingerprint_rows([t[2] for t in flat], tuple(t[3] for t in flat)))
    for (path, shape, _, _), leaf_rows in zip(flat, rows):
        h.update(f"{path}{shape}".encode())
        for r in leaf_rows:
            h.update(np.asarray(r).view(np.uint16).tobytes())
    return f"{cfg.family}-{h.hexdigest()[:24]}"


@functools.partial(jax.jit, static_argnames="columns")
def _fingerprint_rows(leaves, columns):
    """columns[i]: (first, end) columns of every entry of list leaf i (a part of a fused matrix), or
    None (whole arrays)."""
    def rows(leaf, cols):
        if isinstance(leaf, (list, tuple)):  # one layer's arrays per entry: rows of the virtual stack
            if cols is not None:
                leaf = [a[..., cols[0]:cols[1]] for a in leaf]
            n, rest = len(leaf), leaf[0].shape[:-1]
            picks = [(0, tuple(0 for _ in rest)), (n // 2, tuple(s // 2 for s in rest)),
                     (n - 1, tuple(s - 1 for s in rest))]
            return [jnp.asarray(leaf[i])[j].astype(jnp.bfloat16) for i, j in picks]
        leaf = jnp.asarray(leaf)
        if leaf.ndim <= 1:
            return [leaf.astype(jnp.bfloat16)]
        lead = leaf.shape[:-1]
        idx = [tuple(0 for _ in lead), tuple(s // 2 for s in lead), tuple(s - 1 for s in lead)]
        return [leaf[i].astype(jnp.bfloat16) for i in idx]

    return [rows(leaf, cols) for leaf, cols in zip(leaves, columns)]
