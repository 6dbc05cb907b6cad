"""Building blocks shared by the Pallas Mosaic GPU kernels (flash attention, paged attention).

Every kernel here follows one pattern: a producer warpgroup streams tiles by TMA into a `stages`-deep
SMEM ring (a "full" barrier per slot counting the copies, a "free" barrier released by the consumer),
and consumer warpgroups run wgmma on SMEM operands with float32 accumulators in registers.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)


def smem(shape, dtype):
    """SMEM scratch with the tiling + 128-byte swizzle that TMA and wgmma expect (1D: plain)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    dtype = jnp.dtype(dtype)
    if len(shape) < 2:
        return plgpu.SMEM(shape, dtype)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 128 // dtype.itemsize)),
                                                plgpu.SwizzleTransform(128)))


def pad_to(x, axis, multiple, value=0):
    """Pad `axis` of x at the end up to a multiple of `multiple`."""
    pad = (-x.shape[axis]) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def produce(steps, max_steps: int, stages: int, load, *frees):
    """Producer warpgroup loop: fill the ring, refill each slot once released, then observe the last
    releases (interpret mode requires every barrier phase to be observed).

    load(step, slot) issues the copies of one step; a slot is refilled once the consumers have arrived on
    free[slot] for every barrier array in `frees` (one per operand the consumers release separately).
    With `load` a tuple of one function per barrier array in `frees`, each operand is refilled as soon as
    its own slot is released (K before the PV product that still reads V)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if isinstance(load, (tuple, list)):  # (the barriers each load waits for, the load)
        if len(load) != len(frees):
            raise ValueError(f"{len(load)} load functions for {len(frees)} free barrier arrays")
        groups = [((free,), f) for free, f in zip(frees, load)]
    else:
        groups = [(frees, load)]

    def load_all(step, slot):
        for _, f in groups:
            f(step, slot)

    for s0 in range(min(stages, max_steps)):  # statically in bounds; dynamically only the needed ones
        pl.when(s0 < steps)(functools.partial(load_all, s0, s0))

    @pl.loop(stages, steps)
    def _(step):
        slot = lax.rem(step, stages)
        for waits, f in groups:
            for free in waits:
                plgpu.barrier_wait(free.at[slot])
            f(step, slot)

    @pl.loop(jnp.maximum(steps - stages, 0), steps)
    def _(step):
        for free in frees:
            plgpu.barrier_wait(free.at[lax.rem(step, stages)])


def row(x_smem, layout_dim: int, shape, dim: int):
    """A 1D SMEM vector in registers, broadcast along the other dim of a WGMMA-layout [*shape] tile."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    vec = plgpu.layout_cast(x_smem[...], plgpu.Layout.WGMMA.reduce(layout_dim))
    return lax.broadcast_in_dim(vec, shape, [dim])


def mm(lhs_smem, rhs_smem, shape):
    """lhs @ rhs by wgmma into a fresh float32 accumulator [*shape]."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def f(acc_ref):
        plgpu.wgmma(acc_ref, lhs_smem, rhs_smem)
        return acc_ref[...]

    return pl.run_scoped(f, plgpu.ACC(shape, jnp.float32))


def mma_into(acc, lhs, rhs_smem, *, in_place: bool):
    """acc + lhs @ rhs by wgmma; lhs an SMEM ref or a 16-bit register array (WGMMA layout), acc float32.

    in_place: the accumulator's registers are wgmma's own (run_state over ACC.init, as on hardware);
    else a fresh accumulator is added (GPU interpret mode has no run_state; same result)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def f(acc_ref):
        plgpu.wgmma(acc_ref, lhs, rhs_smem)

    if in_place:
        return pl.run_state(f)(plgpu.ACC.init(acc))
    return acc + mm(lhs, rhs_smem, acc.shape)


def release(full, free, stages: int):
    """A consumer's step over a tile it does not need: observe the slot's fill and release it."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def skip(t, _):
        slot = lax.rem(t, stages)
        plgpu.barrier_wait(full.at[slot])
        plgpu.barrier_arrive(free.at[slot])

    return skip


def write_back(*pairs):
    """Copy finished SMEM tiles to GMEM by TMA: make the threads' SMEM writes visible to the copies, issue
    each (smem, gmem) copy, and wait for all of them."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    plgpu.commit_smem()
    for src, dst in pairs:
        plgpu.copy_smem_to_gmem(src, dst)
    plgpu.wait_smem_to_gmem(0)


def consume(rng, steps, step, skip, carry, base=0, start=0):
    """One consumer's pass over a stream of `steps` tiles (stream indices base + [start, steps)) given its
    run rng = (lo, u_lo, u_hi, hi) relative to the stream (`tile_ranges`): skip(t, None) observes and
    releases the tiles outside [lo, hi); step(t, carry, masked) processes the masked head [lo, u_lo), the
    unmasked middle [u_lo, u_hi) and the masked tail [u_hi, hi). -> the carry."""
    lo, u_lo, u_hi, hi = rng

    def at(f):
        return lambda t, c: f(base + t, c)

    lax.fori_loop(start, lo, at(skip), None)
    carry = lax.fori_loop(lo, u_lo, at(functools.partial(step, masked=True)), carry)
    carry = lax.fori_loop(u_lo, u_hi, at(functools.partial(step, masked=False)), carry)
    carry = lax.fori_loop(u_hi, hi, at(functools.partial(step, masked=True)), carry)
    lax.fori_loop(hi, steps, at(skip), None)
    return carry
