"""The Pallas Mosaic GPU backward of `kernels.flash_attention` (dQ, dK, dV from the forward's output and
log-sum-exp)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kernels._mgpu import LOG2E, consume, mm, pad_to, produce, release, row, smem, write_back
from kernels.flash_attention import _PAD_KV_SEG, _PAD_Q_SEG, FlashConfig, _visible
from kernels.tile_ranges import program_ranges, visibility

# FA2-style, split in two kernels that each run two compute warpgroups beside a producer warpgroup (24
# registers; 240 each for the compute ones), and visit only the tiles `tile_ranges` finds visible, with
# the mask built only on the masked head and tail of each run:
# * dK, dV: program (b, kv head, pair of key blocks); each compute warpgroup owns one key block and
#   accumulates its dK, dV over the query blocks that can see it, for every query head of its kv head
#   (GQA without repeated K/V). The producer streams (query head, query block) tiles of Q, dO, LSE and
#   delta once for both warpgroups;
# * dQ: program (b, head, pair of query blocks); each compute warpgroup owns one query block and
#   accumulates dQ over the key tiles it can see, streamed once for both.
# The tiles stream through `bwd_stages`-deep rings (a "full" barrier per slot counting the copies, a "free"
# barrier both compute warpgroups release). Operands wgmma needs transposed (Q, dO in dK/dV; K, V in dQ)
# are transposed views of their SMEM tiles (transposed copies from memory under jax 0.10's interpreter).
# P and dS are staged through SMEM as the left wgmma operand. Splitting recomputes S and dP in the dQ
# kernel (7 matmuls per tile pair where a fused kernel needs 5): see the README for why it is kept.


def flash_attention_backward(q, k, v, q_seg, kv_seg, out, lse, d_out, *, causal: bool, sliding_window: int | None,
                             scale: float, config: FlashConfig = FlashConfig(), interpret=False):
    """Pallas backward -> (dq, dk, dv) in the input dtype. Shapes as in flash_attention_forward."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from kernels import _compat

    B, T, N, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    BQ, BK, stages = config.bwd_block_q, config.bwd_block_kv, config.bwd_stages
    offset = S - T
    dtype = q.dtype
    delta = jnp.einsum("BTND,BTND->BNT", d_out.astype(jnp.float32), out.astype(jnp.float32))
    q, d_out = pad_to(q, 1, 2 * BQ), pad_to(d_out, 1, 2 * BQ)
    lse, delta = pad_to(lse, 2, 2 * BQ), pad_to(delta, 2, 2 * BQ)
    q_seg = pad_to(q_seg, 1, 2 * BQ, _PAD_Q_SEG).astype(jnp.int32)
    k, v = pad_to(k, 1, 2 * BK), pad_to(v, 1, 2 * BK)
    kv_seg = pad_to(kv_seg, 1, 2 * BK, _PAD_KV_SEG).astype(jnp.int32)
    Tp, Sp = q.shape[1], k.shape[1]
    n_q, n_kv = Tp // BQ, Sp // BK
    vis, full = visibility(q_seg, kv_seg, T=T, S=S, block_q=BQ, block_kv=BK, causal=causal, window=sliding_window)
    q_ranges = program_ranges(vis, full)  # [B, n_q // 2, 10]: key tiles per pair of query blocks
    kv_ranges = program_ranges(jnp.swapaxes(vis, 1, 2), jnp.swapaxes(full, 1, 2))  # query blocks per key pair
    # Operands wgmma needs transposed: views of the SMEM tiles, or (jax 0.10's interpreter) copies
    # transposed in memory: qT, doT [B, D, N, T]; kT, vT [B, D, K, S].
    tr = _compat.smem_transpose(interpret)
    if tr:
        qT = doT = kT = vT = None
    else:
        qT, doT = jnp.swapaxes(q, 1, 3), jnp.swapaxes(d_out, 1, 3)
        kT, vT = jnp.swapaxes(k, 1, 3), jnp.swapaxes(v, 1, 3)
    c = scale * LOG2E
    window = sliding_window
    ip = _compat.interpret_params() if interpret else False

    def mask_for(q_ids, k_ids, q_seg_b, kv_seg_b):
        return _visible(q_ids, k_ids, q_seg_b, kv_seg_b, causal, window)

    # ---- dK, dV: program (b, kv head, key blocks 2j, 2j + 1); the stream runs over (query head g, query
    # block i in [plo, phi)), G * (phi - plo) steps.
    def dkv_kernel(q_ref, do_ref, lse_ref, dl_ref, qs_ref, k_ref, v_ref, ks_ref, rg_ref, *refs):
        *t_refs, dk_ref, dv_ref, scoped = refs  # t_refs: (qT, doT) without the in-SMEM transpose
        b, kh, jp = lax.axis_index("b"), lax.axis_index("kh"), lax.axis_index("j")
        wg = lax.axis_index("wg")
        (k_smem, v_smem, ks_smem, q_smem, do_smem, lse_smem, dl_smem, qs_smem, p_smem, *t_smem), \
            (kv_bar, full_bar, free) = scoped
        plo, phi = rg_ref[b, jp, 0], rg_ref[b, jp, 1]
        per_head = phi - plo
        steps = G * per_head

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(240, action="increase")
            j = 2 * jp + wg
            blk = pl.ds(j * BK, BK)
            plgpu.copy_gmem_to_smem(k_ref.at[b, blk, kh], k_smem.at[wg], kv_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[b, blk, kh], v_smem.at[wg], kv_bar.at[wg])
            plgpu.copy_gmem_to_smem(ks_ref.at[b, blk], ks_smem.at[wg], kv_bar.at[wg])
            plgpu.barrier_wait(kv_bar.at[wg])
            shape = (BK, BQ)
            k_ids = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + j * BK
            q_iota = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
            kv_seg_b = row(ks_smem.at[wg], 1, shape, 0)
            rng = tuple(rg_ref[b, jp, 2 + 4 * wg + n] - plo for n in range(4))

            def body(t, carry, masked: bool):
                dk, dv = carry
                slot = lax.rem(t, stages)
                i = plo + lax.rem(t, jnp.maximum(per_head, 1))
                plgpu.barrier_wait(full_bar.at[slot])
                qT_op = _compat.transposed(q_smem.at[slot]) if tr else t_smem[0].at[slot]
                sT = mm(k_smem.at[wg], qT_op, shape)
                lse_b = row(lse_smem.at[slot], 0, shape, 1) * LOG2E
                if masked:
                    mask = mask_for(q_iota + i * BQ + offset, k_ids, row(qs_smem.at[slot], 0, shape, 1), kv_seg_b)
                    pT = jnp.where(mask, jnp.exp2(sT * c - lse_b), 0.0)
                else:
                    pT = jnp.exp2(sT * c - lse_b)
                p_smem[wg] = pT.astype(dtype)
                plgpu.commit_smem()
                dv = dv + mm(p_smem.at[wg], do_smem.at[slot], (BK, D))
                doT_op = _compat.transposed(do_smem.at[slot]) if tr else t_smem[1].at[slot]
                dpT = mm(v_smem.at[wg], doT_op, shape)
                dsT = pT * (dpT - row(dl_smem.at[slot], 0, shape, 1))
                p_smem[wg] = dsT.astype(dtype)
                plgpu.commit_smem()
                dk = dk + mm(p_smem.at[wg], q_smem.at[slot], (BK, D))
                plgpu.barrier_arrive(free.at[slot])
                return dk, dv

            skip = release(full_bar, free, stages)

            def head(g, carry):  # query head g of kv head kh: the stream's steps g * per_head + [0, per_head)
                return consume(rng, per_head, body, skip, carry, base=g * per_head)

            zeros = plgpu.layout_cast(jnp.zeros((BK, D), jnp.float32), plgpu.Layout.WGMMA)
            dk, dv = lax.fori_loop(0, G, head, (zeros, zeros))
            k_smem[wg] = (dk * scale).astype(dtype)  # the K and V tiles are done with: stage the results
            v_smem[wg] = dv.astype(dtype)
            write_back((k_smem.at[wg], dk_ref.at[b, blk, kh]), (v_smem.at[wg], dv_ref.at[b, blk, kh]))

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(24, action="decrease")

            def load(t, slot):
                per = jnp.maximum(per_head, 1)
                h = kh * G + lax.div(t, per)
                rows = pl.ds((plo + lax.rem(t, per)) * BQ, BQ)
                bar = full_bar.at[slot]
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], bar)
                plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], bar)
                for src, dst in zip(t_refs, t_smem):
                    plgpu.copy_gmem_to_smem(src.at[b, :, h, rows], dst.at[slot], bar)
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], bar)
                plgpu.copy_gmem_to_smem(dl_ref.at[b, h, rows], dl_smem.at[slot], bar)
                plgpu.copy_gmem_to_smem(qs_ref.at[b, rows], qs_smem.at[slot], bar)

            produce(steps, G * n_q, stages, load, free)

    def dkv_entry(*refs):
        n_t = 0 if tr else 2
        pl.run_scoped(
            lambda *scoped: dkv_kernel(*refs, scoped),
            (smem((2, BK, D), dtype), smem((2, BK, D), dtype), plgpu.SMEM((2, BK), jnp.int32),
             smem((stages, BQ, D), dtype), smem((stages, BQ, D), dtype), plgpu.SMEM((stages, BQ), jnp.float32),
             plgpu.SMEM((stages, BQ), jnp.float32), plgpu.SMEM((stages, BQ), jnp.int32), smem((2, BK, BQ), dtype),
             *[smem((stages, D, BQ), dtype)] * n_t),
            (plgpu.Barrier(num_arrivals=3, num_barriers=2), plgpu.Barrier(num_arrivals=5 + n_t, num_barriers=stages),
             plgpu.Barrier(num_arrivals=2, num_barriers=stages)),
            collective_axes="wg",
        )

    dk, dv = plgpu.kernel(
        dkv_entry, out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
        grid=(B, K, n_kv // 2), grid_names=("b", "kh", "j"), num_threads=3, thread_name="wg", interpret=ip,
    )(q, d_out, lse, delta, q_seg, k, v, kv_seg, kv_ranges, *(() if tr else (qT, doT)))
    if interpret:  # XLA:CPU may run independent interpreted kernels concurrently, which deadlocks the
        dk, dv, q = lax.optimization_barrier((dk, dv, q))  # interpreter: order dq after dk/dv

    # ---- dQ: program (b, head, query blocks 2i, 2i + 1); the stream runs over key tiles [plo, phi).
    def dq_kernel(q_ref, do_ref, lse_ref, dl_ref, qs_ref, k_ref, ks_ref, rg_ref, *refs):
        *t_refs, dq_ref, scoped = refs  # t_refs: (v) with the in-SMEM transpose, else (kT, vT)
        b, h, ip_ = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("i")
        wg = lax.axis_index("wg")
        smems, (q_bar, full_bar, free) = scoped
        q_smem, do_smem, lse_smem, dl_smem, qs_smem, k_smem, ks_smem, ds_smem, *t_smem = smems
        plo, phi = rg_ref[b, ip_, 0], rg_ref[b, ip_, 1]
        steps = phi - plo
        kh = lax.div(h, G)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(240, action="increase")
            i = 2 * ip_ + wg
            rows = pl.ds(i * BQ, BQ)
            for src, dst in ((q_ref.at[b, rows, h], q_smem.at[wg]), (do_ref.at[b, rows, h], do_smem.at[wg]),
                             (lse_ref.at[b, h, rows], lse_smem.at[wg]), (dl_ref.at[b, h, rows], dl_smem.at[wg]),
                             (qs_ref.at[b, rows], qs_smem.at[wg])):
                plgpu.copy_gmem_to_smem(src, dst, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            shape = (BQ, BK)
            q_ids = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + i * BQ + offset
            k_iota = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
            q_seg_b = row(qs_smem.at[wg], 1, shape, 0)
            lse_b = row(lse_smem.at[wg], 1, shape, 0) * LOG2E
            dl_b = row(dl_smem.at[wg], 1, shape, 0)
            rng = tuple(rg_ref[b, ip_, 2 + 4 * wg + n] - plo for n in range(4))

            def body(t, dq, masked: bool):
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(full_bar.at[slot])
                kT_op = _compat.transposed(k_smem.at[slot]) if tr else t_smem[0].at[slot]
                s = mm(q_smem.at[wg], kT_op, shape)
                if masked:
                    mask = mask_for(q_ids, k_iota + (plo + t) * BK, q_seg_b, row(ks_smem.at[slot], 0, shape, 1))
                    p = jnp.where(mask, jnp.exp2(s * c - lse_b), 0.0)
                else:
                    p = jnp.exp2(s * c - lse_b)
                vT_op = _compat.transposed(t_smem[0].at[slot]) if tr else t_smem[1].at[slot]
                dp = mm(do_smem.at[wg], vT_op, shape)
                ds_smem[wg] = (p * (dp - dl_b)).astype(dtype)
                plgpu.commit_smem()
                dq = dq + mm(ds_smem.at[wg], k_smem.at[slot], (BQ, D))
                plgpu.barrier_arrive(free.at[slot])
                return dq

            skip = release(full_bar, free, stages)

            dq = consume(rng, steps, body, skip,
                         plgpu.layout_cast(jnp.zeros((BQ, D), jnp.float32), plgpu.Layout.WGMMA))
            q_smem[wg] = (dq * scale).astype(dtype)
            write_back((q_smem.at[wg], dq_ref.at[b, rows, h]))

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(24, action="decrease")

            def load(t, slot):
                blk = pl.ds((plo + t) * BK, BK)
                bar = full_bar.at[slot]
                plgpu.copy_gmem_to_smem(k_ref.at[b, blk, kh], k_smem.at[slot], bar)
                plgpu.copy_gmem_to_smem(ks_ref.at[b, blk], ks_smem.at[slot], bar)
                for src, dst in zip(t_refs, t_smem):  # v [B, S, K, D], or kT and vT [B, D, K, S]
                    plgpu.copy_gmem_to_smem(src.at[b, blk, kh] if tr else src.at[b, :, kh, blk], dst.at[slot], bar)

            produce(steps, n_kv, stages, load, free)

    def dq_entry(*refs):
        t_tiles = [smem((stages, BK, D), dtype)] if tr else [smem((stages, D, BK), dtype)] * 2
        pl.run_scoped(
            lambda *scoped: dq_kernel(*refs, scoped),
            (smem((2, BQ, D), dtype), smem((2, BQ, D), dtype), plgpu.SMEM((2, BQ), jnp.float32),
             plgpu.SMEM((2, BQ), jnp.float32), plgpu.SMEM((2, BQ), jnp.int32), smem((stages, BK, D), dtype),
             plgpu.SMEM((stages, BK), jnp.int32), smem((2, BQ, BK), dtype), *t_tiles),
            (plgpu.Barrier(num_arrivals=5, num_barriers=2),
             plgpu.Barrier(num_arrivals=2 + len(t_tiles), num_barriers=stages),
             plgpu.Barrier(num_arrivals=2, num_barriers=stages)),
            collective_axes="wg",
        )

    dq = plgpu.kernel(
        dq_entry, out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(B, N, n_q // 2), grid_names=("b", "h", "i"), num_threads=3, thread_name="wg", interpret=ip,
    )(q, d_out, lse, delta, q_seg, k, kv_seg, q_ranges, *((v,) if tr else (kT, vT)))
    return dq[:, :T], dk[:, :S], dv[:, :S]
