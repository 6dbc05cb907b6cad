"""Pallas Mosaic GPU grouped GEMMs on the padded block layout of kernels/grouped_matmul.py: every block of
ROWS = 64 rows belongs to one group (its rows padded per group to a block multiple), so a block is an
ordinary 64-row GEMM against its group's weight matrix.

* `block_gemm`: y[block] = x[block] @ B[group(block)], B [E, K, N] (or, with `b_transposed`, stored
  [E, N, K] and read transposed: the dx of the backward). Program (row block m, column tile n): a producer
  warpgroup streams the x and B tiles of each 64-wide K step by TMA into a `stages`-deep ring, the
  consumer warpgroup accumulates by wgmma in float32 registers and stores its [64, BN] tile. Blocks past
  the used ones (no group's rows) store zeros without reading anything, so the work follows the rows that
  exist, and each block reads its group's weights once (decode: each active expert's weights once per
  row block).
* `group_gemm_t`: dB[g] = sum over g's blocks of x[block]^T @ dy[block] (the weight gradient). Program
  (group g, K tile, N tile) loops over its group's blocks, streaming x^T (a transposed copy in memory, so
  wgmma reads plain tiles) and dy; an empty group stores zeros.

Inputs are bf16/fp16 with K and N multiples of 64; accumulation is float32.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from kernels._mgpu import mm, produce, smem, write_back

ROWS = 64  # rows per block: the wgmma M dimension
STEP = 64  # contraction per pipeline step


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_n: int = 128  # output columns per program (64 when N is not a multiple of 128)
    stages: int = 4


def supported(x, w) -> str | None:
    """Why the kernels cannot take x [M, K] and w [E, K, N], or None when they can."""
    if x.dtype not in (jnp.bfloat16, jnp.float16) or w.dtype != x.dtype:
        return f"they take bf16/fp16 x and w of one dtype, got {x.dtype} and {w.dtype}"
    K, N = w.shape[1], w.shape[2]
    if K % STEP or N % STEP:
        return f"they take K and N multiples of {STEP}, got K={K}, N={N}"
    return None


def _block_n(n: int, config: GemmConfig) -> int:
    return config.block_n if n % config.block_n == 0 else STEP


def block_gemm(x_rows, block_group, used_blocks, b, *, b_transposed: bool = False,
               config: GemmConfig = GemmConfig(), interpret=False):
    """x_rows [NB * 64, Kc] (block-padded rows), block_group [NB] int32, used_blocks [] int32 (blocks from
    this one on hold no rows), b [E, Kc, Nc] (or [E, Nc, Kc] with b_transposed) -> [NB * 64, Nc] in x's
    dtype (zeros in unused blocks)."""
    import jax
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from kernels import _compat

    M, Kc = x_rows.shape
    Nc = b.shape[1] if b_transposed else b.shape[2]
    if M % ROWS or Kc % STEP or Nc % STEP:
        raise ValueError(f"block_gemm: rows {M} must be a multiple of {ROWS}, K {Kc} and N {Nc} of {STEP}")
    in_smem_t = _compat.smem_transpose(interpret)
    if b_transposed and not in_smem_t:  # jax 0.10's interpreter: read a transposed copy instead
        b, b_transposed = jnp.swapaxes(b, 1, 2), False
    BN, stages = _block_n(Nc, config), config.stages
    n_steps = Kc // STEP
    dtype = x_rows.dtype
    used = jnp.asarray(used_blocks, jnp.int32).reshape(1)

    def kernel(x_ref, bg_ref, used_ref, b_ref, y_ref, scoped):
        m, n, wg = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("wg")
        (x_smem, b_smem, y_smem), (full, free) = scoped
        steps = jnp.where(m < used_ref[0], n_steps, 0)

        @pl.when(wg == 0)
        def _consumer():
            def body(i, acc):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(full.at[slot])
                rhs = _compat.transposed(b_smem.at[slot]) if b_transposed else b_smem.at[slot]
                acc = acc + mm(x_smem.at[slot], rhs, (ROWS, BN))
                plgpu.barrier_arrive(free.at[slot])
                return acc

            acc = plgpu.layout_cast(jnp.zeros((ROWS, BN), jnp.float32), plgpu.Layout.WGMMA)
            acc = lax.fori_loop(0, steps, body, acc)
            y_smem[...] = acc.astype(dtype)
            write_back((y_smem, y_ref.at[pl.ds(m * ROWS, ROWS), pl.ds(n * BN, BN)]))

        @pl.when(wg == 1)
        def _producer():
            g = bg_ref[m]

            def load(i, slot):
                k = pl.ds(i * STEP, STEP)
                plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(m * ROWS, ROWS), k], x_smem.at[slot], full.at[slot])
                src = b_ref.at[g, pl.ds(n * BN, BN), k] if b_transposed else b_ref.at[g, k, pl.ds(n * BN, BN)]
                plgpu.copy_gmem_to_smem(src, b_smem.at[slot], full.at[slot])

            produce(steps, n_steps, stages, load, free)

    def entry(*refs):
        b_tile = (stages, BN, STEP) if b_transposed else (stages, STEP, BN)
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            (smem((stages, ROWS, STEP), dtype), smem(b_tile, dtype), smem((ROWS, BN), dtype)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_arrivals=1, num_barriers=stages)),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry, out_type=jax.ShapeDtypeStruct((M, Nc), dtype), grid=(M // ROWS, Nc // BN), grid_names=("m", "n"),
        num_threads=2, thread_name="wg", interpret=_compat.interpret_params() if interpret else False,
    )(x_rows, block_group.astype(jnp.int32), used, b)


def group_gemm_t(x_rows, dy_rows, first_block, num_blocks, num_groups: int, *,
                 config: GemmConfig = GemmConfig(), interpret=False):
    """x_rows [NB * 64, K], dy_rows [NB * 64, N] (block-padded, zeros in padding), first_block / num_blocks
    [E] int32 (each group's blocks) -> [E, K, N] float32: sum over each group's blocks of x^T dy."""
    import jax
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from kernels import _compat

    M, K = x_rows.shape
    N = dy_rows.shape[1]
    if M % ROWS or K % STEP or N % STEP:
        raise ValueError(f"group_gemm_t: rows {M} must be a multiple of {ROWS}, K {K} and N {N} of {STEP}")
    BN, stages = _block_n(N, config), config.stages
    max_steps = M // ROWS
    dtype = x_rows.dtype
    xT = x_rows.T  # [K, M]: wgmma reads x^T tiles as plain [64, 64] tiles

    def kernel(xT_ref, dy_ref, first_ref, count_ref, o_ref, scoped):
        g, kt, n, wg = lax.axis_index("g"), lax.axis_index("k"), lax.axis_index("n"), lax.axis_index("wg")
        (x_smem, dy_smem, o_smem), (full, free) = scoped
        steps = count_ref[g]
        first = first_ref[g]

        @pl.when(wg == 0)
        def _consumer():
            def body(i, acc):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(full.at[slot])
                acc = acc + mm(x_smem.at[slot], dy_smem.at[slot], (STEP, BN))
                plgpu.barrier_arrive(free.at[slot])
                return acc

            acc = plgpu.layout_cast(jnp.zeros((STEP, BN), jnp.float32), plgpu.Layout.WGMMA)
            o_smem[...] = lax.fori_loop(0, steps, body, acc)
            write_back((o_smem, o_ref.at[g, pl.ds(kt * STEP, STEP), pl.ds(n * BN, BN)]))

        @pl.when(wg == 1)
        def _producer():
            def load(i, slot):
                rows = pl.ds((first + i) * ROWS, ROWS)
                plgpu.copy_gmem_to_smem(xT_ref.at[pl.ds(kt * STEP, STEP), rows], x_smem.at[slot], full.at[slot])
                plgpu.copy_gmem_to_smem(dy_ref.at[rows, pl.ds(n * BN, BN)], dy_smem.at[slot], full.at[slot])

            produce(steps, max_steps, stages, load, free)

    def entry(*refs):
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            (smem((stages, STEP, ROWS), dtype), smem((stages, ROWS, BN), dtype), smem((STEP, BN), jnp.float32)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_arrivals=1, num_barriers=stages)),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry, out_type=jax.ShapeDtypeStruct((num_groups, K, N), jnp.float32),
        grid=(num_groups, K // STEP, N // BN), grid_names=("g", "k", "n"), num_threads=2, thread_name="wg",
        interpret=_compat.interpret_params() if interpret else False,
    )(xT, dy_rows, first_block.astype(jnp.int32), num_blocks.astype(jnp.int32))
