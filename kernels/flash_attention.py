"""Attention over full sequences (training, and prefill without a cache).

`attention_reference` is the pure-jnp path: GQA by grouping query heads per kv head (K/V are never
repeated), causal masking aligned at the end (query t sees keys s <= t + S - T), optional segment ids
(packed documents never attend across a boundary) and an optional sliding window. Logits and softmax
are float32; matmuls run in the input dtype with float32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def attention_reference(q_BTND, k_BSKD, v_BSKD, *, causal: bool = True, segment_ids=None,
                        sliding_window: int | None = None, scale: float | None = None) -> jax.Array:
    B, T, N, D = q_BTND.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K})")
    scale = D ** -0.5 if scale is None else scale
    q_seg, kv_seg = (segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids))
    if q_seg is not None and (q_seg.shape != (B, T) or kv_seg.shape != (B, S)):
        raise ValueError(f"segment_ids shapes {q_seg.shape}/{kv_seg.shape} do not match q [B, T]={B, T}, "
                         f"k [B, S]={B, S}")
    mask = attention_mask(T, S, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                          sliding_window=sliding_window)
    q = q_BTND.reshape(B, T, K, N // K, D)
    return masked_softmax_attention(q, k_BSKD, v_BSKD, mask, scale).reshape(B, T, N, D)
