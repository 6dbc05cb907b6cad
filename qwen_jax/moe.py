"""Mixture-of-experts pieces: router, sorted grouped expert matmul, load-balancing loss.

Routing follows HF Qwen3-MoE exactly: router logits in the compute dtype, softmax in float32, top-k,
renormalise the k weights only when `norm_topk_prob`, then cast to the compute dtype.
Expert compute sorts the (token, expert) assignments by expert and runs one grouped matmul per projection
(kernels/grouped_matmul.py): every expert's tokens form a contiguous group, and the work is that of the
assignments that exist (top-k), not of every expert. On a mesh with an `expert` axis the experts stay on
their devices and the tokens travel (`expert_parallel_mlp`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels.grouped_matmul import grouped_matmul


def route(router_logits_TE: jax.Array, top_k: int, norm_topk_prob: bool, dtype,
          experts_TK: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """-> (weights [T, k] in `dtype`, expert ids [T, k] int32). Given `experts_TK` (routing replay: e.g. the
    ones the inference engine chose), those experts, weighted by this router's probabilities (so the router
    still learns); else the top k."""
    probs = jax.nn.softmax(router_logits_TE.astype(jnp.float32), axis=-1)
    if experts_TK is None:
        weights, experts_TK = jax.lax.top_k(probs, top_k)
    else:
        weights = jnp.take_along_axis(probs, experts_TK, axis=-1)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(dtype), experts_TK.astype(jnp.int32)


def grouped_expert_mlp(x_TD: jax.Array, weights_TK: jax.Array, experts_TK: jax.Array,
                       w_gate_EDF: jax.Array, w_up_EDF: jax.Array, w_down_EFD: jax.Array, *, impl: str = "auto",
                       unroll: bool = False) -> jax.Array:
    """SwiGLU experts applied to each token's k chosen experts, weighted and summed. -> [T, D].
    `impl` and `unroll`: see kernels.grouped_matmul."""
    out = _experts(x_TD, weights_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, impl, unroll)
    return out.astype(x_TD.dtype)


def _experts(x_TD, weights_TK, groups_TK, w_gate_EDF, w_up_EDF, w_down_EFD, impl, unroll=False):
    """The weighted sum over each token's assignments -> [T, D] float32. groups [T, K] index the E experts
    of the weights given; an id of E or more means "not here" (that assignment adds nothing and costs
    nothing: it sorts last, past the grouped matmul's groups)."""
    T, D = x_TD.shape
    K = groups_TK.shape[1]
    E = w_gate_EDF.shape[0]
    flat = jnp.minimum(groups_TK.reshape(-1), E)  # [T*K]
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert, the absent ones last
    group_sizes = jnp.bincount(flat, length=E + 1)[:E].astype(jnp.int32)  # [E]
    x_sorted = jnp.take(x_TD, order // K, axis=0)  # [T*K, D]
    mm = functools.partial(grouped_matmul, group_sizes_E=group_sizes, impl=impl, unroll=unroll)
    gate = mm(x_sorted, w_gate_EDF)  # [T*K, F]
    up = mm(x_sorted, w_up_EDF)
    h = (jax.nn.silu(gate) * up).astype(x_TD.dtype)
    y_sorted = mm(h, w_down_EFD)  # [T*K, D]
    inverse = jnp.argsort(order)  # back to (token, k) order
    y_TKD = jnp.take(y_sorted, inverse, axis=0).reshape(T, K, D)
    return jnp.einsum("TKD,TK->TD", y_TKD.astype(x_TD.dtype), weights_TK, preferred_element_type=jnp.float32)


def expert_parallel(rules) -> bool:
    """Whether the mesh splits experts (an `expert` axis of size > 1)."""
    return rules is not None and rules.mesh.shape.get("expert", 1) > 1


def expert_parallel_mlp(x_TD: jax.Array, weights_TK: jax.Array, experts_TK: jax.Array, w_gate_EDF: jax.Array,
                        w_up_EDF: jax.Array, w_down_EFD: jax.Array, rules, *, impl: str = "auto") -> jax.Array:
    """grouped_expert_mlp with the experts split over the mesh's `expert` axis (X devices, E/X experts each;
    their width may also be split over `tensor`). No expert weight moves: per layer, each device gathers
    the tokens of its `expert` group (all-gather of [T, D]), runs its own experts on the assignments routed
    to them (the others sort last and cost nothing), and the partial outputs are summed and handed back to
    the tokens' devices (reduce-scatter of [T, D]). Exact: no capacity factor, no dropped token."""
    mesh = rules.mesh
    T, D = x_TD.shape
    E, _, F = w_gate_EDF.shape
    tok = rules.spec(("act_batch",), (T,))[0]
    tok_axes = () if tok is None else (tok,) if isinstance(tok, str) else tuple(tok)
    gather = "expert" in tok_axes
    e_ax = rules.spec(("expert",), (E,))[0]
    f_ax = rules.spec(("expert_mlp",), (F,))[0]
    if e_ax != "expert":
        raise ValueError(f"expert parallelism needs the experts ({E}) divisible by the expert axis "
                         f"({mesh.shape['expert']})")

    def body(x, wts, ex, wg, wu, wd):
        if gather:
            x, wts, ex = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (x, wts, ex))
        first = jax.lax.axis_index("expert") * wg.shape[0]
        local = ex - first
        groups = jnp.where((local >= 0) & (local < wg.shape[0]), local, wg.shape[0])  # [T', K]
        out = _experts(x, wts, groups, wg, wu, wd, impl)  # [T', D] float32, this device's experts only
        if f_ax is not None:
            out = jax.lax.psum(out, f_ax)
        if gather:
            return jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True)
        return jax.lax.psum(out, "expert")

    rows = P(tok, None)
    out = jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, rows, P(e_ax, None, f_ax), P(e_ax, None, f_ax),
                                                   P(e_ax, f_ax, None)), out_specs=rows)(
        x_TD, weights_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD)
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
