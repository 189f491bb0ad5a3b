"""Few-row matmuls on GPU: a Pallas (Triton) split-K GEMM for x [M, K] @ w [K, N] with M <= 256.

Why: a batch-1 generation step multiplies a 128-token canvas by every weight once, so its cost is
the weight read. XLA's GEMMs tile the [M, N] output into 128-wide blocks, which leaves 32 blocks
for a 4096-wide projection on a 132-SM card: most SMs wait while a few stream the weight. Here
every output block of `block_n` columns is also split over K into `split_k` programs, each reading
its own [K / split_k, block_n] slice of the weight, so that there are enough programs to keep every
SM reading; the float32 partial sums are added afterwards (a [split_k, M, N] tensor, small next to
the weight). Accumulation is float32, as in `model`'s XLA matmuls; only the summation order differs.

`matmul(x, w, impl)` is what the model calls; `small_m_matmul` is the kernel with explicit tiles
(benchmarks/probes/gemm_m128.py sweeps them).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_ROWS = 256
IMPLS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class Tiles:
    """block_n: output columns per program; split_k: programs per output block along K;
    block_k: K rows of the weight per loop iteration; num_warps, num_stages: Triton's."""

    block_n: int
    split_k: int
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 4


# (K, N) -> Tiles measured fastest for a 128-row canvas (docs/performance.md); other shapes take
# the rule in `default_tiles`
TUNED: dict = {}


def default_tiles(m: int, k: int, n: int) -> Tiles:
    """Tiles for a [m, k] x [k, n] product: TUNED's for (k, n), else 128-column blocks and K split
    until there are about two programs per SM of an H100/H200 (264), keeping >= 512 rows of K each."""
    if (k, n) in TUNED:
        return TUNED[(k, n)]
    block_n = 128 if n % 128 == 0 else 64
    split = 1
    while (n // block_n) * split < 264 and k % (2 * split * 64) == 0 and k // (2 * split) >= 512:
        split *= 2
    return Tiles(block_n=block_n, split_k=split)


def fits(m: int, k: int, n: int, tiles: Tiles) -> bool:
    """Whether the kernel takes this shape with these tiles (else `matmul` uses XLA's dot)."""
    per_program = k // tiles.split_k if k % tiles.split_k == 0 else 0
    return (m <= MAX_ROWS and n % tiles.block_n == 0 and per_program > 0
            and per_program % tiles.block_k == 0)


def _padded_rows(m: int) -> int:
    """Triton blocks are powers of two (at least 16): the row count the kernel runs on."""
    return max(16, 1 << (m - 1).bit_length())


def _split_k_kernel(x_ref, w_ref, o_ref, *, block_k: int):
    m, k_part = x_ref.shape
    block_n = w_ref.shape[1]

    def body(i, acc):
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        return acc + jnp.dot(x_ref[:, ks], w_ref[ks, :], preferred_element_type=jnp.float32)

    o_ref[...] = jax.lax.fori_loop(0, k_part // block_k, body, jnp.zeros((m, block_n), jnp.float32))


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def small_m_matmul(x: jax.Array, w: jax.Array, tiles: Tiles, interpret: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] float32 with the split-K kernel (M <= MAX_ROWS; `fits` must hold).

    interpret=True runs the kernel through Pallas' interpreter (CPU tests)."""
    m, k = x.shape
    k2, n = w.shape
    if k != k2:
        raise ValueError(f"small_m_matmul: x {x.shape} and w {w.shape} do not chain")
    if not fits(m, k, n, tiles):
        raise ValueError(f"small_m_matmul: {tiles} does not fit x {x.shape} @ w {w.shape}")
    mp = _padded_rows(m)
    xp = jnp.pad(x.astype(w.dtype), ((0, mp - m), (0, 0))) if mp != m else x.astype(w.dtype)
    s, bn = tiles.split_k, tiles.block_n
    k_part = k // s
    parts = pl.pallas_call(
        functools.partial(_split_k_kernel, block_k=tiles.block_k),
        out_shape=jax.ShapeDtypeStruct((s, mp, n), jnp.float32),
        grid=(n // bn, s),
        in_specs=[pl.BlockSpec((mp, k_part), lambda j, i: (0, i)),
                  pl.BlockSpec((k_part, bn), lambda j, i: (i, j))],
        out_specs=pl.BlockSpec((None, mp, bn), lambda j, i: (i, 0, j)),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="small_m_matmul",
    )(xp, w)
    out = parts[0] if s == 1 else jnp.sum(parts, axis=0)
    return out[:m]


def matmul(x: jax.Array, w: jax.Array, impl: str = "xla") -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] float32 (inputs in their own dtypes, float32 accumulation).

    impl "pallas" runs `small_m_matmul` when the rows of x number at most MAX_ROWS, w is bfloat16
    and the default tiles fit; everything else (and impl "xla") is XLA's dot."""
    if impl not in IMPLS:
        raise ValueError(f"matmul impl must be one of {IMPLS}, got {impl!r}")
    lead, k = x.shape[:-1], x.shape[-1]
    m = 1
    for d in lead:
        m *= int(d)
    n = w.shape[-1]
    if impl == "pallas" and w.dtype == jnp.bfloat16 and w.ndim == 2:
        tiles = default_tiles(m, k, n)
        if fits(m, k, n, tiles):
            return small_m_matmul(x.reshape(m, k), w, tiles).reshape(*lead, n)
    return jnp.einsum("...d,df->...f", x, w, preferred_element_type=jnp.float32)
