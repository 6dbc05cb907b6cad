"""Mixture-of-experts pieces: router, sorted grouped expert matmul, load-balancing loss.

Routing follows HF Qwen3-MoE exactly: router logits in the compute dtype, softmax in float32, top-k,
renormalise the k weights only when `norm_topk_prob`, then cast to the compute dtype.
Expert compute sorts the (token, expert) assignments by expert and runs one grouped matmul per projection
(kernels/grouped_matmul.py): every expert's tokens form a contiguous group, and the work is that of the
assignments that exist (top-k), not of every expert.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.grouped_matmul import grouped_matmul


def route(router_logits_TE: jax.Array, top_k: int, norm_topk_prob: bool, dtype) -> tuple[jax.Array, jax.Array]:
    """-> (weights [T, k] in `dtype`, expert ids [T, k] int32)."""
    probs = jax.nn.softmax(router_logits_TE.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(dtype), experts.astype(jnp.int32)


def grouped_expert_mlp(x_TD: jax.Array, weights_TK: jax.Array, experts_TK: jax.Array,
                       w_gate_EDF: jax.Array, w_up_EDF: jax.Array, w_down_EFD: jax.Array, *, impl: str = "auto",
                       unroll: bool = False) -> jax.Array:
    """SwiGLU experts applied to each token's k chosen experts, weighted and summed. -> [T, D].
    `impl` and `unroll`: see kernels.grouped_matmul."""
    T, D = x_TD.shape
    K = experts_TK.shape[1]
    E = w_gate_EDF.shape[0]
    flat_experts = experts_TK.reshape(-1)  # [T*K]
    order = jnp.argsort(flat_experts, stable=True)  # assignments grouped by expert
    group_sizes = jnp.bincount(flat_experts, length=E).astype(jnp.int32)  # [E]
    x_sorted = jnp.take(x_TD, order // K, axis=0)  # [T*K, D]
    mm = functools.partial(grouped_matmul, group_sizes_E=group_sizes, impl=impl, unroll=unroll)
    gate = mm(x_sorted, w_gate_EDF)  # [T*K, F]
    up = mm(x_sorted, w_up_EDF)
    h = (jax.nn.silu(gate) * up).astype(x_TD.dtype)
    y_sorted = mm(h, w_down_EFD)  # [T*K, D]
    inverse = jnp.argsort(order)  # back to (token, k) order
    y_TKD = jnp.take(y_sorted, inverse, axis=0).reshape(T, K, D)
    out = jnp.einsum("TKD,TK->TD", y_TKD.astype(x_TD.dtype), weights_TK, preferred_element_type=jnp.float32)
    return out.astype(x_TD.dtype)


def load_balancing_loss(router_logits_LTE: jax.Array, top_k: int, mask_T: jax.Array | None = None) -> jax.Array:
    """Switch-Transformer auxiliary loss, as transformers' `load_balancing_loss_func`.

    router_logits [L, T, E] (all MoE layers, flattened tokens); mask [T] (1 = real token) or None.
    Returns E * sum_e(fraction of top-k assignments to e * mean router prob of e), pooled over layers."""
    L, T, E = router_logits_LTE.shape
    probs = jax.nn.softmax(router_logits_LTE.astype(jnp.float32), axis=-1)  # [L, T, E]
    _, chosen = jax.lax.top_k(probs, top_k)  # [L, T, k]
    counts = jax.nn.one_hot(chosen, E, dtype=jnp.float32).sum(axis=2)  # [L, T, E]
    m = jnp.ones((T,), jnp.float32) if mask_T is None else mask_T.astype(jnp.float32)
    rows = L * jnp.sum(m)
    tokens_per_expert = jnp.einsum("LTE,T->E", counts, m) / rows
    prob_per_expert = jnp.einsum("LTE,T->E", probs, m) / rows
    return E * jnp.sum(tokens_per_expert * prob_per_expert)
