"""The Pallas Mosaic GPU paged-attention kernel, on the CPU: GPU interpret mode (uninitialised memory reads
as NaN, race detection on) against the gather-then-attend reference, and the full lowering to Mosaic GPU
for CUDA. Every case draws fresh inputs: ragged lengths (including 0 and lengths shorter than the query),
shuffled block tables, and NaN in every page no sequence owns, so a read through a wrong page shows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from conftest import mosaic_gpu_results
from kernels import _compat
from kernels.paged_attention import (PagedConfig, combine_splits, num_splits, paged_attention_forward,
                                     paged_attention_reference)

pytestmark = pytest.mark.timeout(300)  # a barrier bug hangs the interpreter


@pytest.fixture(autouse=True)
def _interpreter_state():
    yield
    _compat.reset_interpret_state()


def _inputs(rng, B, T, N, K, D, BS, max_blocks, dtype=jnp.bfloat16, layers=None):
    """q, pools, block tables (each sequence's pages drawn at random from a pool with spare pages; the
    spare ones, page 0 among them, hold NaN) and ragged lengths: the last sequence fills its table, one
    is empty and one is shorter than T when B allows."""
    NB = B * max_blocks + 5
    owned = 1 + rng.permutation(NB - 1)[: B * max_blocks]
    block_tables = owned.reshape(B, max_blocks).astype(np.int32)
    lengths = rng.integers(1, max_blocks * BS + 1, B)
    lengths[-1] = max_blocks * BS
    if B > 1:
        lengths[0] = 0
    if B > 2:
        lengths[1] = rng.integers(0, T) if T > 1 else 1
    shape = (NB, BS, K, D) if layers is None else (layers, NB, BS, K, D)
    spare = np.setdiff1d(np.arange(NB), owned)
    pools = []
    for _ in range(2):
        x = rng.standard_normal(shape).astype(np.float32)
        x[..., spare, :, :, :] = np.nan
        pools.append(jnp.asarray(x, dtype))
    q = jnp.asarray(rng.standard_normal((B, T, N, D)), dtype)
    return q, pools[0], pools[1], jnp.asarray(block_tables), jnp.asarray(lengths, jnp.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


# jax 0.10's interpreter runs the fallback formulation (K read from a transposed copy) on two cases;
# .ci/kernels-jax011 runs all of them as they run on hardware (K transposed in SMEM).
JAX011 = pytest.mark.skipif(_compat.JAX_VERSION < (0, 11), reason="run under jax 0.11 by .ci/kernels-jax011")
CASES = [  # B, Tq, Hq, Hkv, head_dim, block_size, max_blocks, splits
    pytest.param(3, 1, 4, 2, 64, 16, 9, 1, marks=JAX011),  # decode, GQA 2, four 16-token pages per tile
    (3, 1, 8, 1, 128, 8, 20, 3),     # decode, MQA (8 heads share one kv head), split-K with the combine
    (4, 5, 4, 2, 64, 32, 5, None),   # chunked prefill / verification: 5 query tokens, rows from two tokens
    pytest.param(2, 1, 2, 1, 64, 128, 2, 2, marks=JAX011),  # pages larger than a tile: part of a page a step
    pytest.param(2, 1, 8, 2, 128, 64, 6, 2, marks=JAX011),  # pages of one tile, split-K, GQA 4
]


@pytest.mark.parametrize("B,T,N,K,D,BS,max_blocks,splits", CASES)
def test_matches_reference(rng, B, T, N, K, D, BS, max_blocks, splits):
    q, kp, vp, bt, lens = _inputs(rng, B, T, N, K, D, BS, max_blocks)
    out = paged_attention_forward(q, kp, vp, bt, lens, scale=D ** -0.5, config=PagedConfig(num_splits=splits),
                                  interpret=True)
    ref = paged_attention_reference(q.astype(jnp.float32), kp.astype(jnp.float32), vp.astype(jnp.float32), bt, lens)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not np.isnan(np.asarray(out, np.float32)).any()
    assert _rel(out, ref) <= 2e-2
    assert not _compat.races_found()


def test_whole_pool_with_a_traced_layer_under_jit(rng):
    q, kp, vp, bt, lens = _inputs(rng, 2, 2, 4, 2, 64, 16, 6, dtype=jnp.float16, layers=3)
    f = jax.jit(lambda q, kp, vp, bt, lens, layer: kernels.paged_attention(q, kp, vp, bt, lens, layer=layer,
                                                                           impl="pallas", interpret=True))
    out = f(q, kp, vp, bt, lens, jnp.int32(2))
    ref = paged_attention_reference(q.astype(jnp.float32), kp[2].astype(jnp.float32), vp[2].astype(jnp.float32),
                                    bt, lens)
    assert _rel(out, ref) <= 2e-2
    assert not _compat.races_found()


def test_combine_splits_equals_one_softmax(rng):
    """Merging per-split (normalised output, log-sum-exp) pairs gives the softmax over all keys; a row with
    no key in any split gives 0."""
    S, R, D, n = 3, 4, 8, 12
    logits = rng.standard_normal((R, S * n))
    logits[3] = -np.inf
    v = rng.standard_normal((S * n, D))
    parts, lses = [], []
    for s in range(S):
        x = logits[:, s * n:(s + 1) * n]
        m = np.max(x, axis=1, keepdims=True)
        w = np.exp(x - np.where(np.isfinite(m), m, 0))
        den = w.sum(1, keepdims=True)
        parts.append(np.where(den > 0, w @ v[s * n:(s + 1) * n] / np.maximum(den, 1e-30), 0))
        with np.errstate(divide="ignore"):
            lses.append(np.log(den[:, 0]) + m[:, 0])
    out = np.asarray(combine_splits(jnp.asarray(np.stack(parts), jnp.float32),
                                    jnp.asarray(np.stack(lses), jnp.float32)))
    p = np.exp(logits[:3] - logits[:3].max(1, keepdims=True))
    np.testing.assert_allclose(out[:3], (p / p.sum(1, keepdims=True)) @ v, rtol=1e-5, atol=1e-6)
    assert (out[3] == 0).all()


def test_split_heuristic():
    assert num_splits(programs=4, max_steps=64, requested=None) > 1  # few programs, long context: split
    assert num_splits(programs=4096, max_steps=64, requested=None) == 1  # the grid already fills the GPU
    assert num_splits(programs=4, max_steps=3, requested=None) == 1  # too short to split
    assert num_splits(programs=4, max_steps=3, requested=8) == 3  # never more splits than key tiles
    with pytest.raises(ValueError, match="num_splits"):
        num_splits(4, 8, requested=0)


@pytest.mark.parametrize("T,D,BS,dtype,splits,pool", [
    (1, 128, 16, jnp.bfloat16, 1, True),
    (1, 128, 128, jnp.bfloat16, 4, False),
    (4, 64, 8, jnp.float16, 2, False),
])
def test_lowers_for_cuda(T, D, BS, dtype, splits, pool):
    B, N, K, NB, MB = 4, 32, 8, 256, 2048 // BS
    sd = jax.ShapeDtypeStruct
    pages = (2, NB, BS, K, D) if pool else (NB, BS, K, D)

    def f(q, kp, vp, bt, lens, layer):
        return paged_attention_forward(q, kp, vp, bt, lens, scale=D ** -0.5, layer=layer if pool else None,
                                       config=PagedConfig(num_splits=splits))

    args = (sd((B, T, N, D), dtype), sd(pages, dtype), sd(pages, dtype), sd((B, MB), jnp.int32),
            sd((B,), jnp.int32), sd((), jnp.int32))
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    ty = {jnp.bfloat16: "bf16", jnp.float16: "f16"}[dtype]
    # One kernel call writing the rows (query token x group head, rounded up to 8: only the real ones) of
    # every (sequence, kv head) and their log-sum-exps: float32 partials with split-K (combined outside),
    # else the input dtype.
    (results,) = mosaic_gpu_results(text)
    out_ty = "f32" if splits > 1 else ty
    rows = -(-T * (N // K) // 8) * 8
    assert results == [f"{B}x{K}x{splits}x{rows}x{D}x{out_ty}", f"{B}x{K}x{splits}x{rows}xf32"], results
    assert "dot_general" not in text  # the attention math is all inside the kernel


def test_dispatch():
    q = jnp.zeros((2, 1, 4, 64), jnp.bfloat16)
    pages = jnp.zeros((6, 16, 2, 64), jnp.bfloat16)
    bt, lens = jnp.zeros((2, 3), jnp.int32), jnp.asarray([3, 20], jnp.int32)
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.paged_attention(q, pages, pages, bt, lens, impl="triton")
    assert kernels.paged_attention_impl("auto", q, pages) == "xla"  # CPU
    assert kernels.paged_attention_impl("auto", q, pages, interpret=True) == "pallas"
    long_q = jnp.zeros((2, 200, 4, 64), jnp.bfloat16)  # 400 rows per kv head: a prefill chunk goes to XLA
    assert kernels.paged_attention_impl("auto", long_q, pages, interpret=True) == "xla"
    with pytest.raises(ValueError, match="block_size"):
        kernels.paged_attention(q, jnp.zeros((6, 12, 2, 64), jnp.bfloat16), pages, bt, lens, impl="pallas")
    with pytest.raises(ValueError, match="bf16/fp16"):
        kernels.paged_attention(q.astype(jnp.float32), pages, pages, bt, lens, impl="pallas")
    with pytest.raises(ValueError, match="one query token"):
        kernels.paged_attention(jnp.zeros((2, 3, 4, 64), jnp.bfloat16), pages, pages, bt, lens, impl="cudnn")


def test_auto_uses_pallas_only_after_a_self_check(monkeypatch):
    """On a GPU, impl="auto" picks a Pallas kernel only once it has compiled, run and matched its reference
    on the device; a kernel that fails falls back with a warning instead of breaking the caller."""
    q = jnp.zeros((2, 1, 4, 64), jnp.bfloat16)
    pages = jnp.zeros((6, 16, 2, 64), jnp.bfloat16)
    monkeypatch.setattr(kernels, "_hopper_or_newer", lambda: True)
    monkeypatch.setattr(kernels, "_self_check", lambda *a: False)
    assert kernels.paged_attention_impl("auto", q, pages) == "xla"
    monkeypatch.setattr(kernels, "_self_check", lambda *a: True)
    assert kernels.paged_attention_impl("auto", q, pages) == "pallas"
    x = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    assert kernels.attention_impl("auto", x, x) == "pallas"


def test_self_check_passes_a_working_kernel_and_rejects_a_broken_one(monkeypatch):
    check = kernels._self_check.__wrapped__  # uncached
    # Inside a trace (as when the model resolves impl="auto" under jit) the check still runs eagerly.
    assert jax.jit(lambda x: x + check("paged", "bfloat16", 64, True))(jnp.int32(0)) == 1
    assert not _compat.races_found()

    def broken(*args, **kw):
        raise RuntimeError("ptxas: out of registers")

    monkeypatch.setattr(kernels, "flash_attention_forward", broken)
    with pytest.warns(RuntimeWarning, match="flash kernel .* failed its self-check .* out of registers"):
        assert check("flash", "bfloat16", 64, True) is False


def test_a_self_check_that_hangs_falls_back_with_a_warning(monkeypatch):
    """A kernel that never finishes on the device counts as failed after SELF_CHECK_TIMEOUT_S: impl="auto"
    falls back instead of hanging its caller."""
    import threading

    release = threading.Event()
    monkeypatch.setattr(kernels, "_run_self_check", lambda *a: release.wait(60) and None)
    monkeypatch.setattr(kernels, "SELF_CHECK_TIMEOUT_S", 0.5)
    check = kernels._self_check.__wrapped__  # uncached
    try:
        with pytest.warns(RuntimeWarning, match="paged kernel .* failed its self-check .* did not finish within 0.5 s"):
            assert check("paged", "bfloat16", 64, True) is False
    finally:
        release.set()


def test_model_cache_path_with_pallas_paged_attention(tmp_path, rng):
    """Prefill then decode through the model's paged-cache path with attn_impl="pallas" (interpret mode)
    equals the same steps with attn_impl="xla", in bf16."""
    import torch

    import qwen_jax
    from qwen_jax import AttentionMeta
    from reference.hf_models import build

    _, path = build(tmp_path, seed=5, dtype=torch.bfloat16, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64)
    cfg, params = qwen_jax.load_pretrained(path, progress=False)
    BS, lens, extra = 16, [21, 6], 1
    seqs = [rng.integers(0, cfg.vocab_size, n + extra) for n in lens]
    max_blocks = -(-(max(lens) + extra) // BS)
    pages = rng.permutation(2 * max_blocks + 2)[: 2 * max_blocks].reshape(2, max_blocks)
    bt = jnp.asarray(pages, jnp.int32)
    slot = lambda b, p: int(pages[b, p // BS]) * BS + p % BS  # noqa: E731

    def run(impl):
        step = jax.jit(lambda c, i, p, m: qwen_jax.forward(cfg, params, i, positions=p, cache=c, meta=m,
                                                            attn_impl=impl))
        cache = qwen_jax.init_cache(cfg, 2 * max_blocks + 2, BS, dtype=jnp.bfloat16)
        T = max(lens)
        ids, pos, slots = np.zeros((2, T), np.int32), np.zeros((2, T), np.int32), -np.ones((2, T), np.int32)
        for b, n in enumerate(lens):
            ids[b, T - n:], pos[b, T - n:] = seqs[b][:n], np.arange(n)
            slots[b, T - n:] = [slot(b, i) for i in range(n)]
        outs = []
        for i in range(extra + 1):
            meta = AttentionMeta(jnp.asarray(slots), bt, jnp.asarray([n + i for n in lens], jnp.int32))
            out = step(cache, jnp.asarray(ids), jnp.asarray(pos), meta)
            cache = out.cache
            outs.append(np.asarray(out.logits[:, -1], np.float32))
            if i == extra:
                break
            cur = [n + i for n in lens]
            ids = np.asarray([[seqs[b][cur[b]]] for b in range(2)], np.int32)
            pos = np.asarray([[c] for c in cur], np.int32)
            slots = np.asarray([[slot(b, c)] for b, c in enumerate(cur)], np.int32)
        return np.stack(outs)

    with _compat.interpret_mode():
        ours = run("pallas")
    theirs = run("xla")
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 4e-2
