"""The SwiGLU MLP's hand-written backward pass (qwen_jax.swiglu) against autodiff of the same formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from qwen_jax.swiglu import swiglu


def autodiff_swiglu(x, wg, wu, wd):
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(jnp.einsum("BTD,DF->BTF", x, wg)) * jnp.einsum("BTD,DF->BTF", x, wu), wd)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_swiglu_values_and_gradients_equal_autodiff(rng, dtype, tol):
    B, T, D, F = 2, 5, 16, 24
    x = rng.standard_normal((B, T, D)) * 2  # gate pre-activations of both signs and |g| > 4
    wg, wu = (rng.standard_normal((D, F)) / np.sqrt(D) * 2 for _ in range(2))
    wd = rng.standard_normal((F, D)) / np.sqrt(F)
    w = rng.standard_normal((B, T, D))
    args = [jnp.asarray(a, dtype) for a in (x, wg, wu, wd)]
    cot = jnp.asarray(w, dtype)

    def loss(fn):
        return lambda *a: jnp.sum((fn(*a) * cot).astype(jnp.float32))

    assert rel_err(swiglu(*args), autodiff_swiglu(*args)) < tol
    ours = jax.grad(loss(swiglu), argnums=(0, 1, 2, 3))(*args)
    ref = jax.grad(loss(autodiff_swiglu), argnums=(0, 1, 2, 3))(*args)
    for name, a, b in zip(("x", "gate", "up", "down"), ours, ref):
        assert a.dtype == dtype, name
        assert rel_err(a, b) < tol, name


def test_swiglu_applies_the_placement_to_the_hidden_activation_and_its_cotangent():
    seen = []

    def place(h):
        seen.append(h.shape)
        return h

    x, wg, wu, wd = jnp.ones((1, 3, 4)), jnp.ones((4, 6)), jnp.ones((4, 6)), jnp.ones((6, 4))
    jax.grad(lambda x: jnp.sum(swiglu(x, wg, wu, wd, place)))(x)
    assert seen == [(1, 3, 6), (1, 3, 6)]
