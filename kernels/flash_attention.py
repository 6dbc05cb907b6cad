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

from kernels._mgpu import LOG2E, consume, mma_into, pad_to, produce, row, smem, write_back
from kernels.tile_ranges import program_ranges, visibility

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def softmax_result(acc, m_i, l_i):
    """The end of an online softmax in exp2 units (running max m_i, sum l_i per row of acc): (acc / l_i,
    log-sum-exp in natural units); a row with no visible key gives 0 and -inf."""
    seen = m_i > 0.5 * _MASKED
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l_i, 1.0), 0.0)
    lse = jnp.where(seen, (m_i + jnp.log2(jnp.where(seen, l_i, 1.0))) / LOG2E, -jnp.inf)
    return acc * lax.broadcast_in_dim(inv, acc.shape, [0]), lse


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
# Program (b, h, i) computes query rows [i * 2 * BQ, (i + 1) * 2 * BQ) of head h with three warpgroups, in
# the consumer structure of FlashAttention-3 (and JAX's Hopper kernel):
# * a producer (40 registers) streams the K and V tiles of kv head h // G that the program's rows can see
#   (`tile_ranges`: causal, window and segment ranges; other tiles are never loaded) by TMA into a ring of
#   `stages` slots. K and V have their own full/free barriers, so the next K is issued as soon as S has
#   been computed, without waiting for the PV product;
# * two consumers (232 registers, BQ rows each): S = Q K^T by wgmma (K^T a transposed view of the K tile);
#   online softmax in registers with exp2, the scale * log2(e) folded into the exponent's FMA
#   (exp2(s * c - m)); P cast to 16 bits stays in registers as wgmma's left operand; O accumulates in
#   place. A schedule barrier alternates the consumers (ping-pong): one's softmax runs under the other's
#   matmuls. Each consumer's run of tiles is a masked head, an unmasked middle (no iota, compare or select)
#   and a masked tail (the causal diagonal, a window edge, a segment boundary). With FlashConfig.overlap
#   a consumer also pipelines within itself: QK(j + 1) is issued with PV(j) and softmax(j + 1) runs under
#   PV(j) (FA3's intra-warpgroup overlap; off until measured on a GPU).
# Out-of-range rows/keys are padding (their segment ids never match).


_PAD_Q_SEG, _PAD_KV_SEG = -(2**31) + 1, -(2**31)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    block_q: int = 64  # forward: rows per consumer warpgroup (two per program)
    block_kv: int = 128  # forward: keys per step
    stages: int = 2  # forward: K/V ring depth
    overlap: bool = False  # forward: issue QK(j + 1) with PV(j) and run softmax(j + 1) under PV(j)
    bwd_block_q: int = 64
    bwd_block_kv: int = 64
    bwd_stages: int = 2


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
    q_seg = pad_to(q_seg, 1, 2 * BQ, _PAD_Q_SEG).astype(jnp.int32)
    k, v = pad_to(k, 1, BK), pad_to(v, 1, BK)
    kv_seg = pad_to(kv_seg, 1, BK, _PAD_KV_SEG).astype(jnp.int32)
    Tp, Sp = q.shape[1], k.shape[1]
    n_kv = Sp // BK
    dtype = q.dtype
    c = scale * LOG2E
    ranges = program_ranges(*visibility(q_seg, kv_seg, T=T, S=S, block_q=BQ, block_kv=BK, causal=causal,
                                       window=sliding_window))  # [B, Tp // (2 BQ), 10]
    transpose_in_smem = _compat.smem_transpose(interpret)
    in_regs = _compat.registers_mma(interpret)
    kt = k if transpose_in_smem else jnp.swapaxes(k, 1, 3)  # [B, D, K, S] for a [D, BK] TMA tile
    window = sliding_window

    def kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, rg_ref, o_ref, lse_ref, scoped):
        b, h, i = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("i")
        wg = lax.axis_index("wg")
        (q_smem, k_smem, v_smem, qs_smem, ks_smem, lse_smem, *p_smem), bars = scoped
        p_smem = p_smem[0] if p_smem else None  # P staged through SMEM (interpret mode only)
        q_bar, k_full, v_full, k_free, v_free, sched = bars
        plo, phi = rg_ref[b, i, 0], rg_ref[b, i, 1]  # the producer's stream of tiles [plo, phi)
        steps = phi - plo

        def schedule():  # ping-pong: hand the tensor cores to the other consumer
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            q0 = i * 2 * BQ + wg * BQ
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, BQ), h], q_smem.at[wg], q_bar.at[wg])
            plgpu.copy_gmem_to_smem(qs_ref.at[b, pl.ds(q0, BQ)], qs_smem.at[wg], q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            q_ids = plgpu.broadcasted_iota(jnp.int32, (BQ, BK), 0, layout=plgpu.Layout.WGMMA) + q0 + offset
            k_iota = plgpu.broadcasted_iota(jnp.int32, (BQ, BK), 1, layout=plgpu.Layout.WGMMA)
            q_seg_b = row(qs_smem.at[wg], 1, (BQ, BK), 0)
            lo, u_lo, u_hi, hi = (rg_ref[b, i, 2 + 4 * wg + n] - plo for n in range(4))  # stream steps

            def k_op(slot):
                return _compat.transposed(k_smem.at[slot]) if transpose_in_smem else k_smem.at[slot]

            def key_segments(slot, masked: bool):
                """The tile's key segment ids, read before its K slot is released: the fence orders the
                read before the TMA that refills the slot (a generic-proxy read, then an async-proxy
                write)."""
                if not masked:
                    return None
                kv_seg_b = row(ks_smem.at[slot], 0, (BQ, BK), 1)
                plgpu.commit_smem()
                return kv_seg_b

            def softmax(s, m_i, l_i, t, kv_seg_b, masked: bool):
                """Online softmax of raw logits s for stream step t -> (P, new max, new sum, rescale)."""
                if masked:
                    mask = _visible(q_ids, k_iota + (plo + t) * BK, q_seg_b, kv_seg_b, causal, window)
                    s = jnp.where(mask, s * c, _MASKED)
                    m_new = jnp.maximum(m_i, s.max(axis=1))
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                else:
                    m_new = jnp.maximum(m_i, s.max(axis=1) * c)
                    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))  # one FMA per logit
                alpha = jnp.exp2(m_i - m_new)
                return p, m_new, l_i * alpha + p.sum(axis=1), alpha

            def qk(slot):
                def f(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem.at[wg], k_op(slot))
                    schedule()
                    return acc_ref[...]

                return pl.run_scoped(f, plgpu.ACC((BQ, BK), jnp.float32))

            def pv(acc, p16, slot):  # acc + P V
                if in_regs:  # P from registers, O += P V in place
                    return mma_into(acc, p16, v_smem.at[slot], in_place=True)
                p_smem[wg] = p16  # the interpreter's form of the same product
                plgpu.commit_smem()
                return mma_into(acc, p_smem.at[wg], v_smem.at[slot], in_place=False)

            def end_softmax(slot=None):  # hand over the tensor cores; wait for V and for them to come back
                plgpu.barrier_arrive(sched)
                if slot is not None:
                    plgpu.barrier_wait(v_full.at[slot])
                plgpu.barrier_wait(sched)

            def qk_softmax(t, m_i, l_i, masked: bool):  # QK(t) (K released), then its softmax
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(k_full.at[slot])
                s = qk(slot)
                kv_seg_b = key_segments(slot, masked)
                plgpu.barrier_arrive(k_free.at[slot])
                return softmax(s, m_i, l_i, t, kv_seg_b, masked)

            def body(t, carry, masked: bool):  # QK(t), softmax(t), PV(t)
                acc, m_i, l_i = carry
                slot = lax.rem(t, stages)
                p, m_i, l_i, alpha = qk_softmax(t, m_i, l_i, masked)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                end_softmax(slot)
                acc = pv(acc, p16, slot)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_i, l_i

            def skip(t, _):  # a tile only the other consumer needs: observe and release it, keep the rhythm
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(k_full.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                schedule()
                plgpu.barrier_wait(v_full.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                schedule()

            # overlap: QK(t) and PV(t - 1) are issued together and softmax(t) runs while PV(t - 1) does
            # (FA3's intra-warpgroup pipelining); P and V wait one step longer.
            def first(carry):  # QK and softmax of the run's first tile (masked: right for any tile)
                acc, m_i, l_i, _ = carry
                p, m_i, l_i, _ = qk_softmax(lo, m_i, l_i, True)
                end_softmax()
                return acc, m_i, l_i, p.astype(dtype)

            def body_ov(t, carry, masked: bool):  # QK(t), PV(t - 1), softmax(t)
                acc, m_i, l_i, p_prev = carry
                slot, prev = lax.rem(t, stages), lax.rem(t - 1, stages)
                if in_regs:
                    plgpu.barrier_wait(k_full.at[slot])

                    def gemms(s_ref, o_ref):
                        o_ref[...] = acc  # the accumulator's registers are PV's
                        plgpu.wgmma(s_ref, q_smem.at[wg], k_op(slot))
                        plgpu.barrier_wait(v_full.at[prev])
                        plgpu.wgmma(o_ref, p_prev, v_smem.at[prev])
                        schedule()
                        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # QK(t) done; PV(t - 1) may run on
                        kv_seg_b = key_segments(slot, masked)
                        plgpu.barrier_arrive(k_free.at[slot])
                        out = softmax(s, m_i, l_i, t, kv_seg_b, masked)
                        return o_ref[...], *out

                    o, p, m_i, l_i, alpha = pl.run_scoped(gemms, plgpu.ACC((BQ, BK), jnp.float32),
                                                          plgpu.ACC((BQ, D), jnp.float32))
                else:  # the interpreter's form: the same products, one after the other
                    p, m_i, l_i, alpha = qk_softmax(t, m_i, l_i, masked)
                    plgpu.barrier_wait(v_full.at[prev])
                    o = pv(acc, p_prev, prev)
                plgpu.barrier_arrive(v_free.at[prev])
                end_softmax()
                return o * lax.broadcast_in_dim(alpha, o.shape, [0]), m_i, l_i, p.astype(dtype)

            def last(carry):  # the run's last PV
                acc, m_i, l_i, p_prev = carry
                prev = lax.rem(hi - 1, stages)
                plgpu.barrier_wait(v_full.at[prev])
                acc = pv(acc, p_prev, prev)
                plgpu.barrier_arrive(v_free.at[prev])
                return acc, m_i, l_i, p_prev

            acc = plgpu.layout_cast(jnp.zeros((BQ, D), jnp.float32), plgpu.Layout.WGMMA)
            m_i = plgpu.layout_cast(jnp.full((BQ,), _MASKED, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.zeros((BQ,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            pl.when(wg == 1)(schedule)  # consumer 0 goes first
            if not config.overlap:
                acc, m_i, l_i = consume((lo, u_lo, u_hi, hi), steps, body, skip, (acc, m_i, l_i))
            else:
                lax.fori_loop(0, lo, skip, None)
                p0 = plgpu.layout_cast(jnp.zeros((BQ, BK), dtype), plgpu.Layout.WGMMA)
                carry = lax.cond(lo < hi, first, lambda c: c, (acc, m_i, l_i, p0))
                a = jnp.minimum(lo + 1, hi)
                rest = (a, jnp.maximum(u_lo, a), jnp.maximum(u_hi, a), hi)
                carry = consume(rest, steps, body_ov, skip, carry, start=a)
                acc, m_i, l_i, _ = lax.cond(lo < hi, last, lambda c: c, carry)
            pl.when(wg == 0)(schedule)
            o, lse = softmax_result(acc, m_i, l_i)
            q_smem[wg], lse_smem[wg] = o.astype(dtype), lse
            write_back((q_smem.at[wg], o_ref.at[b, pl.ds(q0, BQ), h]),
                       (lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q0, BQ)]))

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kvh = lax.div(h, G)

            def load_k(t, slot):
                blk = pl.ds((plo + t) * BK, BK)
                src = k_ref.at[b, blk, kvh] if transpose_in_smem else k_ref.at[b, :, kvh, blk]
                plgpu.copy_gmem_to_smem(src, k_smem.at[slot], k_full.at[slot])
                plgpu.copy_gmem_to_smem(ks_ref.at[b, blk], ks_smem.at[slot], k_full.at[slot])

            def load_v(t, slot):
                plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds((plo + t) * BK, BK), kvh], v_smem.at[slot],
                                        v_full.at[slot])

            produce(steps, n_kv, stages, (load_k, load_v), k_free, v_free)

    def entry(*refs):
        k_tile = (BK, D) if transpose_in_smem else (D, BK)
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            (smem((2, BQ, D), dtype), smem((stages, *k_tile), dtype), smem((stages, BK, D), dtype),
             plgpu.SMEM((2, BQ), jnp.int32), plgpu.SMEM((stages, BK), jnp.int32), plgpu.SMEM((2, BQ), jnp.float32),
             *([] if in_regs else [smem((2, BQ, BK), dtype)])),
            (plgpu.Barrier(num_arrivals=2, num_barriers=2), plgpu.Barrier(num_arrivals=2, num_barriers=stages),
             plgpu.Barrier(num_barriers=stages),  # q and K barriers: two TMA copies each (tiles + segment ids)
             plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_arrivals=2, num_barriers=stages),
             plgpu.Barrier(num_arrivals=2)),
            collective_axes="wg",
        )

    out, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((B, Tp, N, D), dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)),
        grid=(B, N, Tp // (2 * BQ)), grid_names=("b", "h", "i"), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_compat.interpret_params() if interpret else False,
    )(q, kt, v, q_seg, kv_seg, ranges)
    return out[:, :T], lse[:, :, :T]
