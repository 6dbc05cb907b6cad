"""Attention of a few new query tokens against a paged KV pool (decode, chunked prefill).

Layout: pages [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32 (page ids of each
sequence in order); lengths [B] int32 (tokens in the sequence, the new ones included). The Tq query
tokens are the last Tq positions of each sequence and are causal among themselves; query rows that
fall before position 0 (padding) see no key and give zeros.

`paged_attention_reference` gathers each sequence's pages and attends (pure jnp, runs everywhere);
`paged_attention_forward` is the Pallas Mosaic GPU kernel, which reads the pages in place.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from kernels._mgpu import LOG2E, mm, pad_to, produce, row, smem, write_back
from kernels.util import cdiv
from kernels.flash_attention import _MASKED, masked_softmax_attention, softmax_result


def write_pages(k_pages, v_pages, k_BTKD, v_BTKD, slot_mapping_BT, layer=None):
    """Scatter new k/v [B, T, Hkv, D] into pages at flat slots (block * block_size + offset).

    Slots < 0 (padding tokens) are dropped. With `layer`, the pages are the whole pool
    [L, num_blocks, block_size, Hkv, D] and only that layer is written (in place under donation).
    Returns the updated (k_pages, v_pages)."""
    num_blocks, block_size = k_pages.shape[-4:-2]
    slots = slot_mapping_BT.reshape(-1)
    slots = jnp.where(slots < 0, num_blocks * block_size, slots)  # out of range -> dropped
    blk, off = slots // block_size, slots % block_size
    k_new = k_BTKD.reshape(-1, *k_BTKD.shape[2:]).astype(k_pages.dtype)
    v_new = v_BTKD.reshape(-1, *v_BTKD.shape[2:]).astype(v_pages.dtype)
    idx = (blk, off) if layer is None else (layer, blk, off)
    k_pages = k_pages.at[idx].set(k_new, mode="drop")
    v_pages = v_pages.at[idx].set(v_new, mode="drop")
    return k_pages, v_pages


def gather_pages(pages, block_tables, layer=None):
    """Each sequence's pages in order: pages [num_blocks, block_size, Hkv, D] (or the whole pool
    [L, num_blocks, ...] with `layer`), block_tables [B, max_blocks] -> [B, max_blocks * block_size, Hkv, D]."""
    idx = block_tables if layer is None else (layer, block_tables)
    return pages[idx].reshape(block_tables.shape[0], -1, *pages.shape[-2:])


def paged_attention_reference(q_BTND, k_pages, v_pages, block_tables, lengths, *, scale: float | None = None,
                              layer=None):
    """Gather-then-attend reference. q [B, Tq, Hq, D] -> [B, Tq, Hq, D].

    With `layer`, pages are the whole pool [L, num_blocks, block_size, Hkv, D]."""
    B, T, N, D = q_BTND.shape
    K = k_pages.shape[-2]
    scale = D ** -0.5 if scale is None else scale
    k = gather_pages(k_pages, block_tables, layer)  # [B, S, Hkv, D], S = max_blocks * block_size
    v = gather_pages(v_pages, block_tables, layer)
    S = k.shape[1]
    q_pos = lengths[:, None] - T + jnp.arange(T)[None, :]  # [B, T]
    k_pos = jnp.arange(S)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < lengths[:, None, None])
    q = q_BTND.reshape(B, T, K, N // K, D)
    return masked_softmax_attention(q, k, v, mask, scale).reshape(B, T, N, D)


# ------------------------------------------------------------------ Pallas Mosaic GPU kernel
# Program (b, kv head h, row block r, split s). The query rows of a program are the (query token t,
# query head g of kv head h) pairs, row = t * G + g, so one K/V tile read serves every query head of its
# kv head (GQA without repeats) and every query token (decode, chunked prefill, speculative verification).
# Rows are padded to ROWS = 64, the wgmma M dimension, in SMEM; a program with fewer real rows (decode)
# writes back only those, rounded up to 8. Keys are processed `block_kv` at a time: a step's
# tile is gathered from its pages by one TMA copy per page (a page larger than the tile gives one copy of
# part of it), through the block table read from memory, into a `stages`-deep ring fed by a producer
# warpgroup. The consumer warpgroup runs S = Q K^T (K transposed in SMEM), an online softmax in exp2 and
# O += P V. With split-K (flash decoding) split s covers an equal share of the sequence's key tiles and
# writes a normalised float32 partial and its log-sum-exp; `combine_splits` merges them.

ROWS = 64


@dataclasses.dataclass(frozen=True)
class PagedConfig:
    block_kv: int = 64  # keys per pipeline step (a multiple of 64)
    stages: int = 4  # K/V ring depth
    num_splits: int | None = None  # split-K programs per sequence; None: enough to fill the GPU


def pallas_supported(q, k_pages) -> str | None:
    """Why the Pallas paged kernel cannot take these inputs, or None when it can."""
    D, BS = q.shape[-1], k_pages.shape[-3]
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k_pages.dtype != q.dtype:
        return f"it takes bf16/fp16 queries and pages of the same dtype, got {q.dtype} and {k_pages.dtype}"
    if D not in (64, 128):
        return f"it takes head_dim 64 or 128, got {D}"
    if BS < 8 or BS & (BS - 1):
        return f"it takes a power-of-two block_size >= 8, got {BS}"
    return None


def _device_cores() -> int:
    import jax

    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def num_splits(programs: int, max_steps: int, requested: int | None = None) -> int:
    """Split-K factor: `requested`, else enough programs for two waves on the device, keeping at least four
    key tiles per split; never more splits than tiles."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"num_splits must be >= 1, got {requested}")
        return max(1, min(requested, max_steps))
    want = cdiv(2 * _device_cores(), max(programs, 1))
    return max(1, min(want, max_steps // 4, 32))


def combine_splits(o, lse):
    """Merge split-K partials. o [..., S, R, D] float32 (each normalised), lse [..., S, R] -> [..., R, D].
    Rows with no visible key in any split give 0."""
    m = lse.max(axis=-2, keepdims=True)
    w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))  # exp(-inf) = 0 for empty splits
    den = w.sum(axis=-2)
    out = (o * w[..., None]).sum(axis=-3)
    return out / jnp.where(den > 0, den, 1.0)[..., None]


def paged_attention_forward(q, k_pages, v_pages, block_tables, lengths, *, scale: float, layer=None,
                            config: PagedConfig = PagedConfig(), interpret=False):
    """Pallas paged attention. Shapes as in paged_attention_reference -> [B, Tq, Hq, D] in q's dtype."""
    import jax
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from kernels import _compat

    why = pallas_supported(q, k_pages)
    if why:
        raise ValueError(f"the Pallas paged-attention kernel cannot run: {why}")
    if k_pages.ndim == 4:  # one layer: view it as a pool of one
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    B, T, N, D = q.shape
    _, NB, BS, K, _ = k_pages.shape
    G = N // K
    BK, stages = config.block_kv, config.stages
    if BK % ROWS:
        raise ValueError(f"block_kv must be a multiple of {ROWS}, got {BK}")
    dtype = q.dtype
    R = T * G
    n_rb = cdiv(R, ROWS)
    chunk = min(BS, BK)  # keys per TMA copy: a page, or a BK-slice of a larger page
    copies = BK // chunk
    max_steps = cdiv(block_tables.shape[1] * BS, BK)
    splits = num_splits(B * K * n_rb, max_steps, config.num_splits)
    max_per_split = cdiv(max_steps, splits)

    # Rows [B, K, n_rb * ROWS, D] (row = t * G + g) and each row's position; padding rows see no key.
    q_rows = q.reshape(B, T, K, G, D).transpose(0, 2, 1, 3, 4).reshape(B, K, R, D)
    q_rows = pad_to(q_rows, 2, ROWS)
    r_ids = jnp.arange(n_rb * ROWS)
    q_pos = jnp.where(r_ids < R, lengths[:, None].astype(jnp.int32) - T + r_ids // G, -1).astype(jnp.int32)
    # The last tile may run past the table: those keys are masked, and their reads go to the sequence's
    # first page (its own memory, never another sequence's or unwritten pages, whose 0 * NaN would leak).
    bt = block_tables.astype(jnp.int32)
    n_bt = cdiv(max_steps * BK, BS)
    bt = jnp.clip(jnp.concatenate([bt, jnp.repeat(bt[:, :1], n_bt - bt.shape[1], axis=1)], axis=1), 0, NB - 1)
    lens = jnp.clip(lengths.astype(jnp.int32), 0, block_tables.shape[1] * BS)  # never past the table
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
    in_smem_t = _compat.smem_transpose(interpret)
    # Without an in-SMEM transpose (jax 0.10's interpreter only) K is read from a transposed pool copy.
    k_src = k_pages if in_smem_t else jnp.swapaxes(jnp.swapaxes(k_pages, 2, 3), 3, 4)  # [L, NB, K, D, BS]
    out_dtype = dtype if splits == 1 else jnp.float32
    # Rows written back per program: a single row block writes only its real rows (rounded up to the
    # 8-row SMEM tile), so decode (R = G rows) moves a few rows of float32 partials per split, not 64.
    out_rows = ROWS if n_rb > 1 else cdiv(R, 8) * 8

    def kernel(q_ref, qp_ref, k_ref, v_ref, bt_ref, len_ref, layer_ref, o_ref, lse_ref, scoped):
        b, h, x = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("x")
        wg = lax.axis_index("wg")
        (q_smem, qp_smem, k_smem, v_smem, p_smem, lse_smem, *o_smem), (q_bar, full, free) = scoped
        o_smem = o_smem[0] if o_smem else q_smem  # without splits the output is staged where q was
        rb, s = lax.div(x, splits), lax.rem(x, splits)
        n_total = pl.cdiv(len_ref[b], BK)
        per = pl.cdiv(n_total, splits)
        start = s * per
        steps = jnp.clip(n_total - start, 0, per)

        @pl.when(wg == 0)
        def _consumer():
            r0 = rb * ROWS
            plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(r0, ROWS)], q_smem, q_bar.at[0])
            plgpu.copy_gmem_to_smem(qp_ref.at[b, pl.ds(r0, ROWS)], qp_smem, q_bar.at[0])
            plgpu.barrier_wait(q_bar.at[0])
            shape = (ROWS, BK)
            k_iota = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
            q_pos_b = row(qp_smem, 1, shape, 0)

            def body(i, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(full.at[slot])
                rhs = _compat.transposed(k_smem.at[slot]) if in_smem_t else k_smem.at[slot]
                s_ = mm(q_smem, rhs, shape) * (scale * LOG2E)
                s_ = jnp.where(k_iota + (start + i) * BK <= q_pos_b, s_, _MASKED)
                m_new = jnp.maximum(m_i, s_.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s_ - lax.broadcast_in_dim(m_new, shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                p_smem[...] = p.astype(dtype)
                plgpu.commit_smem()
                o = mm(p_smem, v_smem.at[slot], (ROWS, D))
                plgpu.barrier_arrive(free.at[slot])
                return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + o, m_new, l_i

            acc = plgpu.layout_cast(jnp.zeros((ROWS, D), jnp.float32), plgpu.Layout.WGMMA)
            m_i = plgpu.layout_cast(jnp.full((ROWS,), _MASKED, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc, m_i, l_i = lax.fori_loop(0, steps, body, (acc, m_i, l_i))
            o, lse = softmax_result(acc, m_i, l_i)  # a row no key of this split reaches: 0, -inf
            o_smem[...], lse_smem[...] = o.astype(out_dtype), lse
            rows_out, dst = pl.ds(0, out_rows), pl.ds(rb * out_rows, out_rows)
            write_back((o_smem.at[rows_out], o_ref.at[b, h, s, dst]),
                       (lse_smem.at[rows_out], lse_ref.at[b, h, s, dst]))

        @pl.when(wg == 1)
        def _producer():
            lyr = layer_ref[0]

            def load(i, slot):
                key0 = (start + i) * BK
                for c in range(copies):
                    pos = key0 + c * chunk
                    page = bt_ref[b, lax.div(pos, BS)]
                    keys = pl.ds(lax.rem(pos, BS), chunk) if BS > chunk else slice(None)
                    dst = pl.ds(c * chunk, chunk)
                    if in_smem_t:
                        plgpu.copy_gmem_to_smem(k_ref.at[lyr, page, keys, h], k_smem.at[slot, dst], full.at[slot])
                    else:
                        plgpu.copy_gmem_to_smem(k_ref.at[lyr, page, h, :, keys], k_smem.at[slot, :, dst],
                                                full.at[slot])
                    plgpu.copy_gmem_to_smem(v_ref.at[lyr, page, keys, h], v_smem.at[slot, dst], full.at[slot])

            produce(steps, max_per_split, stages, load, free)

    def entry(*refs):
        k_tile = smem((stages, BK, D), dtype) if in_smem_t else plgpu.SMEM((stages, D, BK), dtype)
        tiles = (smem((ROWS, D), dtype), plgpu.SMEM((ROWS,), jnp.int32), k_tile, smem((stages, BK, D), dtype),
                 smem((ROWS, BK), dtype), plgpu.SMEM((ROWS,), jnp.float32))
        if splits > 1:
            tiles += (smem((ROWS, D), jnp.float32),)
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped), tiles,
            (plgpu.Barrier(num_arrivals=2, num_barriers=1),  # q rows + their positions
             plgpu.Barrier(num_arrivals=2 * copies, num_barriers=stages),  # a step's K and V copies
             plgpu.Barrier(num_arrivals=1, num_barriers=stages)),
            collective_axes="wg",
        )

    o, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((B, K, splits, n_rb * out_rows, D), out_dtype),
                  jax.ShapeDtypeStruct((B, K, splits, n_rb * out_rows), jnp.float32)),
        grid=(B, K, n_rb * splits), grid_names=("b", "h", "x"), num_threads=2, thread_name="wg",
        interpret=_compat.interpret_params() if interpret else False,
    )(q_rows, q_pos, k_src, v_pages, bt, lens, layer_arr)
    out = o[:, :, 0] if splits == 1 else combine_splits(o, lse).astype(dtype)  # [B, K, rows, D]
    return out[:, :, :R].reshape(B, K, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, N, D)
