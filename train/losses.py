"""Losses. The language-model loss is chunked over tokens, so the [tokens, vocab] logits (151,936 wide for
Qwen3) never exist at once: each chunk's logits are made, reduced and dropped, and remade in the backward
pass (jax.checkpoint)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunked(chunk: int, hidden_ND, *per_token):
    """Pad N up to a multiple of the chunk and reshape: -> ([n_chunks, C, D], [n_chunks, C] for each extra)."""
    N, D = hidden_ND.shape
    chunk = max(1, min(chunk, N))
    pad = (-N) % chunk
    arrays = [hidden_ND, *per_token]
    if pad:
        arrays = [jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) for x in arrays]
    n_chunks = (N + pad) // chunk
    return [x.reshape(n_chunks, chunk, *x.shape[1:]) for x in arrays]


def chunked_cross_entropy(hidden_ND: jax.Array, head_DV: jax.Array, targets_N: jax.Array, mask_N: jax.Array,
                          chunk: int = 1024) -> tuple[jax.Array, jax.Array]:
    """-> (sum of masked token cross-entropies, sum of masked logsumexp^2 for the z-loss), both float32.

    hidden [N, D] in the compute dtype; head [D, V]; targets [N] int; mask [N] (1 = counts)."""
    head = head_DV.astype(hidden_ND.dtype)

    @jax.checkpoint
    def one(h_CD, t_C, m_C):
        logits = jnp.einsum("CD,DV->CV", h_CD, head, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t_C[:, None], axis=-1)[:, 0]
        m = m_C.astype(jnp.float32)
        return jnp.sum((lse - target) * m), jnp.sum(lse * lse * m)

    ce, z = jax.lax.map(lambda a: one(*a), tuple(_chunked(chunk, hidden_ND, targets_N, mask_N)))
    return jnp.sum(ce), jnp.sum(z)



def token_logprobs(hidden_ND: jax.Array, head_DV: jax.Array, targets_N: jax.Array, chunk: int = 1024) -> jax.Array:
    """log p(target) for every position, float32 [N], with the same chunking (no [N, V] logits at once)."""
    N = hidden_ND.shape[0]
    head = head_DV.astype(hidden_ND.dtype)

    @jax.checkpoint
    def one(h_CD, t_C):
        logits = jnp.einsum("CD,DV->CV", h_CD, head, preferred_element_type=jnp.float32)
        return jnp.take_along_axis(logits, t_C[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)

    out = jax.lax.map(lambda a: one(*a), tuple(_chunked(chunk, hidden_ND, targets_N)))
    return out.reshape(-1)[:N]
