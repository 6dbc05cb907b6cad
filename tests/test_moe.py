"""MoE routing, grouped expert compute and the load-balancing loss against references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import rel_err
from qwen_jax import moe


@pytest.mark.parametrize("norm", [True, False])
def test_grouped_experts_match_per_token_loop(rng, norm):
    T, D, F, E, K = 23, 16, 12, 6, 2
    x = rng.standard_normal((T, D)).astype(np.float32)
    wg, wu = (rng.standard_normal((E, D, F)).astype(np.float32) / 4 for _ in range(2))
    wd = rng.standard_normal((E, F, D)).astype(np.float32) / 4
    logits = rng.standard_normal((T, E)).astype(np.float32)
    w, idx = moe.route(jnp.asarray(logits), K, norm, jnp.float32)
    out = moe.grouped_expert_mlp(jnp.asarray(x), w, idx, jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.zeros((T, D))
    for t in range(T):
        top = np.argsort(-p[t])[:K]
        ws = p[t, top] / (p[t, top].sum() if norm else 1.0)
        for e, we in zip(top, ws):
            g, u = x[t] @ wg[e], x[t] @ wu[e]
            ref[t] += we * ((g / (1 + np.exp(-g)) * u) @ wd[e])
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers(rng, masked):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    L, B, T, E, K = 3, 2, 7, 8, 2
    logits = rng.standard_normal((L, B * T, E)).astype(np.float32) * 2
    mask = (rng.random((B, T)) > 0.3).astype(np.int64) if masked else None
    ref = load_balancing_loss_func(tuple(torch.tensor(l) for l in logits), E, K,
                                   None if mask is None else torch.tensor(mask))
    ours = moe.load_balancing_loss(jnp.asarray(logits), K, None if mask is None else jnp.asarray(mask.reshape(-1)))
    assert rel_err(ours, ref.numpy()) < 1e-6


def test_grouped_experts_are_differentiable(rng):
    T, D, F, E, K = 8, 8, 4, 4, 2
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    w, idx = moe.route(jnp.asarray(rng.standard_normal((T, E)), jnp.float32), K, True, jnp.float32)
    grads = jax.grad(lambda *a: jnp.sum(moe.grouped_expert_mlp(x, w, idx, *a) ** 2), argnums=(0, 1, 2))(*ws)
    used = np.unique(np.asarray(idx))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.abs(np.asarray(g)[used]).sum() > 0
        unused = np.setdiff1d(np.arange(E), used)
        assert np.abs(np.asarray(g)[unused]).sum() == 0
