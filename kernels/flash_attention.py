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

from kernels._mgpu import LOG2E, consume, mm, mma_into, pad_to, produce, row, smem
from kernels.tile_ranges import program_ranges, visibility

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
#   and a masked tail (the causal diagonal, a window edge, a segment boundary).
# Out-of-range rows/keys are padding (their segment ids never match).


_PAD_Q_SEG, _PAD_KV_SEG = -(2**31) + 1, -(2**31)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    block_q: int = 64  # forward: rows per consumer warpgroup (two per program)
    block_kv: int = 128  # forward: keys per step
    stages: int = 2  # forward: K/V ring depth
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

            def body(t, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(k_full.at[slot])

                def qk(acc_ref):
                    rhs = _compat.transposed(k_smem.at[slot]) if transpose_in_smem else k_smem.at[slot]
                    plgpu.wgmma(acc_ref, q_smem.at[wg], rhs)
                    schedule()
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((BQ, BK), jnp.float32))
                if masked:
                    mask = _visible(q_ids, k_iota + (plo + t) * BK, q_seg_b, row(ks_smem.at[slot], 0, (BQ, BK), 1),
                                    causal, window)
                    plgpu.barrier_arrive(k_free.at[slot])
                    s = jnp.where(mask, s * c, _MASKED)
                    m_new = jnp.maximum(m_i, s.max(axis=1))
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                else:
                    plgpu.barrier_arrive(k_free.at[slot])
                    m_new = jnp.maximum(m_i, s.max(axis=1) * c)
                    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))  # one FMA per logit
                alpha = jnp.exp2(m_i - m_new)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                plgpu.barrier_arrive(sched)  # softmax done
                plgpu.barrier_wait(v_full.at[slot])
                plgpu.barrier_wait(sched)  # the tensor cores are ours again

                if in_regs:  # P from registers, O += P V in place
                    acc = mma_into(acc, p16, v_smem.at[slot], in_place=True)
                else:  # the interpreter's form of the same product
                    p_smem[wg] = p16
                    plgpu.commit_smem()
                    acc = mma_into(acc, p_smem.at[wg], v_smem.at[slot], in_place=False)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            def skip(t, _):  # a tile only the other consumer needs: observe and release it, keep the rhythm
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(k_full.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                schedule()
                plgpu.barrier_wait(v_full.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                schedule()

            acc = plgpu.layout_cast(jnp.zeros((BQ, D), jnp.float32), plgpu.Layout.WGMMA)
            m_i = plgpu.layout_cast(jnp.full((BQ,), _MASKED, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.zeros((BQ,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            pl.when(wg == 1)(schedule)  # consumer 0 goes first
            acc, m_i, l_i = consume((lo, u_lo, u_hi, hi), steps, body, skip, (acc, m_i, l_i))
            pl.when(wg == 0)(schedule)
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


# ------------------------------------------------------------------ Pallas Mosaic GPU backward
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

            def skip(t, _):
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(full_bar.at[slot])
                plgpu.barrier_arrive(free.at[slot])

            def head(g, carry):  # query head g of kv head kh: the stream's steps g * per_head + [0, per_head)
                return consume(rng, per_head, body, skip, carry, base=g * per_head)

            zeros = plgpu.layout_cast(jnp.zeros((BK, D), jnp.float32), plgpu.Layout.WGMMA)
            dk, dv = lax.fori_loop(0, G, head, (zeros, zeros))
            k_smem[wg] = (dk * scale).astype(dtype)  # the K and V tiles are done with: stage the results
            v_smem[wg] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[b, blk, kh])
            plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[b, blk, kh])
            plgpu.wait_smem_to_gmem(0)

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
        (q_smem, do_smem, lse_smem, dl_smem, qs_smem, k_smem, ks_smem, ds_smem, *t_smem), (q_bar, full_bar, free) = scoped
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

            def skip(t, _):
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(full_bar.at[slot])
                plgpu.barrier_arrive(free.at[slot])

            dq = consume(rng, steps, body, skip,
                         plgpu.layout_cast(jnp.zeros((BQ, D), jnp.float32), plgpu.Layout.WGMMA))
            q_smem[wg] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[b, rows, h])
            plgpu.wait_smem_to_gmem(0)

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
