"""Losses. The language-model losses are chunked over tokens, so the [tokens, vocab] logits (151,936 wide
for Qwen3) never exist at once: each chunk's logits are made, reduced and dropped. The cross-entropy makes
its gradient in the same pass (see `cross_entropy`); per-token log-probs (DPO) remake each chunk's logits in
the backward pass (jax.checkpoint), since their gradient depends on the cotangent of every token."""

from __future__ import annotations

import functools

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


def cross_entropy(hidden_ND: jax.Array, head: jax.Array, targets_N: jax.Array, mask_N: jax.Array,
                  z_weight: float = 0.0, chunk: int = 1024, head_axes: str = "DV"
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """-> (loss = ce + z_weight * z, ce, z): ce is the sum of masked token cross-entropies and z the sum of
    masked logsumexp^2 (the z-loss), all float32. Only `loss` carries a gradient (ce and z are values).

    hidden [N, D] in the compute dtype; head [D, V], or [V, D] with head_axes="VD" (a tied embedding as
    stored: no transposed copy of it is made); targets [N] int; mask [N] (1 = counts).

    The gradient is made in the forward pass, chunk by chunk, while each chunk's logits exist: dlogits =
    mask * (softmax * (1 + 2 z_weight lse) - onehot(target)), then d_hidden = dlogits head^T and d_head +=
    hidden^T dlogits. That is three [C, D] x [D, V] products per chunk, the least there is, where
    rematerialising the logits in the backward pass would take four. The first chunk's d_head starts the
    sum (no zeroed [D, V] buffer). Without differentiation only the loss is computed."""
    _check_axes(head_axes)
    head = head.astype(hidden_ND.dtype)
    loss, ce, z = _fused_ce(hidden_ND, head, targets_N, mask_N, float(z_weight), int(chunk), head_axes)
    return loss, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(z)


def _check_axes(head_axes: str) -> None:
    if head_axes not in ("DV", "VD"):
        raise ValueError(f"head_axes must be 'DV' or 'VD', got {head_axes!r}")


def _ce_chunk(h_CD, head, t_C, m_C, axes):
    """One chunk -> (exp(logits - row max) [C, V] f32, its row sums, lse [C], ce sum, z sum): one exp pass
    gives both the lse and (divided by the row sums) the softmax."""
    logits = jnp.einsum(f"CD,{axes}->CV", h_CD, head, preferred_element_type=jnp.float32)
    mx = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    e = jnp.exp(logits - mx[:, None])
    total = jnp.sum(e, axis=-1)
    lse = mx + jnp.log(total)
    target = jnp.take_along_axis(logits, t_C[:, None], axis=-1)[:, 0]
    m = m_C.astype(jnp.float32)
    return e, total, lse, jnp.sum((lse - target) * m), jnp.sum(lse * lse * m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_ce(hidden_ND, head, targets_N, mask_N, z_weight, chunk, axes):
    def one(a):
        h_CD, t_C, m_C = a
        return _ce_chunk(h_CD, head, t_C, m_C, axes)[3:]

    ce, z = jax.lax.map(one, tuple(_chunked(chunk, hidden_ND, targets_N, mask_N)))
    ce, z = jnp.sum(ce), jnp.sum(z)
    return ce + z_weight * z, ce, z


def _fused_ce_fwd(hidden_ND, head, targets_N, mask_N, z_weight, chunk, axes):
    N, D = hidden_ND.shape
    dt = hidden_ND.dtype
    acc = jnp.promote_types(head.dtype, jnp.float32)

    def grads(a):  # one chunk -> (ce, z, d_hidden [C, D], its d_head term)
        h_CD, t_C, m_C = a
        e, total, lse, ce, z = _ce_chunk(h_CD, head, t_C, m_C, axes)
        m = m_C.astype(jnp.float32)
        p = e * ((1.0 + 2.0 * z_weight * lse) * m / total)[:, None]
        dlogits = p.at[jnp.arange(t_C.shape[0]), t_C].add(-m).astype(dt)  # [C, V]
        dh = jnp.einsum(f"CV,{axes}->CD", dlogits, head, preferred_element_type=jnp.float32).astype(dt)
        dhead = jnp.einsum(f"CD,CV->{axes}", h_CD, dlogits, preferred_element_type=jnp.float32).astype(acc)
        return ce, z, dh, dhead

    def step(dhead, a):
        ce, z, dh, part = grads(a)
        return dhead + part, (ce, z, dh)

    chunks = _chunked(chunk, hidden_ND, targets_N, mask_N)
    ce0, z0, dh0, dhead = grads(tuple(x[0] for x in chunks))  # the first chunk's d_head starts the sum
    dhead, (ce, z, dh) = jax.lax.scan(step, dhead, tuple(x[1:] for x in chunks))  # length 0 for one chunk
    dh = jnp.concatenate([dh0[None], dh])
    ce, z = ce0 + jnp.sum(ce), z0 + jnp.sum(z)
    return (ce + z_weight * z, ce, z), (dh.reshape(-1, D)[:N], dhead.astype(head.dtype))


def _fused_ce_bwd(z_weight, chunk, axes, res, g):
    dh, dhead = res
    g_loss = g[0]  # ce and z leave through stop_gradient: their cotangents are zero
    return (dh * g_loss.astype(dh.dtype), dhead * g_loss.astype(dhead.dtype), None, None)


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def token_logprobs(hidden_ND: jax.Array, head: jax.Array, targets_N: jax.Array, chunk: int = 1024,
                   entropy: bool = False, head_axes: str = "DV"):
    """log p(target) for every position, float32 [N], with the same chunking (no [N, V] logits at once).
    With entropy=True also the distribution's entropy at every position [N] (a value: no gradient).
    head: [D, V], or [V, D] with head_axes="VD" (as in `cross_entropy`)."""
    N = hidden_ND.shape[0]
    _check_axes(head_axes)
    head = head.astype(hidden_ND.dtype)

    @jax.checkpoint
    def one(h_CD, t_C):
        logits = jnp.einsum(f"CD,{head_axes}->CV", h_CD, head, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, t_C[:, None], axis=-1)[:, 0] - lse
        if not entropy:
            return lp
        p = jax.lax.stop_gradient(jnp.exp(logits - lse[:, None]))
        return lp, jax.lax.stop_gradient(lse - jnp.sum(p * logits, axis=-1))

    out = jax.lax.map(lambda a: one(*a), tuple(_chunked(chunk, hidden_ND, targets_N)))
    if entropy:
        return out[0].reshape(-1)[:N], out[1].reshape(-1)[:N]
    return out.reshape(-1)[:N]
