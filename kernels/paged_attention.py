"""Attention of a few new query tokens against a paged KV pool (decode, chunked prefill).

Layout: pages [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32 (page ids of each
sequence in order); lengths [B] int32 (tokens in the sequence, the new ones included). The Tq query
tokens are the last Tq positions of each sequence and are causal among themselves; query rows that
fall before position 0 (padding) see no key and give zeros.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.flash_attention import masked_softmax_attention


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


def paged_attention_reference(q_BTND, k_pages, v_pages, block_tables, lengths, *, scale: float | None = None,
                              layer=None):
    """Gather-then-attend reference. q [B, Tq, Hq, D] -> [B, Tq, Hq, D].

    With `layer`, pages are the whole pool [L, num_blocks, block_size, Hkv, D]."""
    B, T, N, D = q_BTND.shape
    K = k_pages.shape[-2]
    scale = D ** -0.5 if scale is None else scale
    idx = block_tables if layer is None else (layer, block_tables)
    k = k_pages[idx].reshape(B, -1, K, D)  # [B, S, Hkv, D], S = max_blocks * block_size
    v = v_pages[idx].reshape(B, -1, K, D)
    S = k.shape[1]
    q_pos = lengths[:, None] - T + jnp.arange(T)[None, :]  # [B, T]
    k_pos = jnp.arange(S)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < lengths[:, None, None])
    q = q_BTND.reshape(B, T, K, N // K, D)
    return masked_softmax_attention(q, k, v, mask, scale).reshape(B, T, N, D)
