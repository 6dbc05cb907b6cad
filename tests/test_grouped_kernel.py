"""The Pallas Mosaic GPU grouped matmul (kernels/grouped_matmul_mgpu.py), on the CPU: GPU interpret mode
(uninitialised memory reads as NaN, races detected) against a float64 per-group reference, forward and
gradients; its lowering for CUDA; and the `auto` dispatch behind a self-check. Needs only jax (it also
runs under jax 0.11 in .ci/kernels-jax011)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from conftest import mosaic_gpu_results
from kernels import _compat
from kernels import grouped_matmul as gm

pytestmark = pytest.mark.timeout(300)  # a barrier bug hangs the interpreter


@pytest.fixture(autouse=True)
def _interpreter_state():
    yield
    _compat.reset_interpret_state()


def _reference(x, w, sizes, ct):
    """float64 products and gradients; rows past the groups' total give zeros."""
    x, w, ct = (np.asarray(a, np.float64) for a in (x, w, ct))
    n = int(sizes.sum())
    g = np.repeat(np.arange(len(sizes)), sizes)
    y, dx = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x)
    y[:n] = np.einsum("mk,mkn->mn", x[:n], w[g])
    dx[:n] = np.einsum("mn,mkn->mk", ct[:n], w[g])
    dw = np.zeros_like(w)
    np.add.at(dw, g, np.einsum("mk,mn->mkn", x[:n], ct[:n]))
    return y, dx, dw


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_matches_a_per_group_reference(rng, dtype):
    """Sizes that are not block multiples, an empty group, a group of several blocks, and rows past the
    groups' total (expert parallelism), in one call: forward, dx and dW."""
    sizes = np.array([70, 0, 30, 1])
    M, K, N = 120, 64, 128  # 19 rows past the total; N = 128: two column tiles of 64
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = jnp.asarray(rng.standard_normal((4, K, N)) / 8, dtype)
    ct = jnp.asarray(rng.standard_normal((M, N)), dtype)
    fn = jax.jit(lambda x, w: gm.grouped_matmul(x, w, jnp.asarray(sizes), impl="pallas", interpret=True))
    y, vjp = jax.vjp(fn, x, w)
    dx, dw = vjp(ct)
    assert not _compat.races_found()
    for ours, ref in zip((y, dx, dw), _reference(x, w, sizes, ct)):
        assert ours.dtype == dtype
        ours = np.asarray(ours, np.float64)
        assert np.isfinite(ours).all()
        assert np.abs(ours - ref).max() <= 1e-2 * np.abs(ref).max()
    assert not np.asarray(dw, np.float64)[1].any()  # the empty group gets no gradient


@pytest.mark.parametrize("transposed", [False, True])
def test_kernels_lower_for_cuda(transposed):
    """Both kernels lower to Mosaic GPU calls for CUDA (on any machine), with the weight read transposed in
    SMEM for dx: one call per kernel, outputs in the input dtype (dW in float32)."""
    sd = jax.ShapeDtypeStruct
    E, K, N, NB = 8, 128, 256, 6
    x, bg, used = sd((NB * 64, K if not transposed else N), jnp.bfloat16), sd((NB,), jnp.int32), sd((), jnp.int32)
    w = sd((E, K, N), jnp.bfloat16)
    gemm = jax.jit(lambda x, bg, used, w: gm.mgpu.block_gemm(x, bg, used, w, b_transposed=transposed))
    (results,) = mosaic_gpu_results(gemm.trace(x, bg, used, w).lower(lowering_platforms=("cuda",)).as_text())
    assert results == [f"{NB * 64}x{N if not transposed else K}xbf16"]
    dwk = jax.jit(lambda x, dy, f, c: gm.mgpu.group_gemm_t(x, dy, f, c, E))
    text = dwk.trace(sd((NB * 64, K), jnp.bfloat16), sd((NB * 64, N), jnp.bfloat16), sd((E,), jnp.int32),
                     sd((E,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert mosaic_gpu_results(text) == [[f"{E}x{K}x{N}xf32"]]


def test_dispatch_and_self_check(monkeypatch):
    """auto takes the kernels on a Hopper+ GPU only once the self-check passed there, and never for inputs
    they cannot take; impl="pallas" names what it cannot take; a broken kernel fails its self-check with a
    warning (auto then falls back) instead of breaking the caller."""
    x, w = jnp.zeros((16, 64), jnp.bfloat16), jnp.zeros((4, 64, 128), jnp.bfloat16)
    assert gm.grouped_matmul_impl("auto", x, w) == "blocked"  # this CPU
    monkeypatch.setattr(kernels, "_hopper_or_newer", lambda: True)
    monkeypatch.setattr(kernels, "_self_check", lambda *a: False)
    assert gm.grouped_matmul_impl("auto", x, w) == "blocked"
    monkeypatch.setattr(kernels, "_self_check", lambda *a: True)
    assert gm.grouped_matmul_impl("auto", x, w) == "pallas"
    assert gm.grouped_matmul_impl("auto", x.astype(jnp.float32), w.astype(jnp.float32)) == "blocked"
    assert gm.grouped_matmul_impl("auto", x[:, :48], w[:, :48]) == "blocked"  # K not a multiple of 64
    with pytest.raises(ValueError, match="bf16/fp16"):
        gm.grouped_matmul(x.astype(jnp.float32), w.astype(jnp.float32), jnp.full((4,), 4), impl="pallas")
    monkeypatch.undo()

    check = kernels._self_check.__wrapped__  # uncached
    assert check("grouped", "bfloat16", 0, True) is True  # the real kernels, interpreted
    assert not _compat.races_found()

    def broken(*args, **kw):
        raise RuntimeError("ptxas: out of registers")

    monkeypatch.setattr(gm.mgpu, "block_gemm", broken)
    with pytest.warns(RuntimeWarning, match="grouped kernel .* failed its self-check .* out of registers"):
        assert check("grouped", "bfloat16", 0, True) is False
