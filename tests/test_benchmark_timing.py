"""benchmarks/common.py's device timing: the timed calls stay inside the jitted loop (XLA hoists
loop-invariant work out of a loop, so a loop over an unchanged call would time one call)."""

import jax.numpy as jnp
import numpy as np

from benchmarks.common import _tie, device_loop, time_device


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
    assert _tie((a, b)) == 0 and _tie((jnp.zeros(3, jnp.int32), b)) == 1


def test_time_device_gives_a_time_per_call(rng):
    a = jnp.asarray(rng.standard_normal((128, 128)), jnp.float32)
    t = time_device(lambda a: a @ a, a, iters=4, reps=3)
    assert np.isfinite(t) and 0.0 <= t < 1.0


def test_recorded_keeps_the_rows_of_an_interrupted_run(tmp_path, monkeypatch):
    import pytest

    from benchmarks import common

    monkeypatch.setattr(common, "DOC", str(tmp_path / "benchmarks.md"))
    with pytest.raises(KeyboardInterrupt):
        with common.recorded("Demo", ["a", "b"], "note") as rows:
            rows.append([1, 2.5])
            raise KeyboardInterrupt
    text = (tmp_path / "benchmarks.md").read_text()
    assert "## Demo" in text and "| 1 | 2.5 |" in text and "interrupted" in text
    with common.recorded("Empty", ["a"]):
        pass  # nothing measured: nothing recorded
    assert "Empty" not in (tmp_path / "benchmarks.md").read_text()


def test_attention_benchmark_cases_run_on_the_xla_path():
    """The attention benchmark's per-case code (checks, device timing, rows) on the CPU with impl xla."""
    from types import SimpleNamespace

    from benchmarks.attention import flash_case, paged_case

    args = SimpleNamespace(impls=["xla"], iters=2, seqs=[64])
    rows = []
    flash_case(args, rows, 1, 64, 2, 1, 64, True)
    assert rows[0][:3] == ["xla", "causal", 64] and all(isinstance(x, float) and x > 0 for x in rows[0][3:5])
    (row,) = paged_case(args, 2, 64, 16, 4, 2, 64, 2 * 2 * 64 * 2 * 64 * 2, 1e9)
    assert row[:4] == ["xla", 16, 2, 64] and isinstance(row[4], float) and row[4] > 0
