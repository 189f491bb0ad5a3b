"""TimeROME edit memory (paper §III-C/D, Eqs. 10-12): the edit algebra as JAX pytrees.

    build    (Eq. 11)     G = (U U^T + lam I)^{-1}  over the active facts
    delta    (Eq. 12)     h <- h + alpha * D^T TopQ_q(G U h)  at every token
    GatedEdit (Eq. 10)    h <- h + alpha * sum_f clip(<u_f,h>/(|u_f|^2+eps), 0, g_max) d_f

The keys and values come from `capture` (Eqs. 6-9, `timerome_jax.method.capture`); files are
written and read by `timerome_jax.method.memory_file`.

An `EditMemory` has a fixed capacity C (rows padded with inactive slots), and every
hyperparameter (alpha, q, lam, step) is an array: memories with different facts, a different fact
count or different hyperparameters but the same capacity and coordinate share one compiled forward.
Static: the coordinate (layer, module: where the hook sits, so `model.run` applies the edit at that
layer alone and no other layer pays a per-layer test for it) and the model fingerprint.

Building and editing (build/insert/remove) runs on the host in float64: the keys of different
facts share a large common residual component, so U U^T is badly conditioned for small lam and a
float32 Cholesky loses most digits. That is O(|F|^2 H + |F|^3) per call, done once per edit, not
per forward. The per-forward `delta` is jitted with the forward.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from timerome_jax.backbone.config import module_id

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
    return from_arrays(U, Dm, _ridge_inverse(U, active, lam), active, lam, alpha, q, layer, module, step,
                 fingerprint)


def from_arrays(U, Dm, G, active, lam, alpha, q, layer, module, step, fingerprint) -> EditMemory:
    """An `EditMemory` from its host arrays (U, Dm [C,D], G [C,C], active [C]) without re-solving
    Eq. 11 (W = G U is recomputed in float64); used by `memory_file.load`."""
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
