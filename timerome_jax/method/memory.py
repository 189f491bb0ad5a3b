"""TimeROME edit memory (paper §III-C/D, Algorithm 1 stage 3, Eqs. 6-12) as JAX pytrees.

    capture  (Eqs. 6-9)   u_z = mean_{S_z} h[x_cloze^{o_z}],  v_o = mean_{O_z} h[x_cloze^{o_z}],
                          v_t = mean_{T_z} h[x_cloze^{t}],    d_z = v_t - v_o
    build    (Eq. 11)     G = (U U^T + lam I)^{-1}  over the active facts
    delta    (Eq. 12)     h <- h + alpha * D^T TopQ_q(G U h)  at every token
    GatedEdit (Eq. 10)    h <- h + alpha * sum_f clip(<u_f,h>/(|u_f|^2+eps), 0, g_max) d_f

An `EditMemory` has a fixed capacity C (rows padded with inactive slots), and every
hyperparameter (alpha, q, lam, step) is an array: memories with different facts, a different fact
count or different hyperparameters but the same capacity and coordinate share one compiled forward.
Static: the coordinate (layer, module: where the hook sits, so `model.run` applies the edit at that
layer alone and no other layer pays a per-layer test for it) and the model fingerprint.

Building and editing (build/insert/remove) runs on the host in float64: the keys of different
facts share a large common residual component, so U U^T is badly conditioned for small lam and a
float32 Cholesky loses most digits. That is O(|F|^2 H + |F|^3) per call, done once per edit, not
per forward. The per-forward `delta` and the capture are jitted.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import zipfile
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from timerome_jax.backbone.config import MODULES, ModelConfig, module_id
from timerome_jax.backbone.intervene import Intervene
from timerome_jax.io import atomic_path
from timerome_jax.backbone import model as _model

FORMAT_NAME = "timerome-edit-memory"
FORMAT_VERSION = 1
DEFAULT_TARGET_TEXT = "I don't know."
# fp32-accurate on GPU too (bf16 x3 passes; HIGHEST's 6 passes cost ~2x more for no visible gain), exact on CPU
_HI = jax.lax.Precision.HIGH


def _layer_id(layer) -> int:
    if int(layer) != layer or layer < 0:
        raise ValueError(f"layer must be an integer >= 0, got {layer!r}")
    return int(layer)


# --------------------------------------------------------------------------------------------
# TopQ and the two edit pytrees
# --------------------------------------------------------------------------------------------

TOPQ_FAST = 16  # q up to this: threshold from lax.top_k with a static k (GPU's fast top-k path)


def _by_sort(a, q):
    n = a.shape[-1]
    return jnp.take(jnp.sort(a, axis=-1), jnp.clip(n - q, 0, n - 1), axis=-1)


def top_q(c: jax.Array, q) -> jax.Array:
    """Keep the q largest-|c| entries along the last axis, zero the rest (q <= 0: keep all).

    c [..., C] float; q an int32 scalar (data, so changing q never recompiles). Implemented by
    thresholding at the q-th largest magnitude, found with `lax.top_k` of a static k =
    min(C, TOPQ_FAST); only when C > TOPQ_FAST is there a `lax.cond` to a full sort for q > k.
    Ties: every entry whose magnitude equals the q-th largest is kept, so more than q entries
    survive only on exact ties (zeros, e.g. inactive slots, may be "kept" but add nothing).
    q >= C keeps everything.
    """
    q = jnp.asarray(q, jnp.int32)
    a = jnp.abs(c)
    n = c.shape[-1]
    k = min(n, TOPQ_FAST)
    fast = lambda a, q: jnp.take(jax.lax.top_k(a, k)[0], jnp.clip(q - 1, 0, k - 1), axis=-1)
    thr = fast(a, q) if k == n else jax.lax.cond(q <= k, fast, _by_sort, a, q)
    # q <= 0 (dense) is a select, not a branch: the top-k is cheap next to a conditional
    keep = (q <= 0) | (a >= thr[..., None])
    return jnp.where(keep, c, jnp.zeros_like(c))


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["U", "Dm", "G", "W", "active", "alpha", "q", "lam", "step"],
                   meta_fields=["layer", "module", "fingerprint"])
@dataclasses.dataclass(frozen=True)
class EditMemory:
    """Multi-fact low-rank edit memory (Eqs. 11-12) at capacity C, hidden size D.

    U [C,D] f32 subject keys; Dm [C,D] f32 target deltas d = v_t - v_o; G [C,C] f32 =
    (U_a U_a^T + lam I)^{-1} on the active rows a, 1/lam on the diagonal of inactive rows and 0
    between active and inactive rows; active [C] bool. Inactive rows of U and Dm are zero and
    their coefficients are masked, so they contribute exactly nothing.
    W [C,D] f32 = G U, precomputed (host, float64) so a forward does one key product, not two;
    its inactive rows are zero.
    alpha, lam: f32 scalars; q: int32 scalar (0 = dense); step: int32 scalar (-1 = every
    denoising step, the paper's k* = -1).
    Static: layer and module (0 resid, 1 attn, 2 mlp), i.e. where the hook sits, which is program
    structure (a forward compiles once per coordinate, and no other layer pays for the edit); and
    fingerprint (the model the keys came from). Facts, alpha, q, lam and step are data.
    """

    U: jax.Array
    Dm: jax.Array
    G: jax.Array
    W: jax.Array
    active: jax.Array
    alpha: jax.Array
    q: jax.Array
    lam: jax.Array
    step: jax.Array
    layer: int
    module: int
    fingerprint: str = ""

    @property
    def capacity(self) -> int:
        return self.U.shape[0]

    @property
    def d_model(self) -> int:
        return self.U.shape[1]

    def coefficients(self, h: jax.Array) -> jax.Array:
        """Per-token fact coefficients TopQ_q(G U h): h [..., D] -> [..., C] float32."""
        c = jnp.einsum("...d,cd->...c", h.astype(jnp.float32), self.W, precision=_HI)
        c = jnp.where(self.active, c, jnp.zeros_like(c))
        return top_q(c, self.q)

    def delta(self, h: jax.Array) -> jax.Array:
        """Eq. 12 update alpha * D^T TopQ_q(G U h) per token: h [B,T,D] -> [B,T,D] in h's dtype."""
        c = self.coefficients(h)
        out = self.alpha * jnp.einsum("...c,cd->...d", c, self.Dm, precision=_HI)
        return out.astype(h.dtype)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["u", "d", "alpha", "g_max", "eps", "step"],
                   meta_fields=["layer", "module"])
@dataclasses.dataclass(frozen=True)
class GatedEdit:
    """Eq. 10 gated edit; with F > 1 facts, the naive sum of F single-fact gated edits.

    u [F,D] subject keys, d [F,D] target deltas; alpha, g_max, eps f32 scalars; step an int32
    scalar (-1 = every step); layer and module static ints (as in `EditMemory`).
    """

    u: jax.Array
    d: jax.Array
    alpha: jax.Array
    g_max: jax.Array
    eps: jax.Array
    step: jax.Array
    layer: int
    module: int

    def gate(self, h: jax.Array) -> jax.Array:
        """g_f(h) = clip(<u_f,h>/(|u_f|^2+eps), 0, g_max): h [..., D] -> [..., F] float32."""
        uh = jnp.einsum("...d,fd->...f", h.astype(jnp.float32), self.u, precision=_HI)
        g = uh / (jnp.sum(self.u * self.u, axis=-1) + self.eps)
        return jnp.clip(g, 0.0, self.g_max)

    def delta(self, h: jax.Array) -> jax.Array:
        """alpha * sum_f g_f(h) d_f: h [B,T,D] -> [B,T,D] in h's dtype."""
        out = self.alpha * jnp.einsum("...f,fd->...d", self.gate(h), self.d, precision=_HI)
        return out.astype(h.dtype)


def gated_edit(u, d, alpha: float, layer: int, module: Union[int, str], step: int = -1,
               g_max: float = 1.0, eps: float = 1e-6) -> GatedEdit:
    """Make a `GatedEdit` from u [F,D] (or [D]) and d [F,D] (or [D]).

    The paper gives no values for g_max and eps; 1.0 (the gate of h = u_f) and 1e-6 are ours.
    """
    u = np.atleast_2d(np.asarray(u, np.float32))
    d = np.atleast_2d(np.asarray(d, np.float32))
    if u.ndim != 2 or u.shape != d.shape:
        raise ValueError(f"gated_edit: u {u.shape} and d {d.shape} must both be [F, D]")
    if g_max < 0 or eps < 0:
        raise ValueError(f"gated_edit: g_max={g_max} and eps={eps} must be >= 0")
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    return GatedEdit(jnp.asarray(u), jnp.asarray(d), f32(alpha), f32(g_max), f32(eps), i32(step),
                     _layer_id(layer), module_id(module))


# --------------------------------------------------------------------------------------------
# Building and editing the memory (host, float64 Gram solve)
# --------------------------------------------------------------------------------------------

def _ridge_inverse(U: np.ndarray, active: np.ndarray, lam: float) -> np.ndarray:
    """G [C,C] float32: (U_a U_a^T + lam I)^{-1} on active rows a, I/lam elsewhere (decoupled)."""
    import scipy.linalg

    C = U.shape[0]
    G = np.eye(C, dtype=np.float64) / lam
    idx = np.flatnonzero(active)
    if idx.size:
        Ua = U[idx].astype(np.float64)
        K = Ua @ Ua.T + lam * np.eye(idx.size)
        Ga = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K, lower=True), np.eye(idx.size))
        G[np.ix_(idx, idx)] = 0.5 * (Ga + Ga.T)  # exact symmetry, so G == G^T bit for bit
    return G.astype(np.float32)


def _check_hparams(lam, alpha, q):
    if not np.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a finite number > 0 (the ridge term keeps U U^T + lam I "
                         f"invertible), got {lam}")
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if int(q) != q or q < 0:
        raise ValueError(f"q must be an integer >= 0 (0 = dense), got {q}")


def _assemble(U, Dm, active, lam, alpha, q, layer, module, step, fingerprint) -> EditMemory:
    return _make(U, Dm, _ridge_inverse(U, active, lam), active, lam, alpha, q, layer, module, step,
                 fingerprint)


def _make(U, Dm, G, active, lam, alpha, q, layer, module, step, fingerprint) -> EditMemory:
    U = np.asarray(U, np.float32)
    G = np.asarray(G, np.float32)
    W = (G.astype(np.float64) @ U.astype(np.float64)).astype(np.float32)
    return EditMemory(
        U=jnp.asarray(U), Dm=jnp.asarray(Dm, jnp.float32), G=jnp.asarray(G), W=jnp.asarray(W),
        active=jnp.asarray(active, jnp.bool_), alpha=jnp.asarray(alpha, jnp.float32),
        q=jnp.asarray(q, jnp.int32), lam=jnp.asarray(lam, jnp.float32),
        step=jnp.asarray(step, jnp.int32), layer=_layer_id(layer),
        module=module_id(module), fingerprint=str(fingerprint))


def _as_rows(x, name: str, d_model: Optional[int] = None) -> np.ndarray:
    a = np.asarray(x, np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [N, D] (or [D] for one fact), got shape {a.shape}")
    if d_model is not None and a.shape[1] != d_model:
        raise ValueError(f"{name} has hidden size {a.shape[1]}, the memory has {d_model}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values")
    return a


def build(u, v_o, v_t, lam: float, alpha: float, q: int, layer: int, module: Union[int, str],
          step: int = -1, capacity: Optional[int] = None, fingerprint: str = "") -> EditMemory:
    """Eq. 11: an `EditMemory` from captured keys and values.

    u, v_o, v_t [N,D] (Eqs. 6-8); D = v_t - v_o (Eq. 9). Facts fill slots 0..N-1 of a memory of
    `capacity` rows (default N; must be >= N). lam > 0 is the ridge term, alpha the edit scale,
    q the TopQ sparsity (0 = dense), (layer, module, step) the coordinate (step -1 = every step).
    """
    _check_hparams(lam, alpha, q)
    u = _as_rows(u, "u")
    if u.shape[0] == 0:
        raise ValueError("build: the fact set is empty (u has 0 rows); use `empty` for a memory "
                         "to stream facts into")
    v_o, v_t = _as_rows(v_o, "v_o", u.shape[1]), _as_rows(v_t, "v_t", u.shape[1])
    if not (u.shape == v_o.shape == v_t.shape):
        raise ValueError(f"build: u {u.shape}, v_o {v_o.shape}, v_t {v_t.shape} must have one shape")
    n, d = u.shape
    cap = n if capacity is None else int(capacity)
    if cap < n:
        raise ValueError(f"build: capacity {cap} is smaller than the number of facts {n}")
    U = np.zeros((cap, d), np.float32)
    Dm = np.zeros((cap, d), np.float32)
    U[:n], Dm[:n] = u, v_t - v_o
    active = np.zeros(cap, bool)
    active[:n] = True
    return _assemble(U, Dm, active, lam, alpha, q, layer, module, step, fingerprint)


def empty(d_model: int, capacity: int, lam: float, alpha: float, q: int, layer: int,
          module: Union[int, str], step: int = -1, fingerprint: str = "") -> EditMemory:
    """A memory with no active facts (its delta is exactly 0), to `insert` facts into."""
    _check_hparams(lam, alpha, q)
    if capacity < 1 or d_model < 1:
        raise ValueError(f"empty: capacity={capacity} and d_model={d_model} must be >= 1")
    z = np.zeros((capacity, d_model), np.float32)
    return _assemble(z, z, np.zeros(capacity, bool), lam, alpha, q, layer, module, step, fingerprint)


def _host(mem: EditMemory):
    return (np.array(mem.U, np.float32), np.array(mem.Dm, np.float32), np.array(mem.active, bool))


def _rebuild(mem: EditMemory, U, Dm, active) -> EditMemory:
    return _assemble(U, Dm, active, float(mem.lam), float(mem.alpha), int(mem.q), int(mem.layer),
                     mem.module, int(mem.step), mem.fingerprint)


def insert(mem: EditMemory, u, d) -> EditMemory:
    """Stream facts in: u, d [D] (one fact) or [k,D]. Each goes to the lowest free slot; when
    the memory is full its capacity doubles (a new shape, so the next forward compiles again).
    G is recomputed from all active rows, so the result equals `build` on the same slots."""
    U, Dm, active = _host(mem)
    u, d = _as_rows(u, "u", mem.d_model), _as_rows(d, "d", mem.d_model)
    if u.shape != d.shape:
        raise ValueError(f"insert: u {u.shape} and d {d.shape} must have one shape")
    need = int(active.sum()) + u.shape[0]
    cap = U.shape[0]
    while cap < need:
        cap *= 2
    if cap != U.shape[0]:
        grow = cap - U.shape[0]
        U = np.concatenate([U, np.zeros((grow, U.shape[1]), np.float32)])
        Dm = np.concatenate([Dm, np.zeros((grow, Dm.shape[1]), np.float32)])
        active = np.concatenate([active, np.zeros(grow, bool)])
    slots = np.flatnonzero(~active)[: u.shape[0]]
    U[slots], Dm[slots], active[slots] = u, d, True
    return _rebuild(mem, U, Dm, active)


def remove(mem: EditMemory, index: Union[int, Sequence[int]]) -> EditMemory:
    """Remove the fact(s) in slot(s) `index` exactly: rows zeroed, marked inactive, G recomputed
    from the remaining active rows (capacity unchanged)."""
    U, Dm, active = _host(mem)
    idx = np.atleast_1d(np.asarray(index))
    if idx.dtype.kind not in "iu":
        raise ValueError(f"remove: slot indices must be integers, got {index!r}")
    bad = [int(i) for i in idx if not (0 <= i < U.shape[0]) or not active[i]]
    if bad:
        raise ValueError(f"remove: slot(s) {bad} are not active facts of this memory "
                         f"(capacity {U.shape[0]}, active slots {np.flatnonzero(active).tolist()})")
    U[idx], Dm[idx], active[idx] = 0.0, 0.0, False
    return _rebuild(mem, U, Dm, active)


def n_facts(mem: EditMemory) -> int:
    """Number of active facts."""
    return int(np.asarray(mem.active).sum())


# --------------------------------------------------------------------------------------------
# Capture (Eqs. 6-9)
# --------------------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClozeBatch:
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

    @property
    def n(self) -> int:
        return self.tokens_o.shape[0]


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


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "module"))
def _capture_chunk(params, b: ClozeBatch, cfg: ModelConfig, layer: int, module: int):
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
    acts = _model.run(params, tokens, cfg, pad, Intervene(read_pos=pos), step=0,
                      stop_layer=layer).acts[name][layer]
    acts_o, acts_t = acts[:n], acts[n:, : b.tgt_pos.shape[1]]
    u = _masked_mean(acts_o[:, :n_s], b.subj_valid)
    v_o = _masked_mean(acts_o[:, n_s: pos_o.shape[1]], b.obj_valid)
    v_t = _masked_mean(acts_t, b.tgt_valid)
    return u, v_o, v_t


def _check_capture(cfg: ModelConfig, batch: ClozeBatch, layer: int, module: Union[int, str]) -> int:
    """Validate a capture request (shared with `sharding.capture`); returns the module id."""
    m = module_id(module)
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"capture: layer {layer} out of range for a {cfg.n_layers}-layer model")
    for name, valid in (("subject", batch.subj_valid), ("object", batch.obj_valid),
                        ("target", batch.tgt_valid)):
        empty_rows = np.flatnonzero(~np.asarray(valid).any(axis=1))
        if empty_rows.size:
            raise ValueError(f"capture: facts {empty_rows.tolist()} have no valid {name} positions")
    return m


def capture(params, cfg: ModelConfig, batch: ClozeBatch, layer: int, module: Union[int, str],
            chunk: int = 16):
    """Eqs. 6-8 at (layer, module), denoising step 0, for every fact of `batch`.

    Returns (u, v_o, v_t), each [N,D] float32. The forward stops at `layer`; facts run in chunks
    of `chunk` (the last chunk is padded with copies of fact 0, so every chunk has one shape and
    the capture compiles once per batch shape).
    """
    m = _check_capture(cfg, batch, layer, module)
    n = batch.n
    chunk = max(1, min(int(chunk), n))
    if chunk == n:  # one chunk: no gathers, slices or concatenation (they cost as much as a small capture)
        return _capture_chunk(params, batch, cfg, int(layer), m)
    return _chunked(batch, n, chunk, lambda sub: _capture_chunk(params, sub, cfg, int(layer), m))


def _chunked(batch, n: int, step: int, run):
    """`run(sub)` on consecutive `step`-row chunks of `batch` (the last one padded with copies of
    row 0, so every chunk has one shape); returns its three outputs' first n rows, concatenated."""
    outs = []
    for start in range(0, n, step):
        idx = np.arange(start, start + step)
        idx = np.where(idx < n, idx, 0)
        res = run(jax.tree.map(lambda a: a[idx], batch))
        k = min(step, n - start)
        outs.append(tuple(r[:k] for r in res))
    return tuple(jnp.concatenate([o[i] for o in outs]) for i in range(3))


# --------------------------------------------------------------------------------------------
# Fingerprint, save, load
# --------------------------------------------------------------------------------------------

# fields that change how the model is run, not which model it is
_FP_SKIP = ("dtype", "attn_impl", "layer_unroll", "max_seq_len")


def model_fingerprint(params, cfg: ModelConfig) -> str:
    """A short id of (architecture, weights): the config (minus dtype/attn_impl/layer_unroll/max_seq_len) and,
    for every param leaf, its path, shape and its first, middle and last rows rounded to bf16 (so
    the same weights loaded in f32 or bf16 agree). A fingerprint, not a full hash: two models that
    differ only away from those rows would collide."""
    h = hashlib.sha256()
    cfg_d = {k: v for k, v in cfg.to_dict().items() if k not in _FP_SKIP}
    h.update(json.dumps(cfg_d, sort_keys=True).encode())
    layers = params["layers"]
    flat = [(jax.tree_util.keystr(p), tuple(leaf.shape), leaf) for p, leaf in
            jax.tree_util.tree_flatten_with_path({k: v for k, v in params.items() if k != "layers"})[0]]
    if isinstance(layers, (list, tuple)):  # unstacked (`model.unstack`): the stacked layout's id
        for p, _ in jax.tree_util.tree_flatten_with_path(layers[0])[0]:
            per = [functools.reduce(lambda t, k: t[k.key], p, lp) for lp in layers]
            flat.append((f"['layers']{jax.tree_util.keystr(p)}", (len(per),) + tuple(per[0].shape), per))
    else:
        flat += [(f"['layers']{jax.tree_util.keystr(p)}", tuple(leaf.shape), leaf)
                 for p, leaf in jax.tree_util.tree_flatten_with_path(layers)[0]]
    flat = sorted(flat, key=lambda t: t[0])
    # every row in one jitted gather and one transfer (row by row it was ~30 ms of syncs at 8B)
    rows = jax.device_get(_fingerprint_rows([leaf for _, _, leaf in flat]))
    for (path, shape, _), leaf_rows in zip(flat, rows):
        h.update(f"{path}{shape}".encode())
        for r in leaf_rows:
            h.update(np.asarray(r).view(np.uint16).tobytes())
    return f"{cfg.family}-{h.hexdigest()[:24]}"


@jax.jit
def _fingerprint_rows(leaves):
    def rows(leaf):
        if isinstance(leaf, (list, tuple)):  # one layer's arrays per entry: rows of the virtual stack
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

    return [rows(leaf) for leaf in leaves]


class MemoryFileError(ValueError):
    """An edit-memory file is missing pieces, corrupt, truncated or of another format version."""


class ModelMismatchError(ValueError):
    """An edit-memory file was built for another model (fingerprint mismatch)."""


class CoordinateMismatchError(ValueError):
    """An edit-memory file sits at another (layer, module[, step]) than expected."""


_ARRAYS = ("U", "Dm", "G", "active")
_RESERVED = ("format", "format_version", "fingerprint", "layer", "module", "step", "alpha", "q",
             "lam", "capacity", "d_model", "n_facts", "sha256")


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in _ARRAYS:
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(mem: EditMemory, path: Union[str, os.PathLike], meta: Optional[dict] = None) -> None:
    """Write `mem` to one .npz file, atomically (temp file in the same folder, then os.replace).

    The file holds U, Dm, G, active and a JSON header (entry "meta"): format name and version,
    fingerprint, layer, module name, step, alpha, q, lam, capacity, d_model, n_facts, a sha256 of
    the arrays, and the caller's `meta` (e.g. target_text, fact_ids; JSON-serialisable, keys must
    not clash with the reserved ones above).
    """
    path = os.fspath(path)
    arrays = {"U": np.asarray(mem.U, np.float32), "Dm": np.asarray(mem.Dm, np.float32),
              "G": np.asarray(mem.G, np.float32), "active": np.asarray(mem.active, bool)}
    user = dict(meta or {})
    clash = sorted(set(user) & set(_RESERVED))
    if clash:
        raise ValueError(f"save: meta keys {clash} are reserved for the memory's own fields")
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
              "fingerprint": mem.fingerprint, "layer": int(mem.layer),
              "module": MODULES[mem.module], "step": int(mem.step), "alpha": float(mem.alpha),
              "q": int(mem.q), "lam": float(mem.lam), "capacity": mem.capacity,
              "d_model": mem.d_model, "n_facts": n_facts(mem), "sha256": _digest(arrays), **user}
    try:
        blob = json.dumps(header, sort_keys=True).encode()
    except TypeError as e:
        raise ValueError(f"save: meta is not JSON-serialisable ({e})") from None
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add ".npz"
        np.savez(f, meta=np.frombuffer(blob, np.uint8), **arrays)
        f.flush()
        os.fsync(f.fileno())


def _norm_coordinate(coord) -> tuple:
    if len(coord) not in (2, 3):
        raise ValueError(f"expect_coordinate must be (layer, module) or (layer, module, step), "
                         f"got {coord!r}")
    out = (int(coord[0]), module_id(coord[1]))
    return out + ((int(coord[2]),) if len(coord) == 3 else ())


def load(path: Union[str, os.PathLike], expect_fingerprint: Optional[str] = None,
         expect_coordinate: Optional[tuple] = None):
    """Read a memory written by `save` -> (EditMemory, meta dict with every header field).

    expect_fingerprint: raise `ModelMismatchError` unless the file was built for this model.
    expect_coordinate: (layer, module) or (layer, module, step), module a name or id; raise
    `CoordinateMismatchError` on a mismatch. A corrupt, truncated or foreign file, or another
    format version, raises `MemoryFileError`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"edit-memory file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise MemoryFileError(f"{path}: not an edit-memory .npz file")
            missing = [k for k in ("meta",) + _ARRAYS if k not in z.files]
            if missing:
                raise MemoryFileError(f"{path}: not an edit-memory file (missing entries {missing})")
            header = json.loads(bytes(z["meta"]).decode())
            arrays = {k: z[k] for k in _ARRAYS}
    except MemoryFileError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError) as e:
        raise MemoryFileError(f"{path}: corrupt or truncated edit-memory file "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise MemoryFileError(f"{path}: not an edit-memory file (format "
                              f"{header.get('format') if isinstance(header, dict) else header!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise MemoryFileError(f"{path}: edit-memory format version {header.get('format_version')!r}; "
                              f"this library reads version {FORMAT_VERSION}")
    missing = [k for k in _RESERVED if k not in header]
    if missing:
        raise MemoryFileError(f"{path}: header lacks fields {missing}")
    if _digest(arrays) != header["sha256"]:
        raise MemoryFileError(f"{path}: array checksum mismatch (file corrupt)")
    C, D = header["capacity"], header["d_model"]
    want = {"U": (C, D), "Dm": (C, D), "G": (C, C), "active": (C,)}
    for k, shp in want.items():
        if arrays[k].shape != shp:
            raise MemoryFileError(f"{path}: entry {k} has shape {arrays[k].shape}, header says {shp}")
    if expect_fingerprint is not None and header["fingerprint"] != expect_fingerprint:
        raise ModelMismatchError(f"{path}: edit memory was built for model "
                                 f"{header['fingerprint']!r}, not {expect_fingerprint!r}")
    if expect_coordinate is not None:
        want_c = _norm_coordinate(expect_coordinate)
        have = (header["layer"], module_id(header["module"]), header["step"])[: len(want_c)]
        if have != want_c:
            fmt = lambda c: (c[0], MODULES[c[1]]) + tuple(c[2:])
            raise CoordinateMismatchError(f"{path}: edit memory sits at (layer, module, step) "
                                          f"{fmt(have)}, expected {fmt(want_c)}")
    mem = _make(arrays["U"], arrays["Dm"], arrays["G"], arrays["active"], header["lam"],
                header["alpha"], header["q"], header["layer"], module_id(header["module"]),
                header["step"], header["fingerprint"])
    return mem, header
