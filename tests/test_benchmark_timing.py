"""benchmarks/common.py's device timing: the timed calls stay inside the jitted loop (XLA hoists
loop-invariant work out of a loop, so a loop over an unchanged call would time one call)."""

import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_loop, time_device


def _entry(text: str) -> str:
    start = text.index("\nENTRY")
    return text[start:text.index("\n}", start)]


def test_the_loop_keeps_every_call_inside(rng):
    a = jnp.asarray(rng.standard_normal((256, 256)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((256, 256)), jnp.float32)
    f = lambda a, b: (a @ b, jnp.tanh(a).sum())  # noqa: E731
    loop = device_loop(f, (a, b), 5)
    text = loop.lower(a, b).compile().as_text()
    entry = _entry(text)
    assert "while(" in entry and "dot(" in text
    assert "dot(" not in entry and "ynn_fusion" not in entry and "tanh" not in entry, entry
    out = loop(a, b)
    np.testing.assert_allclose(out[0], a @ b, rtol=1e-5, atol=1e-4)  # the last call's outputs, unchanged
    assert loop.tie == 0


def test_time_device_gives_a_time_per_call(rng):
    a = jnp.asarray(rng.standard_normal((128, 128)), jnp.float32)
    t = time_device(lambda a: a @ a, a, iters=4, reps=3)
    assert np.isfinite(t) and 0.0 <= t < 1.0
