"""Losses. The language-model loss is chunked over tokens, so the [tokens, vocab] logits (151,936 wide for
Qwen3) never exist at once: each chunk's logits are made, reduced and dropped, and remade in the backward
pass (jax.checkpoint)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden_ND: jax.Array, head_DV: jax.Array, targets_N: jax.Array, mask_N: jax.Array,
                          chunk: int = 1024) -> tuple[jax.Array, jax.Array]:
    """-> (sum of masked token cross-entropies, sum of masked logsumexp^2 for the z-loss), both float32.

    hidden [N, D] in the compute dtype; head [D, V]; targets [N] int; mask [N] (1 = counts)."""
    N, D = hidden_ND.shape
    chunk = max(1, min(chunk, N))
    pad = (-N) % chunk
    if pad:
        hidden_ND = jnp.pad(hidden_ND, ((0, pad), (0, 0)))
        targets_N = jnp.pad(targets_N, (0, pad))
        mask_N = jnp.pad(mask_N, (0, pad))
    n_chunks = (N + pad) // chunk
    head = head_DV.astype(hidden_ND.dtype)

    @jax.checkpoint
    def one(h_CD, t_C, m_C):
        logits = jnp.einsum("CD,DV->CV", h_CD, head, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t_C[:, None], axis=-1)[:, 0]
        m = m_C.astype(jnp.float32)
        return jnp.sum((lse - target) * m), jnp.sum(lse * lse * m)

    ce, z = jax.lax.map(lambda a: one(*a), (hidden_ND.reshape(n_chunks, chunk, D),
                                            targets_N.reshape(n_chunks, chunk), mask_N.reshape(n_chunks, chunk)))
    return jnp.sum(ce), jnp.sum(z)

