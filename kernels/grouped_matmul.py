"""Grouped matmul for mixture-of-experts: y[i] = x[i] @ w[group(i)], rows sorted by group, at the cost of the
rows that exist.

XLA has no grouped GEMM on every backend: on CPU, `jax.lax.ragged_dot` is expanded over every group (E
times the useful FLOPs, and memory that grows with E). `impl="blocked"` (the default) is exact (no row
dropped, no capacity factor) and portable:
  * each group's rows are padded to a multiple of `block` rows, so every block of rows belongs to one
    group. The static number of blocks is ceil(M / block) + min(M, E), so the padded work is at most
    M + min(M, E) * block rows whatever the routing; `block` (see `block_size`) is at most a quarter of
    the mean group size when the weights fit in cache, which keeps the padding within ~1.25x at training
    shapes, and larger when each block must stream its group's weights from memory;
  * a scan over chunks of blocks gathers each block's weight matrix and runs one batched matmul per chunk,
    so memory holds a chunk's weight matrices at a time (at most 512 rows and 16 MiB of weights), never
    one per block or a dense [M, E, ...];
  * a custom VJP computes dx (the same grouped product with w transposed) and dw (per-block x^T dy, added
    into dw by group) with the same scans: no per-block weight copies are kept for the backward;
  * the group sizes may sum to less than M (expert parallelism: the rows routed to other devices' experts
    sort last): those rows give zeros, and chunks holding no group's rows are skipped at run time, so the
    work follows the rows that belong to a group, not M.
`impl="pallas"` runs the same layout (blocks of 64 rows) through the Pallas Mosaic GPU kernels of
kernels/grouped_matmul_mgpu.py, forward and backward (Hopper+, bf16/fp16, K and N multiples of 64;
`interpret=True` runs them in GPU interpret mode anywhere). `impl="auto"` picks them on a Hopper+ GPU once
they have passed a one-time self-check on the device (kernels._self_check), else "blocked".
`impl="ragged"` is `jax.lax.ragged_dot` (XLA's own lowering), for comparison.

Accumulation is in float32 (float64 for float64 inputs); outputs are in x's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import grouped_matmul_mgpu as mgpu
from kernels.util import cdiv, vary_alike

IMPLS = ("auto", "blocked", "pallas", "ragged")
CHUNK_ROWS = 512  # rows per scan step (a chunk of blocks) at most
CHUNK_WEIGHT_BYTES = 16 * 2**20  # and at most this many bytes of gathered weight matrices per step


CACHE_BYTES = 2 * 2**20  # a weight matrix above this is streamed from memory for every block that uses it


def block_size(num_rows: int, num_groups: int, weight_bytes: int = 0) -> int:
    """Rows per block of the blocked form, a power of two in [8, 128].

    At most a quarter of the mean group size, so padding stays within ~1.25x of the useful work (training
    shapes). With a weight matrix too large to stay in cache, each block streams its group's weights from
    memory. Fewer, larger blocks then win even at the price of more padding: time per block is about
    (compute of `block` rows) + (one read of the weights), and the sum is least near sqrt(128 x mean group
    size) rows on a CPU, as measured at Qwen3-30B-A3B's expert shape (2048 x 768 fp32, 128 experts, top 8:
    at 2,048 rows, 427 ms with blocks of 8 against 190 with 32; at 8,192 rows, 1,267 ms against 399 with
    64)."""
    mean = num_rows / max(num_groups, 1)
    b = 8
    while b < 128 and 2 * b <= mean / 4:
        b *= 2
    if weight_bytes > CACHE_BYTES:
        while b < 128 and 2 * b <= (128 * mean) ** 0.5:
            b *= 2
    return b


def _weight_bytes(w_EKN) -> int:
    return w_EKN[0].size * w_EKN.dtype.itemsize


def _acc(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _layout(group_sizes_E, num_rows: int, block: int, weight_bytes: int = 0):
    """-> (padded row of each sorted row [M] (out of range for rows past the groups' total), group of each
    block [NBp], NBp, blocks per chunk, chunks holding any group's rows (traced), blocks per group [E])."""
    E = group_sizes_E.shape[0]
    nb = cdiv(num_rows, block) + min(num_rows, E)
    chunk = max(1, min(nb, CHUNK_ROWS // block, CHUNK_WEIGHT_BYTES // max(weight_bytes, 1)))
    nbp = cdiv(nb, chunk) * chunk
    sizes = group_sizes_E.astype(jnp.int32)
    padded = (sizes + block - 1) // block * block  # [E]
    ends, pends = jnp.cumsum(sizes), jnp.cumsum(padded)
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), E - 1)  # group of each sorted row
    dest = (pends - padded)[g] + rows - (ends - sizes)[g]  # [M]
    dest = jnp.where(rows < ends[-1], dest, nbp * block)  # past the total: dropped
    starts = jnp.arange(nbp, dtype=jnp.int32) * block
    block_group = jnp.minimum(jnp.searchsorted(pends, starts, side="right"), E - 1)  # [NBp]; past the end: no rows
    used = (pends[-1] + chunk * block - 1) // (chunk * block)
    return dest, block_group.astype(jnp.int32), nbp, chunk, used, padded // block


def _blocks(a_MX, dest, nbp: int, block: int, chunk: int):
    """Rows -> [steps, chunk, block, X] in the padded layout (zeros in the padding)."""
    X = a_MX.shape[1]
    padded = jnp.zeros((nbp * block, X), a_MX.dtype).at[dest].set(a_MX, mode="drop")
    return padded.reshape(nbp // chunk, chunk, block, X)


def _product(x_MK, w_EKN, dest, bg, nbp, block, chunk, used, unroll):
    N = w_EKN.shape[-1]
    xs = (_blocks(x_MK, dest, nbp, block, chunk), bg.reshape(nbp // chunk, chunk), jnp.arange(nbp // chunk))

    def step(_, a):
        x_CBK, g_C, i = a

        def compute():
            y = jnp.einsum("CBK,CKN->CBN", x_CBK, w_EKN[g_C], preferred_element_type=_acc(x_MK.dtype))
            return y.astype(x_MK.dtype)

        def skip():  # zeros by an empty contraction: typed like compute() under shard_map (same varying axes)
            return jnp.einsum("CBK,CKN->CBN", x_CBK[..., :0], w_EKN[:, :0][g_C]).astype(x_MK.dtype)

        return None, jax.lax.cond(i < used, compute, skip)

    _, y = jax.lax.scan(step, None, xs, unroll=nbp // chunk if unroll else 1)
    return y.reshape(nbp * block, N).at[dest].get(mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked(x_MK, w_EKN, group_sizes_E, block, unroll):
    return _blocked_fwd(x_MK, w_EKN, group_sizes_E, block, unroll)[0]


def _blocked_fwd(x_MK, w_EKN, group_sizes_E, block, unroll):
    dest, bg, nbp, chunk, used, _ = _layout(group_sizes_E, x_MK.shape[0], block, _weight_bytes(w_EKN))
    return _product(x_MK, w_EKN, dest, bg, nbp, block, chunk, used, unroll), (x_MK, w_EKN, group_sizes_E)


def _blocked_bwd(block, unroll, res, dy_MN):
    x_MK, w_EKN, group_sizes_E = res
    E, K, N = w_EKN.shape
    dest, bg, nbp, chunk, used, _ = _layout(group_sizes_E, x_MK.shape[0], block, _weight_bytes(w_EKN))
    dx = _product(dy_MN.astype(x_MK.dtype), jnp.swapaxes(w_EKN, 1, 2), dest, bg, nbp, block, chunk, used, unroll)
    xs = (_blocks(x_MK, dest, nbp, block, chunk), _blocks(dy_MN.astype(x_MK.dtype), dest, nbp, block, chunk),
          bg.reshape(nbp // chunk, chunk), jnp.arange(nbp // chunk))

    def step(dw, a):
        x_CBK, dy_CBN, g_C, i = a

        def add():
            part = jnp.einsum("CBK,CBN->CKN", x_CBK, dy_CBN, preferred_element_type=_acc(x_MK.dtype))
            return dw.at[g_C].add(part)

        return jax.lax.cond(i < used, add, lambda: dw), None

    # zeros typed like the per-chunk products (under shard_map: the same varying axes), by an empty contraction
    dw0 = jnp.broadcast_to(jnp.einsum("MK,MN->KN", x_MK[:0], dy_MN[:0].astype(x_MK.dtype),
                                      preferred_element_type=_acc(x_MK.dtype)), (E, K, N))
    dw, _ = jax.lax.scan(step, dw0, xs, unroll=nbp // chunk if unroll else 1)
    return dx, dw.astype(w_EKN.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _pallas_layout(group_sizes_E, num_rows: int):
    """The 64-row block layout for the Pallas kernels -> (dest, block group, NB, used blocks, each group's
    first block, each group's block count)."""
    dest, bg, nbp, _, _, count = _layout(group_sizes_E, num_rows, mgpu.ROWS)
    return dest, bg, nbp, jnp.sum(count), jnp.cumsum(count) - count, count


def _rows(a_MX, dest, nbp: int):
    return _blocks(a_MX, dest, nbp, mgpu.ROWS, 1).reshape(nbp * mgpu.ROWS, a_MX.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pallas(x_MK, w_EKN, group_sizes_E, interpret):
    return _pallas_fwd(x_MK, w_EKN, group_sizes_E, interpret)[0]


def _pallas_fwd(x_MK, w_EKN, group_sizes_E, interpret):
    dest, bg, nbp, used, _, _ = _pallas_layout(group_sizes_E, x_MK.shape[0])
    y = mgpu.block_gemm(_rows(x_MK, dest, nbp), bg, used, w_EKN, interpret=interpret)
    return y.at[dest].get(mode="fill", fill_value=0), (x_MK, w_EKN, group_sizes_E)


def _pallas_bwd(interpret, res, dy_MN):
    x_MK, w_EKN, group_sizes_E = res
    dest, bg, nbp, used, first, count = _pallas_layout(group_sizes_E, x_MK.shape[0])
    dy = _rows(dy_MN.astype(x_MK.dtype), dest, nbp)
    dx = mgpu.block_gemm(dy, bg, used, w_EKN, b_transposed=True, interpret=interpret)
    dw = mgpu.group_gemm_t(_rows(x_MK, dest, nbp), dy, first, count, w_EKN.shape[0], interpret=interpret)
    return dx.at[dest].get(mode="fill", fill_value=0), dw.astype(w_EKN.dtype), None


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def grouped_matmul_impl(impl: str, x_MK, w_EKN, *, interpret: bool = False) -> str:
    """The implementation `grouped_matmul(x, w, ..., impl=impl)` runs ("blocked", "pallas" or "ragged")."""
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    import kernels

    if mgpu.supported(x_MK, w_EKN) is None and (interpret or (
            kernels._hopper_or_newer() and kernels._self_check("grouped", x_MK.dtype.name, 0))):
        return "pallas"
    return "blocked"


def grouped_matmul(x_MK: jax.Array, w_EKN: jax.Array, group_sizes_E: jax.Array, *, impl: str = "auto",
                   block: int | None = None, unroll: bool = False, interpret: bool = False) -> jax.Array:
    """x [M, K] with rows sorted by group, w [E, K, N], group sizes [E] int (summing to at most M; rows past
    the sum give zeros) -> [M, N].

    `block`: rows per block of "blocked" (default: from M and E). `unroll` unrolls its block loop, so that
    XLA's cost analysis (which counts a loop body once) sees every block; it changes nothing else.
    `interpret`: run the Pallas kernels in GPU interpret mode (any machine)."""
    impl = grouped_matmul_impl(impl, x_MK, w_EKN, interpret=interpret)
    M, E = x_MK.shape[0], w_EKN.shape[0]
    if impl == "ragged":
        return jax.lax.ragged_dot(x_MK, w_EKN, group_sizes_E.astype(jnp.int32),
                                  preferred_element_type=_acc(x_MK.dtype)).astype(x_MK.dtype)
    if M == 0:
        return jnp.zeros((0, w_EKN.shape[-1]), x_MK.dtype)
    x_MK, w_EKN = vary_alike(x_MK, w_EKN)
    if impl == "pallas":
        why = mgpu.supported(x_MK, w_EKN)
        if why:
            raise ValueError(f"the Pallas grouped matmul cannot run: {why}")
        return _pallas(x_MK, w_EKN, group_sizes_E, interpret)
    block = block or block_size(M, E, _weight_bytes(w_EKN))
    return _blocked(x_MK, w_EKN, group_sizes_E, block, unroll)
