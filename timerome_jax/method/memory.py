"""TimeROME edit memory (paper §III-C/D, Eqs. 10-12): the edit algebra as JAX pytrees.

    build    (Eq. 11)     G = (U U^T + lam I)^{-1}  over the active facts
    delta    (Eq. 12)     h <- h + alpha * D^T TopQ_q(G U h)  at every token
    Gate                  the selective memory: the update only where a token's whitened answer-slot
                          score passes tau, or on the answer positions of a sequence whose probe
                          (answer fully masked) passes tau_seq (the latch, primed by `model.prime_edit`)
    GatedEdit (Eq. 10)    h <- h + alpha * sum_f clip(<u_f,h>/(|u_f|^2+eps), 0, g_max) d_f

The keys and values come from `capture` (Eqs. 6-9, `timerome_jax.method.capture`); files are
written and read by `timerome_jax.method.memory_file`.

An `EditMemory` has a fixed capacity C (rows padded with inactive slots), and every
hyperparameter (alpha, q, lam, step) is an array: memories with different facts, a different fact
count or different hyperparameters but the same capacity and coordinate share one compiled forward.
Static: the coordinate (layer, module: where the hook sits, so `model.run` applies the edit at that
layer alone and no other layer pays a per-layer test for it) and the model fingerprint.

Building and editing (build/insert/remove) runs in float64: the keys of different facts share a
large common residual component, so U U^T is badly conditioned for small lam and a float32
Cholesky loses most digits. That is O(|F|^2 H + |F|^3) per call, done once per edit, not per
forward, on the host; small sets without a gate can run the same float64 solve on the device
(`build_on_device`), queued behind their capture. The per-forward `delta` is jitted with the forward.
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

TOPQ_FAST = 16  # q up to this: threshold from lax.top_k with a static k (the fast top-k path)


def _by_sort(a, q):
    n = a.shape[-1]
    return jnp.take(jnp.sort(a, axis=-1), jnp.clip(n - q, 0, n - 1), axis=-1)


def _by_top_k(a, q):
    k = min(a.shape[-1], TOPQ_FAST)
    return jnp.take(jax.lax.top_k(a, k)[0], jnp.clip(q - 1, 0, k - 1), axis=-1)


def _threshold_cpu(a, q):
    # a row sort costs several times a top_k on the CPU, and a conditional costs nothing there
    if a.shape[-1] <= TOPQ_FAST:
        return _by_top_k(a, q)
    return jax.lax.cond(q <= TOPQ_FAST, _by_top_k, _by_sort, a, q)


def _threshold_accelerator(a, q):
    # on GPU a conditional copies its predicate to the host and waits, inside every forward;
    # a row sort is a few microseconds, so the method is fixed by the shape instead
    return _by_top_k(a, q) if a.shape[-1] <= TOPQ_FAST else _by_sort(a, q)


def top_q(c: jax.Array, q) -> jax.Array:
    """Keep the q largest-|c| entries along the last axis, zero the rest (q <= 0: keep all).

    c [..., C] float; q an int32 scalar (data, so changing q never recompiles). Implemented by
    thresholding at the q-th largest magnitude, read from `lax.top_k` (static k = min(C,
    TOPQ_FAST)) or from a full sort of the row. Which one is chosen per platform when the program
    is lowered (`lax.platform_dependent`): on CPU a `lax.cond` on q picks top_k for q <= TOPQ_FAST;
    elsewhere the shape alone decides (C <= TOPQ_FAST: top_k, else the sort), with no branch on q.
    Both give the same q-th largest value, so results do not depend on the platform's choice.
    Ties: every entry whose magnitude equals the q-th largest is kept, so more than q entries
    survive only on exact ties (zeros, e.g. inactive slots, may be "kept" but add nothing).
    q >= C keeps everything.
    """
    q = jnp.asarray(q, jnp.int32)
    a = jnp.abs(c)
    thr = jax.lax.platform_dependent(a, q, cpu=_threshold_cpu, default=_threshold_accelerator)
    # q <= 0 (dense) is a select, not a branch
    keep = (q <= 0) | (a >= thr[..., None])
    return jnp.where(keep, c, jnp.zeros_like(c))


# A token-gate threshold at or above this switches the per-token gate off (every whitened cosine is
# <= 1): `make_gate` then builds a gate without one (`Gate.token` False), so a forward skips its work.
TAU_OFF = 2.0


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["K", "mu", "P", "tau", "on", "n_slots", "tau_seq", "latch"], meta_fields=["token"])
@dataclasses.dataclass(frozen=True)
class Gate:
    """Gate g in {0, 1} of a gated memory: h <- h + g alpha TopQ_q(D^T G U h), per token.

    Token gate: g(h) = 1 when max_f cos_W(h, k_f) > tau over the active facts f, where cos_W is the
    cosine after whitening z = P (h - mu): the keys k_f are residuals at the fact's answer slots with
    the answer fully masked (`capture.capture_slot_keys`), and (mu, P) whiten with the residuals of
    held-out retain rows (`fit_whitening`), so directions every question shares count little.
    Sequence latch: a forward may carry `latch` [B,T] bool (set by `EditMemory.with_latch` from a
    probe of the same prompt with its answer fully masked): g = 1 wherever latch is True as well, so
    a sequence recognised as a forget question stays edited on its answer positions whatever has
    been committed there (`sequence_score`).
    K [C,R] f32: whitened, unit-norm keys P (k_f - mu) / |.| (zero rows for inactive slots);
    mu [D] f32; P [R,D] f32 (R <= D; R = D is full whitening); tau f32 scalar threshold on the
    whitened cosine; on bool scalar (False: g = 1 everywhere, i.e. Eq. 12 exactly); n_slots [C]
    int32: answer slots (answer + eos) each key was averaged over (0: the fact never latches);
    tau_seq f32 scalar threshold of the sequence latch (+inf: never latches); latch [B,T] bool or
    None (no probe: token gate alone). All data; whether latch is None is structure.
    token (static bool): whether the gate has a per-token gate. False (the latch default, tau >=
    `TAU_OFF`): g = latch alone, so a forward does no whitening or cosines, only the select on the
    latch; tau is then kept (files, `gate_scores`) but unused. Switching it on or off compiles a new
    program; with it on, tau is data like everything else.
    """

    K: jax.Array
    mu: jax.Array
    P: jax.Array
    tau: jax.Array
    on: jax.Array
    n_slots: Optional[jax.Array] = None
    tau_seq: Optional[jax.Array] = None
    latch: Optional[jax.Array] = None
    token: bool = True

    def score(self, h: jax.Array, active: jax.Array) -> jax.Array:
        """max over active facts of the whitened cosine: h [..., D] -> [...] f32 (-inf: no fact)."""
        z = jnp.einsum("...d,rd->...r", h.astype(jnp.float32) - self.mu, self.P, precision=_HI)
        n = jnp.sqrt(jnp.sum(z * z, axis=-1, keepdims=True))
        s = jnp.einsum("...r,cr->...c", z / jnp.maximum(n, 1e-30), self.K, precision=_HI)
        return jnp.max(jnp.where(active, s, -jnp.inf), axis=-1)

    def sequence_score(self, h: jax.Array, slots: jax.Array, active: jax.Array) -> jax.Array:
        """Sequence score of a probe: h [B,T,D] residuals of prompts whose answer slots (slots
        [B,T] bool, contiguous per row) are all masked -> [B] f32. For each fact f, the residual
        averaged over the row's first n_slots[f] slots (the span its key was averaged over),
        whitened, cosine with k_f; max over active facts with n_slots > 0 (-inf: none)."""
        slots = jnp.asarray(slots, jnp.bool_)
        z = jnp.einsum("btd,rd->btr", h.astype(jnp.float32) - self.mu, self.P, precision=_HI)
        cs = jnp.cumsum(jnp.where(slots[..., None], z, 0.0), axis=1)  # [B,T,R]
        first = jnp.argmax(slots, axis=1).astype(jnp.int32)  # [B]
        count = jnp.sum(slots, axis=1, dtype=jnp.int32)  # [B]
        n = jnp.clip(jnp.minimum(self.n_slots[None, :], count[:, None]), 1, None)  # [B,C]
        end = jnp.clip(first[:, None] + n - 1, 0, h.shape[1] - 1)
        m = jnp.take_along_axis(cs, end[..., None], axis=1)  # [B,C,R]; the mean's direction
        cos = jnp.sum(m * self.K[None], axis=-1) / jnp.maximum(jnp.linalg.norm(m, axis=-1), 1e-30)
        ok = active[None, :] & (self.n_slots[None, :] > 0) & (count[:, None] > 0)
        return jnp.max(jnp.where(ok, cos, -jnp.inf), axis=-1)

    def fires(self, h: jax.Array, active: jax.Array) -> jax.Array:
        """g as bool: h [..., D] -> [...] (token gate OR latch; all True when the gate is off). With a
        latch, h must be the [B,T,D] batch the latch was primed for. Without a token gate (`token`
        False) h is read for its shape only."""
        g = self.score(h, active) > self.tau if self.token else None
        if self.latch is not None:
            g = self.latch if g is None else jnp.logical_or(g, self.latch)
        if g is None:  # no token gate and no primed latch: nothing fires
            g = jnp.zeros(h.shape[:-1], jnp.bool_)
        return jnp.logical_or(jnp.logical_not(self.on), g)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["U", "Dm", "G", "W", "active", "alpha", "q", "lam", "step", "gate"],
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
    gate: a `Gate` (the selective memory: the update is applied only on tokens where it fires)
    or None (the paper's Eq. 12 at every token); whether a memory has a gate is structure, its
    keys, threshold and on/off switch are data.
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
    gate: Optional[Gate] = None

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
        if self.gate is not None:  # gated: h <- h + g(h) * alpha TopQ_q(D^T G U h)
            out = jnp.where(self.gate.fires(h, self.active)[..., None], out, jnp.zeros_like(out))
        return out.astype(h.dtype)

    def fires(self, h: jax.Array) -> jax.Array:
        """Where the update is applied: h [..., D] -> [...] bool (all True without a gate)."""
        if self.gate is None:
            return jnp.ones(h.shape[:-1], jnp.bool_)
        return self.gate.fires(h, self.active)

    @property
    def latches(self) -> bool:
        """Whether this memory has a sequence latch to prime (a gate with n_slots; structure)."""
        return self.gate is not None and self.gate.n_slots is not None

    def with_latch(self, h: jax.Array, slots: jax.Array) -> "EditMemory":
        """This memory with the sequence latch of a probe set (see `Gate`): h [B,T,D] residuals at
        the edit's coordinate of the prompts with every answer slot masked, slots [B,T] bool (those
        slots) -> a memory whose gate also fires on the slots of every row whose sequence score
        exceeds tau_seq. Ungated memories come back unchanged. Called by `model.prime_edit`."""
        if self.gate is None or self.gate.n_slots is None:
            return self
        slots = jnp.asarray(slots, jnp.bool_)
        row = self.gate.sequence_score(h, slots, self.active) > self.gate.tau_seq
        return dataclasses.replace(self, gate=dataclasses.replace(self.gate, latch=row[:, None] & slots))

    def tile_latch(self, m: int) -> "EditMemory":
        """The latch [B,T] repeated m times along the batch (row j * B + b), for batched MC samples."""
        if self.gate is None or self.gate.latch is None or m == 1:
            return self
        return dataclasses.replace(self, gate=dataclasses.replace(self.gate, latch=jnp.tile(self.gate.latch, (m, 1))))


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


def _assemble(U, Dm, active, lam, alpha, q, layer, module, step, fingerprint, gate=None) -> EditMemory:
    return from_arrays(U, Dm, _ridge_inverse(U, active, lam), active, lam, alpha, q, layer, module, step,
                       fingerprint, gate)


def from_arrays(U, Dm, G, active, lam, alpha, q, layer, module, step, fingerprint,
                gate: Optional[Gate] = None) -> EditMemory:
    """An `EditMemory` from its host arrays (U, Dm [C,D], G [C,C], active [C]) without re-solving
    Eq. 11 (W = G U is recomputed in float64); used by `memory_file.load`. gate: a `Gate` or None."""
    U = np.asarray(U, np.float32)
    G = np.asarray(G, np.float32)
    W = (G.astype(np.float64) @ U.astype(np.float64)).astype(np.float32)
    if gate is not None and (gate.K.shape[0] != U.shape[0] or gate.mu.shape != (U.shape[1],)
                             or gate.P.shape[1] != U.shape[1] or gate.K.shape[1] != gate.P.shape[0]):
        raise ValueError(f"gate: K {gate.K.shape}, mu {gate.mu.shape}, P {gate.P.shape} do not fit a "
                         f"memory of capacity {U.shape[0]} and hidden size {U.shape[1]}")
    U, Dm, G, W, active, alpha, q, lam, step = _to_device(U, np.asarray(Dm, np.float32), G, W, np.asarray(active, bool),
                                                          alpha, q, lam, step)
    return EditMemory(U=U, Dm=Dm, G=G, W=W, active=active, alpha=alpha, q=q, lam=lam, step=step,
                      layer=_layer_id(layer), module=module_id(module), fingerprint=str(fingerprint), gate=gate)


# a memory whose arrays hold fewer floats than this goes to the device as ONE packed buffer (a transfer
# costs tens of microseconds whatever its size, and a small memory has nine arrays); larger ones go
# array by array (bandwidth-bound, and packing would copy them once more on the host)
PACK_MAX_FLOATS = 1 << 20


@functools.partial(jax.jit, static_argnames=("c", "d"))
def _unpack(buf, c: int, d: int):
    cd = c * d
    U, Dm, W = (buf[i * cd:(i + 1) * cd].reshape(c, d) for i in range(3))
    o = 3 * cd
    G = buf[o:o + c * c].reshape(c, c)
    o += c * c
    active = buf[o:o + c] != 0
    o += c
    alpha, q, lam, step = (buf[o + i] for i in range(4))
    return U, Dm, G, W, active, alpha, q.astype(jnp.int32), lam, step.astype(jnp.int32)


def _to_device(U, Dm, G, W, active, alpha, q, lam, step):
    """Host arrays U, Dm, W [C,D] f32, G [C,C] f32, active [C] bool and the four scalars -> device
    arrays (f32, int32 q and step), in one transfer when small (`PACK_MAX_FLOATS`)."""
    c, d = U.shape
    if 3 * c * d + c * c + c + 4 > PACK_MAX_FLOATS:
        return jax.device_put((U, Dm, G, W, active, np.float32(alpha), np.int32(q), np.float32(lam), np.int32(step)))
    # q and step are small integers (|x| < 2^24), exact in float32
    buf = np.concatenate([U.reshape(-1), Dm.reshape(-1), W.reshape(-1), G.reshape(-1), active.astype(np.float32),
                          np.asarray([alpha, q, lam, step], np.float32)])
    return _unpack(buf, c, d)  # the call transfers the host buffer itself (a separate device_put costs more)


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


# --------------------------------------------------------------------------------------------
# The gate: whitening, keys, threshold
# --------------------------------------------------------------------------------------------

def fit_whitening(x, shrink: float = 0.01, rank: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], P [R,D]) f32 with P (x - mu) white: x [N,D] residuals of held-out rows.

    P = diag(e_r + shrink * mean(e))^{-1/2} V_r^T from the covariance's eigenpairs (float64), the
    R = `rank` (default D) largest; shrink > 0 keeps directions the rows barely vary in from
    dominating the whitened cosine.
    """
    x = _as_rows(x, "whitening residuals").astype(np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"fit_whitening: need >= 2 residual rows, got {n}")
    if not shrink > 0:
        raise ValueError(f"fit_whitening: shrink must be > 0, got {shrink}")
    r = d if rank is None else int(rank)
    if not 1 <= r <= d:
        raise ValueError(f"fit_whitening: rank {rank} must be in [1, {d}]")
    mu = x.mean(0)
    e, V = np.linalg.eigh(np.cov(x - mu, rowvar=False))
    e, V = e[::-1][:r], V[:, ::-1][:, :r]
    e = np.maximum(e, 0.0) + shrink * max(float(np.mean(np.maximum(e, 0.0))), 1e-30)
    P = (V / np.sqrt(e)).T
    return mu.astype(np.float32), P.astype(np.float32)


def whiten_keys(keys, mu, P) -> np.ndarray:
    """Gate keys: P (k - mu) / |P (k - mu)| per row (float64 on the host): keys [N,D] -> [N,R] f32."""
    k = _as_rows(keys, "gate keys").astype(np.float64)
    z = (k - np.asarray(mu, np.float64)) @ np.asarray(P, np.float64).T
    return (z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-30)).astype(np.float32)


def make_gate(K, mu, P, tau: float, on: bool = True, n_slots=None, tau_seq: float = np.inf,
              token: Optional[bool] = None) -> Gate:
    """A `Gate` from whitened keys K [C,R] (`whiten_keys`, zero rows for free slots), mu, P;
    n_slots [C] int (None: zeros, i.e. no fact latches) and tau_seq (+inf: the latch never fires).
    token: whether it has a per-token gate (None: tau < `TAU_OFF`)."""
    if not np.isfinite(tau):
        raise ValueError(f"gate threshold tau must be finite, got {tau}")
    if np.isnan(tau_seq):
        raise ValueError("gate sequence threshold tau_seq must not be NaN")
    C = np.shape(K)[0]
    ns = np.zeros(C, np.int32) if n_slots is None else np.asarray(n_slots)
    if ns.shape != (C,) or (ns.size and (ns.min() < 0 or np.any(ns != np.round(ns)))):
        raise ValueError(f"gate n_slots must be {C} integers >= 0, got shape {ns.shape}")
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    token = bool(tau < TAU_OFF) if token is None else bool(token)
    return Gate(f32(K), f32(mu), f32(P), f32(tau), jnp.asarray(bool(on)), jnp.asarray(ns, jnp.int32),
                f32(tau_seq), token=token)


def with_gate(mem: EditMemory, tau: Optional[float] = None, on: Optional[bool] = None,
              tau_seq: Optional[float] = None, token: Optional[bool] = None) -> EditMemory:
    """The same memory with another threshold, sequence threshold (+inf: no latch) and/or the gate
    switched on/off (data: no recompile). token: add (True) or drop (False) the per-token gate
    (`Gate.token`; structure, so the next forward compiles once more); None keeps it, except that a
    tau < `TAU_OFF` given to a gate without one adds it. On a gate that has one, every tau is data."""
    if mem.gate is None:
        raise ValueError("with_gate: this memory has no gate (build it with gate_keys=...)")
    g = mem.gate
    if tau_seq is not None and g.n_slots is None:
        raise ValueError("with_gate: this gate has no n_slots, so no sequence latch")
    if tau is not None and not np.isfinite(tau):
        raise ValueError(f"with_gate: tau must be finite, got {tau}")
    if token is None:
        token = g.token or (tau is not None and tau < TAU_OFF)
    g = dataclasses.replace(g, token=bool(token), tau=g.tau if tau is None else jnp.asarray(tau, jnp.float32),
                            on=g.on if on is None else jnp.asarray(bool(on)),
                            tau_seq=g.tau_seq if tau_seq is None else jnp.asarray(tau_seq, jnp.float32))
    return dataclasses.replace(mem, gate=g)


@jax.jit
def _scores(gate: Gate, active, h):
    return gate.score(h, active)


def gate_scores(mem: EditMemory, h, chunk: int = 8192) -> np.ndarray:
    """Whitened-cosine gate score of each residual: h [N,D] -> [N] float32 (max over active facts)."""
    if mem.gate is None:
        raise ValueError("gate_scores: this memory has no gate")
    h = _as_rows(h, "residuals", mem.d_model)
    return np.concatenate([np.asarray(_scores(mem.gate, mem.active, jnp.asarray(h[i:i + chunk])))
                           for i in range(0, h.shape[0], chunk)]) if h.shape[0] else np.zeros(0, np.float32)


@jax.jit
def _seq_scores(gate: Gate, active, h, slots):
    return gate.sequence_score(h, slots, active)


def sequence_scores(mem: EditMemory, h, slots, chunk: int = 64) -> np.ndarray:
    """Sequence-latch score of probe rows: h [N,T,D] residuals of prompts with the answer fully
    masked, slots [N,T] bool (the masked answer slots) -> [N] f32 (`Gate.sequence_score`)."""
    if mem.gate is None or mem.gate.n_slots is None:
        raise ValueError("sequence_scores: this memory has no gate with n_slots")
    h, slots = np.asarray(h, np.float32), np.asarray(slots, bool)
    if h.ndim != 3 or slots.shape != h.shape[:2] or h.shape[2] != mem.d_model:
        raise ValueError(f"sequence_scores: h must be [N,T,{mem.d_model}] and slots [N,T]; got "
                         f"{h.shape} and {slots.shape}")
    return np.concatenate([np.asarray(_seq_scores(mem.gate, mem.active, jnp.asarray(h[i:i + chunk]),
                                                  jnp.asarray(slots[i:i + chunk])))
                           for i in range(0, h.shape[0], chunk)]) if h.shape[0] else np.zeros(0, np.float32)


def calibrate_tau_seq(mem: EditMemory, h, slots, percentile: float = 100.0, margin: float = 0.02) -> float:
    """Sequence threshold: the `percentile` of held-out retain probe rows' sequence scores (h [N,T,D],
    slots [N,T], as `sequence_scores`) plus `margin`, so (at 100) no held-out row latches."""
    if not 0 < percentile <= 100:
        raise ValueError(f"calibrate_tau_seq: percentile must be in (0, 100], got {percentile}")
    s = sequence_scores(mem, h, slots)
    s = s[np.isfinite(s)]
    return float(np.percentile(s, percentile) + margin) if s.size else float(np.inf)


def calibrate_tau(mem: EditMemory, h, percentile: float = 99.9) -> float:
    """The threshold that `percentile` % of held-out retain residuals h [N,D] score at or below."""
    if not 0 < percentile <= 100:
        raise ValueError(f"calibrate_tau: percentile must be in (0, 100], got {percentile}")
    return float(np.percentile(gate_scores(mem, h), percentile))


# --------------------------------------------------------------------------------------------
# build / empty / insert / remove
# --------------------------------------------------------------------------------------------

def _gate_for(K, whitening, tau, gate_on, n_slots=None) -> Gate:
    mu, P = whitening
    return make_gate(K, mu, P, tau, gate_on, n_slots=n_slots)


def build(u, v_o, v_t, lam: float, alpha: float, q: int, layer: int, module: Union[int, str],
          step: int = -1, capacity: Optional[int] = None, fingerprint: str = "", gate_keys=None,
          whitening: Optional[tuple] = None, tau: float = 0.5, gate_on: bool = True,
          gate_n_slots=None) -> EditMemory:
    """Eq. 11: an `EditMemory` from captured keys and values.

    u, v_o, v_t [N,D] (Eqs. 6-8); D = v_t - v_o (Eq. 9). Facts fill slots 0..N-1 of a memory of
    `capacity` rows (default N; must be >= N). lam > 0 is the ridge term, alpha the edit scale,
    q the TopQ sparsity (0 = dense), (layer, module, step) the coordinate (step -1 = every step).
    gate_keys [N,D] (raw slot keys, `capture.capture_slot_keys`) with whitening = (mu [D], P [R,D])
    (`fit_whitening`) give a gated memory with threshold tau (`calibrate_tau`); None: Eq. 12.
    gate_n_slots [N] int: the answer slots each gate key was averaged over (the sequence latch's
    span; None: no fact latches); the latch threshold starts at +inf (`calibrate_tau_seq`).
    """
    _check_hparams(lam, alpha, q)
    u = _as_rows(u, "u")
    if u.shape[0] == 0:
        raise ValueError("build: the fact set is empty (u has 0 rows); use `empty` for a memory "
                         "to stream facts into")
    v_o, v_t = _as_rows(v_o, "v_o", u.shape[1]), _as_rows(v_t, "v_t", u.shape[1])
    if not (u.shape == v_o.shape == v_t.shape):
        raise ValueError(f"build: u {u.shape}, v_o {v_o.shape}, v_t {v_t.shape} must have one shape")
    if (gate_keys is None) != (whitening is None):
        raise ValueError("build: a gate needs both gate_keys and whitening (mu, P)")
    n, d = u.shape
    cap = n if capacity is None else int(capacity)
    if cap < n:
        raise ValueError(f"build: capacity {cap} is smaller than the number of facts {n}")
    U = np.zeros((cap, d), np.float32)
    Dm = np.zeros((cap, d), np.float32)
    U[:n], Dm[:n] = u, v_t - v_o
    active = np.zeros(cap, bool)
    active[:n] = True
    gate = None
    if gate_keys is not None:
        k = _as_rows(gate_keys, "gate_keys", d)
        if k.shape[0] != n:
            raise ValueError(f"build: {k.shape[0]} gate keys for {n} facts")
        Kw = whiten_keys(k, *whitening)
        K = np.zeros((cap, Kw.shape[1]), np.float32)
        K[:n] = Kw
        ns = np.zeros(cap, np.int32)
        if gate_n_slots is not None:
            g_ns = np.asarray(gate_n_slots).reshape(-1)
            if g_ns.shape != (n,):
                raise ValueError(f"build: {g_ns.shape[0]} gate_n_slots for {n} facts")
            ns[:n] = g_ns
        gate = _gate_for(K, whitening, tau, gate_on, ns)
    return _assemble(U, Dm, active, lam, alpha, q, layer, module, step, fingerprint, gate)


# --------------------------------------------------------------------------------------------
# Small fact sets: the same float64 solve on the device
# --------------------------------------------------------------------------------------------

# Sets of up to this many facts may be built on the device (`build_on_device`). At a few facts the
# host round trip (read the keys back, solve, send the memory over) is a large share of an install,
# while a device solve queued behind the capture runs right after it; the capture compiles once per
# fact count up to its chunk (16) anyway, and so does this solve.
DEVICE_SOLVE_MAX = 16
DEFAULT_LAM_REL = 0.1


def default_lam(u, rel: float = DEFAULT_LAM_REL) -> float:
    """lambda = rel * mean ||u_z||^2 (u [N,D]): the ridge term on the scale of the keys' Gram matrix."""
    return float(rel * np.mean(np.sum(np.asarray(u, np.float64) ** 2, -1)))


def _enable_x64():
    # float64 for one call only (a context manager; older JAX has it under jax.experimental)
    on = getattr(jax, "enable_x64", None)
    if on is None:
        from jax.experimental import enable_x64 as on
        return on()
    return on(True)


@functools.partial(jax.jit, static_argnames=("capacity",))
def _solve_on_device(uvv, scalars, capacity: int):
    """`build`'s solve and assembly without a gate, in float64 on the device (traced and called
    under `_enable_x64`). uvv [N,3,D] f32 (u, v_o, v_t per fact); scalars [5] f64 = (lam, rel,
    alpha, q, step), lam <= 0 meaning `default_lam` with rel. Returns the `EditMemory` arrays at
    `capacity` rows."""
    f64 = jnp.float64
    u, v_o, v_t = uvv[:, 0], uvv[:, 1], uvv[:, 2]
    n, d = u.shape
    lam_in, rel, alpha, q, step = (scalars[i] for i in range(5))
    u64 = u.astype(f64)
    lam = jnp.where(lam_in > 0, lam_in, rel * jnp.mean(jnp.sum(u64 * u64, -1)))
    K = u64 @ u64.T + lam * jnp.eye(n, dtype=f64)
    Ga = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(K), True), jnp.eye(n, dtype=f64))
    G = (jnp.eye(capacity, dtype=f64) / lam).at[:n, :n].set(0.5 * (Ga + Ga.T)).astype(jnp.float32)
    U = jnp.zeros((capacity, d), jnp.float32).at[:n].set(u)
    Dm = jnp.zeros((capacity, d), jnp.float32).at[:n].set(v_t - v_o)
    W = (G.astype(f64) @ U.astype(f64)).astype(jnp.float32)
    return (U, Dm, G, W, jnp.arange(capacity) < n, alpha.astype(jnp.float32), q.astype(jnp.int32),
            lam.astype(jnp.float32), step.astype(jnp.int32))


def build_on_device(uvv, lam: Optional[float], alpha: float, q: int, layer: int, module: Union[int, str],
                    step: int = -1, capacity: Optional[int] = None, fingerprint: str = "") -> EditMemory:
    """`build` without a gate for keys and values still on the device: the same Eq. 11 float64
    solve and assembly, run there (one jitted call; returns as soon as it is queued).

    uvv [N,3,D] float32 jax array: u, v_o, v_t per fact, as `capture.capture_on_device` leaves
    them; 1 <= N <= `DEVICE_SOLVE_MAX`. lam None = `default_lam` of u (computed on the device); the
    rest as `build`. Queued right behind a capture, the install needs no host round trip. The
    arrays equal `build`'s up to float64 summation order (so to the last bit of float32 in practice)."""
    _check_hparams(1.0 if lam is None else lam, alpha, q)
    shape = tuple(np.shape(uvv))
    if len(shape) != 3 or shape[1] != 3:
        raise ValueError(f"build_on_device: uvv must be [N, 3, D] (u, v_o, v_t per fact), got shape {shape}")
    n = shape[0]
    if not 1 <= n <= DEVICE_SOLVE_MAX:
        raise ValueError(f"build_on_device: {n} facts; the device solve takes 1..{DEVICE_SOLVE_MAX} "
                         f"(use `build` for more)")
    cap = n if capacity is None else int(capacity)
    if cap < n:
        raise ValueError(f"build_on_device: capacity {cap} is smaller than the number of facts {n}")
    scalars = np.asarray([0.0 if lam is None else lam, DEFAULT_LAM_REL, alpha, q, step], np.float64)
    with _enable_x64():
        arrays = _solve_on_device(uvv, scalars, capacity=cap)
    return EditMemory(*arrays, layer=_layer_id(layer), module=module_id(module), fingerprint=str(fingerprint))


def empty(d_model: int, capacity: int, lam: float, alpha: float, q: int, layer: int,
          module: Union[int, str], step: int = -1, fingerprint: str = "",
          whitening: Optional[tuple] = None, tau: float = 0.5, gate_on: bool = True) -> EditMemory:
    """A memory with no active facts (its delta is exactly 0), to `insert` facts into; with
    `whitening` = (mu, P) it is gated (insert then needs each fact's gate key)."""
    _check_hparams(lam, alpha, q)
    if capacity < 1 or d_model < 1:
        raise ValueError(f"empty: capacity={capacity} and d_model={d_model} must be >= 1")
    z = np.zeros((capacity, d_model), np.float32)
    gate = None
    if whitening is not None:
        gate = _gate_for(np.zeros((capacity, np.shape(whitening[1])[0]), np.float32), whitening, tau, gate_on)
    return _assemble(z, z, np.zeros(capacity, bool), lam, alpha, q, layer, module, step, fingerprint, gate)


def _host(mem: EditMemory):
    K = None if mem.gate is None else np.array(mem.gate.K, np.float32)
    ns = None
    if mem.gate is not None:
        ns = (np.zeros(K.shape[0], np.int32) if mem.gate.n_slots is None
              else np.array(mem.gate.n_slots, np.int32))
    return (np.array(mem.U, np.float32), np.array(mem.Dm, np.float32), np.array(mem.active, bool), K, ns)


def _rebuild(mem: EditMemory, U, Dm, active, K, ns=None) -> EditMemory:
    gate = None
    if mem.gate is not None:
        tau_seq = mem.gate.tau_seq if mem.gate.tau_seq is not None else jnp.asarray(np.inf, jnp.float32)
        gate = dataclasses.replace(mem.gate, K=jnp.asarray(K), n_slots=jnp.asarray(ns, jnp.int32),
                                   tau_seq=tau_seq, latch=None)
    return _assemble(U, Dm, active, float(mem.lam), float(mem.alpha), int(mem.q), int(mem.layer),
                     mem.module, int(mem.step), mem.fingerprint, gate)


def insert(mem: EditMemory, u, d, gate_key=None, n_slots=None) -> EditMemory:
    """Stream facts in: u, d [D] (one fact) or [k,D]; gate_key (same shape, raw slot keys) is
    required for a gated memory and whitened with the memory's own (mu, P); n_slots (int or [k])
    the answer slots each key was averaged over (None: these facts never latch). Each fact goes to the
    lowest free slot; when the memory is full its capacity doubles (a new shape, so the next
    forward compiles again). G is recomputed from all active rows, so the result equals `build`
    on the same slots."""
    U, Dm, active, K, ns = _host(mem)
    u, d = _as_rows(u, "u", mem.d_model), _as_rows(d, "d", mem.d_model)
    new_ns = np.zeros(u.shape[0], np.int32) if n_slots is None else np.asarray(n_slots, np.int32).reshape(-1)
    if new_ns.shape != (u.shape[0],) or np.any(new_ns < 0):
        raise ValueError(f"insert: n_slots must be {u.shape[0]} integers >= 0, got {n_slots!r}")
    if u.shape != d.shape:
        raise ValueError(f"insert: u {u.shape} and d {d.shape} must have one shape")
    if (mem.gate is None) != (gate_key is None):
        raise ValueError("insert: a gated memory needs gate_key for every fact, an ungated one none")
    if gate_key is not None:
        gk = _as_rows(gate_key, "gate_key", mem.d_model)
        if gk.shape != u.shape:
            raise ValueError(f"insert: gate_key {gk.shape} and u {u.shape} must have one shape")
        kw = whiten_keys(gk, np.asarray(mem.gate.mu), np.asarray(mem.gate.P))
    need = int(active.sum()) + u.shape[0]
    cap = U.shape[0]
    while cap < need:
        cap *= 2
    if cap != U.shape[0]:
        grow = cap - U.shape[0]
        U = np.concatenate([U, np.zeros((grow, U.shape[1]), np.float32)])
        Dm = np.concatenate([Dm, np.zeros((grow, Dm.shape[1]), np.float32)])
        active = np.concatenate([active, np.zeros(grow, bool)])
        if K is not None:
            K = np.concatenate([K, np.zeros((grow, K.shape[1]), np.float32)])
            ns = np.concatenate([ns, np.zeros(grow, np.int32)])
    slots = np.flatnonzero(~active)[: u.shape[0]]
    U[slots], Dm[slots], active[slots] = u, d, True
    if K is not None:
        K[slots], ns[slots] = kw, new_ns
    return _rebuild(mem, U, Dm, active, K, ns)


def remove(mem: EditMemory, index: Union[int, Sequence[int]]) -> EditMemory:
    """Remove the fact(s) in slot(s) `index` exactly: rows (and gate keys) zeroed, marked
    inactive, G recomputed from the remaining active rows (capacity unchanged)."""
    U, Dm, active, K, ns = _host(mem)
    idx = np.atleast_1d(np.asarray(index))
    if idx.dtype.kind not in "iu":
        raise ValueError(f"remove: slot indices must be integers, got {index!r}")
    bad = [int(i) for i in idx if not (0 <= i < U.shape[0]) or not active[i]]
    if bad:
        raise ValueError(f"remove: slot(s) {bad} are not active facts of this memory "
                         f"(capacity {U.shape[0]}, active slots {np.flatnonzero(active).tolist()})")
    U[idx], Dm[idx], active[idx] = 0.0, 0.0, False
    if K is not None:
        K[idx], ns[idx] = 0.0, 0
    return _rebuild(mem, U, Dm, active, K, ns)


def n_facts(mem: EditMemory) -> int:
    """Number of active facts."""
    return int(np.asarray(mem.active).sum())
