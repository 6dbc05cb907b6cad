"""Attention over full sequences (training, and prefill without a cache).

`attention_reference` is the pure-jnp path: GQA by grouping query heads per kv head (K/V are never
repeated), causal masking aligned at the end (query t sees keys s <= t + S - T), optional segment ids
(packed documents never attend across a boundary) and an optional sliding window. Logits and softmax
are float32; matmuls run in the input dtype with float32 accumulation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from kernels._mgpu import LOG2E, mm, pad_to, produce, row, smem

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(T: int, S: int, *, causal: bool, q_segment_ids=None, kv_segment_ids=None,
                   sliding_window: int | None = None) -> jax.Array | None:
    """Boolean mask [B or 1, T, S] (True = may attend), or None when nothing is masked."""
    mask = None
    if causal or sliding_window is not None:
        q_pos = jnp.arange(T)[:, None] + (S - T)
        k_pos = jnp.arange(S)[None, :]
        if causal:
            mask = k_pos <= q_pos
        if sliding_window is not None:
            win = q_pos - k_pos < sliding_window
            mask = win if mask is None else mask & win
        mask = mask[None]
    if q_segment_ids is not None:
        seg = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, T, S]
        mask = seg if mask is None else mask & seg
    return mask


def masked_softmax_attention(q_BTKGD, k_BSKD, v_BSKD, mask, scale: float) -> jax.Array:
    """Grouped attention core. q [B, T, Hkv, G, D]; k/v [B, S, Hkv, D]; mask broadcastable to [B, T, S]
    (True = attend). Returns [B, T, Hkv, G, D]. Rows with no visible key give zeros, not NaN."""
    logits = jnp.einsum("BTKGD,BSKD->BKGTS", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        m = mask[:, None, None]  # [B, 1, 1, T, S]
        logits = jnp.where(m, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        probs = jnp.where(jnp.any(m, axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("BKGTS,BSKD->BTKGD", probs.astype(v_BSKD.dtype), v_BSKD, preferred_element_type=jnp.float32)
    return out.astype(q_BTKGD.dtype)


def checked_segments(q_BTND, k_BSKD, segment_ids):
    """Check the heads and segment ids of a full-sequence attention -> (q_seg [B, T], kv_seg [B, S]), both
    None without segment ids. segment_ids: [B, T] (T == S) or a (q, kv) pair."""
    B, T, N, _ = q_BTND.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K})")
    q_seg, kv_seg = (segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids))
    if q_seg is not None and (q_seg.shape != (B, T) or kv_seg.shape != (B, S)):
        raise ValueError(f"segment_ids shapes {q_seg.shape}/{kv_seg.shape} do not match q [B, T]={B, T}, "
                         f"k [B, S]={B, S}")
    return q_seg, kv_seg


def attention_reference(q_BTND, k_BSKD, v_BSKD, *, causal: bool = True, segment_ids=None,
                        sliding_window: int | None = None, scale: float | None = None) -> jax.Array:
    B, T, N, D = q_BTND.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    q_seg, kv_seg = checked_segments(q_BTND, k_BSKD, segment_ids)
    scale = D ** -0.5 if scale is None else scale
    mask = attention_mask(T, S, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                          sliding_window=sliding_window)
    q = q_BTND.reshape(B, T, K, N // K, D)
    return masked_softmax_attention(q, k_BSKD, v_BSKD, mask, scale).reshape(B, T, N, D)


# ------------------------------------------------------------------ Pallas Mosaic GPU forward
# Program (b, h, i) computes query rows [i * 2 * BQ, (i + 1) * 2 * BQ) of head h with three warpgroups:
# two consumers (BQ rows each: S = Q K^T by wgmma with K^T a transposed view of the K tile, online
# softmax in registers, P staged through SMEM, O += P V by wgmma) and one producer that streams K/V blocks
# of kv head h // G by TMA into a ring of `stages` slots guarded by full/free barriers. Masks (causal
# aligned at the end, segment ids, sliding window) come from iotas and the segment ids streamed beside K.
# Causal programs stop at the last K block their rows can see. Out-of-range rows/keys are padding (their
# segment ids never match).


_PAD_Q_SEG, _PAD_KV_SEG = -(2**31) + 1, -(2**31)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    block_q: int = 64  # rows per consumer warpgroup (two per program)
    block_kv: int = 64
    stages: int = 2  # K/V ring depth


def _visible(q_ids, k_ids, q_seg, kv_seg, causal: bool, window: int | None):
    """Which (query, key) pairs may attend, from position ids and segment ids broadcast to one tile."""
    mask = q_seg == kv_seg
    if causal:
        mask &= k_ids <= q_ids
    if window is not None:
        mask &= q_ids - k_ids < window
    return mask


def flash_attention_forward(q, k, v, q_seg, kv_seg, *, causal: bool, sliding_window: int | None, scale: float,
                            config: FlashConfig = FlashConfig(), interpret=False):
    """Pallas forward. q [B, T, N, D]; k/v [B, S, K, D]; q_seg [B, T], kv_seg [B, S] int32.
    -> (out [B, T, N, D], lse [B, N, T] float32: log-sum-exp of the scaled logits, natural log)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from kernels import _compat

    B, T, N, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    BQ, BK, stages = config.block_q, config.block_kv, config.stages
    offset = S - T  # query t sits at position t + offset (causal alignment at the end)
    q = pad_to(q, 1, 2 * BQ)
    q_seg = pad_to(q_seg, 1, 2 * BQ, _PAD_Q_SEG)
    k, v = pad_to(k, 1, BK), pad_to(v, 1, BK)
    kv_seg = pad_to(kv_seg, 1, BK, _PAD_KV_SEG)
    Tp, Sp = q.shape[1], k.shape[1]
    n_kv = Sp // BK
    dtype = q.dtype
    transpose_in_smem = _compat.smem_transpose(interpret)
    kt = k if transpose_in_smem else jnp.swapaxes(k, 1, 3)  # [B, D, K, S] for a [D, BK] TMA tile
    window = sliding_window

    def kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, scoped):
        b, h, i = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("i")
        wg = lax.axis_index("wg")
        (q_smem, k_smem, v_smem, p_smem, qs_smem, ks_smem, lse_smem), bars = scoped
        q_bar, k_full, v_full, k_free, v_free = bars
        prog_q0 = i * 2 * BQ
        if causal:
            steps = jnp.minimum(pl.cdiv(prog_q0 + 2 * BQ + offset, BK), n_kv)
        else:
            steps = n_kv

        @pl.when(wg < 2)
        def _consumer():
            q0 = prog_q0 + wg * BQ
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, BQ), h], q_smem.at[wg], q_bar.at[wg])
            plgpu.copy_gmem_to_smem(qs_ref.at[b, pl.ds(q0, BQ)], qs_smem.at[wg], q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            q_ids = plgpu.broadcasted_iota(jnp.int32, (BQ, BK), 0, layout=plgpu.Layout.WGMMA) + q0 + offset
            k_iota = plgpu.broadcasted_iota(jnp.int32, (BQ, BK), 1, layout=plgpu.Layout.WGMMA)
            q_seg_b = row(qs_smem.at[wg], 1, (BQ, BK), 0)
            my_steps = (jnp.minimum(pl.cdiv(q0 + BQ + offset, BK), n_kv) if causal else steps)

            def body(step, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(step, stages)
                plgpu.barrier_wait(k_full.at[slot])

                def qk(acc_ref):
                    rhs = _compat.transposed(k_smem.at[slot]) if transpose_in_smem else k_smem.at[slot]
                    plgpu.wgmma(acc_ref, q_smem.at[wg], rhs)
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((BQ, BK), jnp.float32)) * (scale * LOG2E)
                mask = _visible(q_ids, k_iota + step * BK, q_seg_b, row(ks_smem.at[slot], 0, (BQ, BK), 1),
                                causal, window)
                plgpu.barrier_arrive(k_free.at[slot])
                s = jnp.where(mask, s, _MASKED)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                p_smem[wg] = p.astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_wait(v_full.at[slot])

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_smem.at[wg], v_smem.at[slot])
                    return acc_ref[...]

                o = pl.run_scoped(pv, plgpu.ACC((BQ, D), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + o
                return acc, m_new, l_i

            def skip(step, _):  # blocks only the other consumer needs: observe and release them
                slot = lax.rem(step, stages)
                plgpu.barrier_wait(k_full.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_full.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])

            acc = plgpu.layout_cast(jnp.zeros((BQ, D), jnp.float32), plgpu.Layout.WGMMA)
            m_i = plgpu.layout_cast(jnp.full((BQ,), _MASKED, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.zeros((BQ,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc, m_i, l_i = lax.fori_loop(0, my_steps, body, (acc, m_i, l_i))
            lax.fori_loop(my_steps, steps, skip, None)
            seen = m_i > 0.5 * _MASKED  # rows with at least one visible key
            inv = jnp.where(seen, 1.0 / jnp.where(seen, l_i, 1.0), 0.0)
            q_smem[wg] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
            lse_smem[wg] = jnp.where(seen, (m_i + jnp.log2(jnp.where(seen, l_i, 1.0))) / LOG2E, -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], o_ref.at[b, pl.ds(q0, BQ), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q0, BQ)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            kvh = lax.div(h, G)

            def load(step, slot):
                blk = pl.ds(step * BK, BK)
                src = k_ref.at[b, blk, kvh] if transpose_in_smem else k_ref.at[b, :, kvh, blk]
                plgpu.copy_gmem_to_smem(src, k_smem.at[slot], k_full.at[slot])
                plgpu.copy_gmem_to_smem(ks_ref.at[b, blk], ks_smem.at[slot], k_full.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, blk, kvh], v_smem.at[slot], v_full.at[slot])

            produce(steps, n_kv, stages, load, k_free, v_free)

    def entry(*refs):
        k_tile = (BK, D) if transpose_in_smem else (D, BK)
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            (smem((2, BQ, D), dtype), smem((stages, *k_tile), dtype), smem((stages, BK, D), dtype),
             smem((2, BQ, BK), dtype), plgpu.SMEM((2, BQ), jnp.int32), plgpu.SMEM((stages, BK), jnp.int32),
             plgpu.SMEM((2, BQ), jnp.float32)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=2), plgpu.Barrier(num_arrivals=2, num_barriers=stages),
             plgpu.Barrier(num_barriers=stages),  # q and K barriers: two TMA copies each (tiles + segment ids)
             plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_arrivals=2, num_barriers=stages)),
            collective_axes="wg",
        )

    out, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((B, Tp, N, D), dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)),
        grid=(B, N, Tp // (2 * BQ)), grid_names=("b", "h", "i"), num_threads=3, thread_name="wg",
        interpret=_compat.interpret_params() if interpret else False,
    )(q, kt, v, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))
    return out[:, :T], lse[:, :, :T]


# ------------------------------------------------------------------ Pallas Mosaic GPU backward
# FA2-style: one kernel accumulates dK, dV for a block of keys (looping over the query blocks that can
# see it, for every query head of its kv head: GQA without repeated K/V); a second accumulates dQ for a
# block of queries. In both, warpgroup 0 computes and warpgroup 1 streams the per-step tiles by TMA into a
# `stages`-deep ring (one "full" barrier per slot counting the copies, one "free" barrier released by the
# consumer). Operands wgmma needs transposed (Q, dO in dK/dV; K, V in dQ) are transposed views of their
# SMEM tiles (transposed copies from memory under jax 0.10's interpreter). P and dS are staged through
# SMEM as the left wgmma operand.


def flash_attention_backward(q, k, v, q_seg, kv_seg, out, lse, d_out, *, causal: bool, sliding_window: int | None,
                             scale: float, config: FlashConfig = FlashConfig(), interpret=False):
    """Pallas backward -> (dq, dk, dv) in the input dtype. Shapes as in flash_attention_forward."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from kernels import _compat

    B, T, N, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    BQ, BK, stages = config.block_q, config.block_kv, config.stages
    offset = S - T
    dtype = q.dtype
    delta = jnp.einsum("BTND,BTND->BNT", d_out.astype(jnp.float32), out.astype(jnp.float32))
    q, d_out = pad_to(q, 1, BQ), pad_to(d_out, 1, BQ)
    lse, delta = pad_to(lse, 2, BQ), pad_to(delta, 2, BQ)
    q_seg = pad_to(q_seg, 1, BQ, _PAD_Q_SEG).astype(jnp.int32)
    k, v = pad_to(k, 1, BK), pad_to(v, 1, BK)
    kv_seg = pad_to(kv_seg, 1, BK, _PAD_KV_SEG).astype(jnp.int32)
    Tp, Sp = q.shape[1], k.shape[1]
    n_q, n_kv = Tp // BQ, Sp // BK
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

    # ---- dK, dV: program (b, kv head, key block j); steps run over (query head g, query block i).
    def dkv_kernel(q_ref, do_ref, lse_ref, dl_ref, qs_ref, k_ref, v_ref, ks_ref, *refs):
        *t_refs, dk_ref, dv_ref, scoped = refs  # t_refs: (qT, doT) without the in-SMEM transpose
        b, kh, j = lax.axis_index("b"), lax.axis_index("kh"), lax.axis_index("j")
        wg = lax.axis_index("wg")
        (k_smem, v_smem, ks_smem, q_smem, do_smem, lse_smem, dl_smem, qs_smem, p_smem, out_smem, *t_smem), \
            (kv_bar, full, free) = scoped
        i0 = jnp.maximum((j * BK - offset) // BQ, 0) if causal else 0
        per_head = jnp.maximum(n_q - i0, 0)
        steps = G * per_head

        @pl.when(wg == 0)
        def _consumer():
            blk = pl.ds(j * BK, BK)
            plgpu.copy_gmem_to_smem(k_ref.at[b, blk, kh], k_smem, kv_bar.at[0])
            plgpu.copy_gmem_to_smem(v_ref.at[b, blk, kh], v_smem, kv_bar.at[0])
            plgpu.copy_gmem_to_smem(ks_ref.at[b, blk], ks_smem, kv_bar.at[0])
            plgpu.barrier_wait(kv_bar.at[0])
            shape = (BK, BQ)
            k_ids = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + j * BK
            q_iota = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
            kv_seg_b = row(ks_smem, 1, shape, 0)

            def body(step, carry):
                dk, dv = carry
                slot = lax.rem(step, stages)
                i = i0 + lax.rem(step, jnp.maximum(per_head, 1))
                plgpu.barrier_wait(full.at[slot])
                qT_op = _compat.transposed(q_smem.at[slot]) if tr else t_smem[0].at[slot]
                sT = mm(k_smem, qT_op, shape) * c
                mask = mask_for(q_iota + i * BQ + offset, k_ids, row(qs_smem.at[slot], 0, shape, 1), kv_seg_b)
                pT = jnp.where(mask, jnp.exp2(sT - row(lse_smem.at[slot], 0, shape, 1) * LOG2E), 0.0)
                p_smem[...] = pT.astype(dtype)
                plgpu.commit_smem()
                dv = dv + mm(p_smem, do_smem.at[slot], (BK, D))
                doT_op = _compat.transposed(do_smem.at[slot]) if tr else t_smem[1].at[slot]
                dpT = mm(v_smem, doT_op, shape)
                dsT = pT * (dpT - row(dl_smem.at[slot], 0, shape, 1))
                p_smem[...] = dsT.astype(dtype)
                plgpu.commit_smem()
                dk = dk + mm(p_smem, q_smem.at[slot], (BK, D))
                plgpu.barrier_arrive(free.at[slot])
                return dk, dv

            zeros = plgpu.layout_cast(jnp.zeros((BK, D), jnp.float32), plgpu.Layout.WGMMA)
            dk, dv = lax.fori_loop(0, steps, body, (zeros, zeros))
            out_smem[0] = (dk * scale).astype(dtype)
            out_smem[1] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[0], dk_ref.at[b, blk, kh])
            plgpu.copy_smem_to_gmem(out_smem.at[1], dv_ref.at[b, blk, kh])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _producer():
            def load(step, slot):
                h = kh * G + lax.div(step, jnp.maximum(per_head, 1))
                rows = pl.ds((i0 + lax.rem(step, jnp.maximum(per_head, 1))) * BQ, BQ)
                bar = full.at[slot]
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
            (smem((BK, D), dtype), smem((BK, D), dtype), plgpu.SMEM((BK,), jnp.int32),
             smem((stages, BQ, D), dtype), smem((stages, BQ, D), dtype), plgpu.SMEM((stages, BQ), jnp.float32),
             plgpu.SMEM((stages, BQ), jnp.float32), plgpu.SMEM((stages, BQ), jnp.int32), smem((BK, BQ), dtype),
             smem((2, BK, D), dtype), *[smem((stages, D, BQ), dtype)] * n_t),
            (plgpu.Barrier(num_arrivals=3, num_barriers=1), plgpu.Barrier(num_arrivals=5 + n_t, num_barriers=stages),
             plgpu.Barrier(num_arrivals=1, num_barriers=stages)),
            collective_axes="wg",
        )

    dk, dv = plgpu.kernel(
        dkv_entry, out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
        grid=(B, K, n_kv), grid_names=("b", "kh", "j"), num_threads=2, thread_name="wg", interpret=ip,
    )(q, d_out, lse, delta, q_seg, k, v, kv_seg, *(() if tr else (qT, doT)))
    if interpret:  # XLA:CPU may run independent interpreted kernels concurrently, which deadlocks the
        dk, dv, q = lax.optimization_barrier((dk, dv, q))  # interpreter: order dq after dk/dv

    # ---- dQ: program (b, head, query block i); steps run over the key blocks it can see.
    def dq_kernel(q_ref, do_ref, lse_ref, dl_ref, qs_ref, k_ref, ks_ref, *refs):
        *t_refs, dq_ref, scoped = refs  # t_refs: (v) with the in-SMEM transpose, else (kT, vT)
        b, h, i = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("i")
        wg = lax.axis_index("wg")
        (q_smem, do_smem, lse_smem, dl_smem, qs_smem, k_smem, ks_smem, ds_smem, *t_smem), (q_bar, full, free) = scoped
        steps = jnp.minimum(pl.cdiv((i + 1) * BQ + offset, BK), n_kv) if causal else n_kv
        kh = lax.div(h, G)

        @pl.when(wg == 0)
        def _consumer():
            rows = pl.ds(i * BQ, BQ)
            for src, dst in ((q_ref.at[b, rows, h], q_smem), (do_ref.at[b, rows, h], do_smem),
                             (lse_ref.at[b, h, rows], lse_smem), (dl_ref.at[b, h, rows], dl_smem),
                             (qs_ref.at[b, rows], qs_smem)):
                plgpu.copy_gmem_to_smem(src, dst, q_bar.at[0])
            plgpu.barrier_wait(q_bar.at[0])
            shape = (BQ, BK)
            q_ids = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + i * BQ + offset
            k_iota = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
            q_seg_b = row(qs_smem, 1, shape, 0)
            lse_b = row(lse_smem, 1, shape, 0) * LOG2E
            dl_b = row(dl_smem, 1, shape, 0)

            def body(step, dq):
                slot = lax.rem(step, stages)
                plgpu.barrier_wait(full.at[slot])
                kT_op = _compat.transposed(k_smem.at[slot]) if tr else t_smem[0].at[slot]
                s = mm(q_smem, kT_op, shape) * c
                mask = mask_for(q_ids, k_iota + step * BK, q_seg_b, row(ks_smem.at[slot], 0, shape, 1))
                p = jnp.where(mask, jnp.exp2(s - lse_b), 0.0)
                vT_op = _compat.transposed(t_smem[0].at[slot]) if tr else t_smem[1].at[slot]
                dp = mm(do_smem, vT_op, shape)
                ds_smem[...] = (p * (dp - dl_b)).astype(dtype)
                plgpu.commit_smem()
                dq = dq + mm(ds_smem, k_smem.at[slot], (BQ, D))
                plgpu.barrier_arrive(free.at[slot])
                return dq

            dq = lax.fori_loop(0, steps, body, plgpu.layout_cast(jnp.zeros((BQ, D), jnp.float32),
                                                                  plgpu.Layout.WGMMA))
            q_smem[...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _producer():
            def load(step, slot):
                blk = pl.ds(step * BK, BK)
                bar = full.at[slot]
                plgpu.copy_gmem_to_smem(k_ref.at[b, blk, kh], k_smem.at[slot], bar)
                plgpu.copy_gmem_to_smem(ks_ref.at[b, blk], ks_smem.at[slot], bar)
                for src, dst in zip(t_refs, t_smem):  # v [B, S, K, D], or kT and vT [B, D, K, S]
                    plgpu.copy_gmem_to_smem(src.at[b, blk, kh] if tr else src.at[b, :, kh, blk], dst.at[slot], bar)

            produce(steps, n_kv, stages, load, free)

    def dq_entry(*refs):
        t_tiles = [smem((stages, BK, D), dtype)] if tr else [smem((stages, D, BK), dtype)] * 2
        pl.run_scoped(
            lambda *scoped: dq_kernel(*refs, scoped),
            (smem((BQ, D), dtype), smem((BQ, D), dtype), plgpu.SMEM((BQ,), jnp.float32),
             plgpu.SMEM((BQ,), jnp.float32), plgpu.SMEM((BQ,), jnp.int32), smem((stages, BK, D), dtype),
             plgpu.SMEM((stages, BK), jnp.int32), smem((BQ, BK), dtype), *t_tiles),
            (plgpu.Barrier(num_arrivals=5, num_barriers=1),
             plgpu.Barrier(num_arrivals=2 + len(t_tiles), num_barriers=stages),
             plgpu.Barrier(num_arrivals=1, num_barriers=stages)),
            collective_axes="wg",
        )

    dq = plgpu.kernel(
        dq_entry, out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(B, N, n_q), grid_names=("b", "h", "i"), num_threads=2, thread_name="wg", interpret=ip,
    )(q, d_out, lse, delta, q_seg, k, kv_seg, *((v,) if tr else (kT, vT)))
    return dq[:, :T], dk[:, :S], dv[:, :S]
