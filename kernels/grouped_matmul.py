"""Grouped matmul for mixture-of-experts: y[i] = x[i] @ w[group(i)], rows sorted by group, at the cost of the
rows that exist.

XLA has no grouped GEMM on every backend: on CPU, `jax.lax.ragged_dot` is expanded over every group (E
times the useful FLOPs, and memory that grows with E). `impl="blocked"` (the default) is exact (no row
dropped, no capacity factor) and portable:
  * each group's rows are padded to a multiple of `block` rows, so every block of rows belongs to one
    group. The static number of blocks is ceil(M / block) + min(M, E), so the padded work is at most
    M + min(M, E) * block rows whatever the routing; `block` is at most a quarter of the mean group size
    (a power of two in [8, 128]), which keeps the padding within ~1.25x at training shapes and makes
    decode read each active group's weights about once;
  * a scan over chunks of blocks gathers each block's weight matrix and runs one batched matmul per chunk,
    so memory holds a chunk's weight matrices at a time, never one per block or a dense [M, E, ...];
  * a custom VJP computes dx (the same grouped product with w transposed) and dw (per-block x^T dy, added
    into dw by group) with the same scans: no per-block weight copies are kept for the backward.
`impl="ragged"` is `jax.lax.ragged_dot` (XLA's own lowering), for comparison.

Accumulation is in float32 (float64 for float64 inputs); outputs are in x's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.util import cdiv

IMPLS = ("auto", "blocked", "ragged")
CHUNK_ROWS = 512  # rows per scan step (a chunk of blocks)


def block_size(num_rows: int, num_groups: int) -> int:
    quarter = num_rows // max(4 * num_groups, 1)
    b = 8
    while b < 128 and 2 * b <= quarter:
        b *= 2
    return b


def _acc(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _layout(group_sizes_E, num_rows: int, block: int):
    """-> (padded row of each sorted row [M], group of each block [NBp], NBp, blocks per chunk)."""
    E = group_sizes_E.shape[0]
    nb = cdiv(num_rows, block) + min(num_rows, E)
    chunk = max(1, min(nb, CHUNK_ROWS // block))
    nbp = cdiv(nb, chunk) * chunk
    sizes = group_sizes_E.astype(jnp.int32)
    padded = (sizes + block - 1) // block * block  # [E]
    ends, pends = jnp.cumsum(sizes), jnp.cumsum(padded)
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), E - 1)  # group of each sorted row
    dest = (pends - padded)[g] + rows - (ends - sizes)[g]  # [M]
    starts = jnp.arange(nbp, dtype=jnp.int32) * block
    block_group = jnp.minimum(jnp.searchsorted(pends, starts, side="right"), E - 1)  # [NBp]; past the end: no rows
    return dest, block_group.astype(jnp.int32), nbp, chunk


def _blocks(a_MX, dest, nbp: int, block: int, chunk: int):
    """Rows -> [steps, chunk, block, X] in the padded layout (zeros in the padding)."""
    X = a_MX.shape[1]
    padded = jnp.zeros((nbp * block, X), a_MX.dtype).at[dest].set(a_MX)
    return padded.reshape(nbp // chunk, chunk, block, X)


def _product(x_MK, w_EKN, dest, bg, nbp, block, chunk, unroll):
    N = w_EKN.shape[-1]
    xs = (_blocks(x_MK, dest, nbp, block, chunk), bg.reshape(nbp // chunk, chunk))

    def step(_, a):
        x_CBK, g_C = a
        y = jnp.einsum("CBK,CKN->CBN", x_CBK, w_EKN[g_C], preferred_element_type=_acc(x_MK.dtype))
        return None, y.astype(x_MK.dtype)

    _, y = jax.lax.scan(step, None, xs, unroll=nbp // chunk if unroll else 1)
    return y.reshape(nbp * block, N)[dest]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked(x_MK, w_EKN, group_sizes_E, block, unroll):
    return _blocked_fwd(x_MK, w_EKN, group_sizes_E, block, unroll)[0]


def _blocked_fwd(x_MK, w_EKN, group_sizes_E, block, unroll):
    dest, bg, nbp, chunk = _layout(group_sizes_E, x_MK.shape[0], block)
    return _product(x_MK, w_EKN, dest, bg, nbp, block, chunk, unroll), (x_MK, w_EKN, group_sizes_E)


def _blocked_bwd(block, unroll, res, dy_MN):
    x_MK, w_EKN, group_sizes_E = res
    E, K, N = w_EKN.shape
    dest, bg, nbp, chunk = _layout(group_sizes_E, x_MK.shape[0], block)
    dx = _product(dy_MN.astype(x_MK.dtype), jnp.swapaxes(w_EKN, 1, 2), dest, bg, nbp, block, chunk, unroll)
    xs = (_blocks(x_MK, dest, nbp, block, chunk), _blocks(dy_MN.astype(x_MK.dtype), dest, nbp, block, chunk),
          bg.reshape(nbp // chunk, chunk))

    def step(dw, a):
        x_CBK, dy_CBN, g_C = a
        part = jnp.einsum("CBK,CBN->CKN", x_CBK, dy_CBN, preferred_element_type=_acc(x_MK.dtype))
        return dw.at[g_C].add(part), None

    dw, _ = jax.lax.scan(step, jnp.zeros((E, K, N), _acc(x_MK.dtype)), xs, unroll=nbp // chunk if unroll else 1)
    return dx, dw.astype(w_EKN.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def grouped_matmul(x_MK: jax.Array, w_EKN: jax.Array, group_sizes_E: jax.Array, *, impl: str = "auto",
                   block: int | None = None, unroll: bool = False) -> jax.Array:
    """x [M, K] with rows sorted by group, w [E, K, N], group sizes [E] int (summing to M) -> [M, N].

    `block`: rows per block (default: from M and E). `unroll` unrolls the block loop, so that XLA's cost
    analysis (which counts a loop body once) sees every block; it changes nothing else."""
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul: impl must be one of {IMPLS}, got {impl!r}")
    M, E = x_MK.shape[0], w_EKN.shape[0]
    if impl == "ragged":
        return jax.lax.ragged_dot(x_MK, w_EKN, group_sizes_E.astype(jnp.int32),
                                  preferred_element_type=_acc(x_MK.dtype)).astype(x_MK.dtype)
    if M == 0:
        return jnp.zeros((0, w_EKN.shape[-1]), x_MK.dtype)
    return _blocked(x_MK, w_EKN, group_sizes_E, block or block_size(M, E), unroll)
