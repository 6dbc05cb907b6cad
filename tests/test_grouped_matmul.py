"""The grouped expert matmul (kernels/grouped_matmul.py) against a per-group float64 reference, forward and
gradients, and its compiled FLOPs against the useful FLOPs (XLA cost analysis: deterministic, no timing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.grouped_matmul import block_size, grouped_matmul
from qwen_jax import moe


def _reference(x, w, sizes, ct):
    """float64 per-row products and their gradients for the cotangent ct."""
    x, w, ct = (np.asarray(a, np.float64) for a in (x, w, ct))
    g = np.repeat(np.arange(len(sizes)), sizes)
    y = np.einsum("mk,mkn->mn", x, w[g])
    dx = np.einsum("mn,mkn->mk", ct, w[g])
    dw = np.zeros_like(w)
    np.add.at(dw, g, np.einsum("mk,mn->mkn", x, ct))
    return y, dx, dw


@pytest.mark.parametrize("case", ["random", "empty_groups", "all_on_one", "ragged_sizes", "one_row"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_matches_a_per_group_reference(case, dtype, tol, rng):
    E, K, N = 6, 24, 40
    sizes = {"random": rng.multinomial(90, np.ones(E) / E),
             "empty_groups": np.array([0, 37, 0, 0, 11, 0]),
             "all_on_one": np.array([0, 0, 0, 64, 0, 0]),
             "ragged_sizes": np.array([1, 9, 17, 3, 8, 15]),  # none a multiple of the block
             "one_row": np.array([0, 0, 1, 0, 0, 0])}[case]
    M = int(sizes.sum())
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = jnp.asarray(rng.standard_normal((E, K, N)) / np.sqrt(K), dtype)
    ct = jnp.asarray(rng.standard_normal((M, N)), dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    fn = jax.jit(lambda x, w: grouped_matmul(x, w, gs, block=8))
    y, vjp = jax.vjp(fn, x, w)
    dx, dw = vjp(ct)
    ref_y, ref_dx, ref_dw = _reference(x.astype(jnp.float32), w.astype(jnp.float32), sizes, ct.astype(jnp.float32))
    for ours, ref in ((y, ref_y), (dx, ref_dx), (dw, ref_dw)):
        ours = np.asarray(ours, np.float64)
        assert np.abs(ours - ref).max() <= tol * max(np.abs(ref).max(), 1.0)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    if case == "empty_groups":
        assert not np.asarray(dw, np.float64)[[0, 2, 3, 5]].any()  # groups with no rows get no gradient


def test_rows_past_the_groups_total_are_zero(rng):
    """Group sizes summing to less than M (expert parallelism sorts other devices' rows last): those rows
    give zeros and get no gradient, and the rest match the reference."""
    sizes = np.array([3, 0, 14, 6])
    M, K, N = 40, 16, 24  # 17 rows past the groups' total
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, K, N)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
    y, vjp = jax.vjp(jax.jit(lambda x, w: grouped_matmul(x, w, jnp.asarray(sizes), block=8)), x, w)
    dx, dw = vjp(ct)
    n = int(sizes.sum())
    ref_y, ref_dx, ref_dw = _reference(x[:n], w, sizes, ct[:n])
    np.testing.assert_allclose(y[:n], ref_y, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx[:n], ref_dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-4)
    assert not np.asarray(y[n:]).any() and not np.asarray(dx[n:]).any()


def test_ragged_dot_impl_agrees(rng):
    sizes = np.array([5, 0, 12, 7])
    x = jnp.asarray(rng.standard_normal((24, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 16, 8)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    np.testing.assert_allclose(grouped_matmul(x, w, gs), grouped_matmul(x, w, gs, impl="ragged"), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="impl must be one of"):
        grouped_matmul(x, w, gs, impl="dense")


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_moe_layer_compiles_to_the_active_flops():
    """A training-shaped MoE MLP (8,192 tokens... scaled: 2,048 tokens, 32 experts, top 4): the compiled
    FLOPs of forward and backward stay within 1.5x the useful (top-k) FLOPs, not E/k times them."""
    T, D, F, E, k = 2048, 256, 128, 32, 4
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (T, D), jnp.float32)
    logits = jax.random.normal(keys[1], (T, E), jnp.float32)
    wg, wu = (jax.random.normal(kk, (E, D, F), jnp.float32) * 0.05 for kk in keys[2:4])
    wd = jax.random.normal(keys[4], (E, F, D), jnp.float32) * 0.05
    weights, experts = moe.route(logits, k, True, jnp.float32)

    def layer(x, wg, wu, wd):
        return moe.grouped_expert_mlp(x, weights, experts, wg, wu, wd, unroll=True)

    useful = 3 * 2 * T * k * D * F  # three projections over T*k rows
    fwd = _flops(layer, x, wg, wu, wd)
    assert fwd <= 1.5 * useful, (fwd / useful, block_size(T * k, E))
    grad = _flops(lambda *a: jax.grad(lambda *b: jnp.sum(layer(*b) ** 2), argnums=(0, 1, 2, 3))(*a), x, wg, wu, wd)
    assert grad <= 1.5 * 3 * useful, grad / (3 * useful)  # forward + dx + dw
    ragged = _flops(lambda *a: moe.grouped_expert_mlp(x, weights, experts, *a[1:], impl="ragged"), x, wg, wu, wd)
    print(f"compiled / useful FLOPs: blocked {fwd / useful:.2f}x, ragged_dot {ragged / useful:.2f}x")
