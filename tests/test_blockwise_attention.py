"""The "xla" attention path (kernels.blockwise_attention) against the single masked product
(kernels.attention_reference): values and gradients, with blocks small enough that tests reach every case
(skipped key ranges, a partial last block, rows that see no key)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from conftest import rel_err
from kernels.blockwise_attention import query_blocks


def _inputs(rng, B, T, S, N, K, D):
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((B, T, N, D), (B, S, K, D), (B, S, K, D))]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("T,S", [(13, 13), (13, 18), (8, 5)])
def test_blockwise_equals_the_reference_in_values_and_gradients(rng, causal, window, segments, T, S):
    B, N, K, D = 2, 4, 2, 8
    q, k, v = _inputs(rng, B, T, S, N, K, D)
    seg = None
    if segments:  # a (query, key) pair, so that S != T works; ids sorted as in packed rows
        kv_seg = np.sort(rng.integers(1, 4, (B, S)), axis=1)
        seg = (jnp.asarray(kv_seg[:, S - T:] if S >= T else rng.integers(1, 4, (B, T))), jnp.asarray(kv_seg))
    w = jnp.asarray(rng.standard_normal((B, T, N, D)), jnp.float32)
    kw = dict(causal=causal, segment_ids=seg, sliding_window=window)

    def loss(fn, **extra):
        return lambda q, k, v: jnp.sum(fn(q, k, v, **kw, **extra) * w)

    ref = kernels.attention_reference(q, k, v, **kw)
    g_ref = jax.grad(loss(kernels.attention_reference), argnums=(0, 1, 2))(q, k, v)
    for block_q in (3, 5, None):
        out = kernels.blockwise_attention(q, k, v, **kw, block_q=block_q)
        assert rel_err(out, ref) < 1e-6, block_q
        g = jax.grad(loss(kernels.blockwise_attention, block_q=block_q), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(g, g_ref):
            assert rel_err(a, b) < 1e-5, block_q


def test_the_xla_impl_runs_blockwise_and_skips_hidden_keys(rng):
    """impl="xla" is the blockwise path; at T = 512 its causal program holds 3/8 fewer score entries."""
    B, T, N, K, D = 1, 512, 2, 1, 16
    q, k, v = _inputs(rng, B, T, T, N, K, D)
    out = kernels.attention(q, k, v, impl="xla")
    assert rel_err(out, kernels.attention_reference(q, k, v)) < 1e-6
    blocks = query_blocks(T, T, causal=True, sliding_window=None)
    assert len(blocks) == 4 and sum((b - a) * (hi - lo) for a, b, lo, hi in blocks) == T * T * 5 // 8


@settings(max_examples=200, deadline=None)
@given(T=st.integers(1, 40), extra=st.integers(-5, 20), window=st.one_of(st.none(), st.integers(1, 30)),
       causal=st.booleans(), block_q=st.integers(1, 16))
def test_query_blocks_cover_every_row_and_every_visible_key(T, extra, window, causal, block_q):
    S = max(1, T + extra)
    blocks = query_blocks(T, S, causal=causal, sliding_window=window, block_q=block_q)
    rows = [t for a, b, _, _ in blocks for t in range(a, b)]
    assert rows == list(range(T))
    for a, b, lo, hi in blocks:
        for t in range(a, b):
            pos = t + S - T
            visible = [s for s in range(S) if (not causal or s <= pos) and (window is None or pos - s < window)]
            assert all(lo <= s < hi for s in visible)


def test_paged_xla_path_equals_the_paged_reference_on_a_long_prefill(rng):
    """impl="xla" paged attention runs blockwise with each sequence's length as the causal end: a 300-token
    query (3 blocks of 128 rows) over ragged lengths, shuffled pages, NaN in pages no sequence owns."""
    B, Tq, N, K, D, bs, max_blocks = 3, 300, 4, 2, 8, 16, 24
    lengths = np.array([300, 310, 384])
    num_blocks = B * max_blocks + 3
    tables = rng.permutation(num_blocks)[: B * max_blocks].reshape(B, max_blocks)
    k_pages = rng.standard_normal((num_blocks, bs, K, D)).astype(np.float32)
    v_pages = rng.standard_normal((num_blocks, bs, K, D)).astype(np.float32)
    unowned = np.setdiff1d(np.arange(num_blocks), tables)
    k_pages[unowned], v_pages[unowned] = np.nan, np.nan
    q = rng.standard_normal((B, Tq, N, D)).astype(np.float32)
    args = [jnp.asarray(x) for x in (q, k_pages, v_pages, tables.astype(np.int32), lengths.astype(np.int32))]
    out = kernels.paged_attention(*args, impl="xla")
    ref = kernels.paged_attention_reference(*args)
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, ref) < 1e-6
