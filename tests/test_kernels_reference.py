"""The jnp attention references against a float64 numpy attention with repeated K/V heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from conftest import rel_err


def naive(q, k, v, allowed):
    """float64 attention; q [B,T,N,D], k/v [B,S,K,D], allowed [B,T,S] bool."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(allowed[:, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(allowed[:, None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bnts,bsnd->btnd", p, v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("window", [None, 5])
def test_attention_matches_naive(rng, causal, heads, segments, window):
    B, T, D = 2, 13, 16
    N, K = heads
    q, k, v = (rng.standard_normal((B, T, h, D)).astype(np.float32) for h in (N, K, K))
    allowed = np.ones((B, T, T), bool)
    if causal:
        allowed &= np.tril(np.ones((T, T), bool))
    if window:
        idx = np.arange(T)
        allowed &= (idx[:, None] - idx[None, :]) < window
    seg = None
    if segments:
        seg = np.sort(rng.integers(1, 4, (B, T)), axis=1)
        allowed &= seg[:, :, None] == seg[:, None, :]
    out = kernels.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal,
                            segment_ids=None if seg is None else jnp.asarray(seg), sliding_window=window)
    assert rel_err(out, naive(q, k, v, allowed)) < 1e-5


def test_attention_gradients_match_repeated_heads(rng):
    B, T, N, K, D = 1, 9, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, h, D)), jnp.float32) for h in (N, K, K))

    def repeated(q, k, v):  # the textbook formulation, materialising repeated K/V
        k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
        s = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(D)
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -1e30)
        return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(s, -1), v)

    w = jnp.asarray(rng.standard_normal((B, T, N, D)), jnp.float32)
    g1 = jax.grad(lambda *a: jnp.sum(kernels.attention(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g2 = jax.grad(lambda *a: jnp.sum(repeated(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 1e-5


def test_paged_attention_matches_contiguous(rng):
    B, Tq, N, K, D, bs = 3, 3, 4, 2, 16, 4
    lengths = np.array([9, 3, 14])
    max_blocks = 4
    num_blocks = B * max_blocks + 2
    tables = rng.permutation(num_blocks)[: B * max_blocks].reshape(B, max_blocks)
    k_pages = rng.standard_normal((num_blocks, bs, K, D)).astype(np.float32)
    v_pages = rng.standard_normal((num_blocks, bs, K, D)).astype(np.float32)
    q = rng.standard_normal((B, Tq, N, D)).astype(np.float32)
    out = kernels.paged_attention(jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages),
                                  jnp.asarray(tables, jnp.int32), jnp.asarray(lengths, jnp.int32))
    for b in range(B):
        k = k_pages[tables[b]].reshape(-1, K, D)[: lengths[b]]
        v = v_pages[tables[b]].reshape(-1, K, D)[: lengths[b]]
        S = lengths[b]
        allowed = np.arange(S)[None, :] <= (S - Tq + np.arange(Tq))[:, None]
        ref = naive(q[b:b + 1], k[None], v[None], allowed[None])
        assert rel_err(out[b], ref[0]) < 1e-5
    # The whole-pool form with a layer index reads the same pages.
    pool_k = jnp.stack([jnp.zeros_like(jnp.asarray(k_pages)), jnp.asarray(k_pages)])
    pool_v = jnp.stack([jnp.zeros_like(jnp.asarray(v_pages)), jnp.asarray(v_pages)])
    out_l = kernels.paged_attention(jnp.asarray(q), pool_k, pool_v, jnp.asarray(tables, jnp.int32),
                                    jnp.asarray(lengths, jnp.int32), layer=jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(out_l), np.asarray(out))


def test_write_pages_drops_padding(rng):
    pages = jnp.zeros((2, 5, 3, 4, 8))  # [L, blocks, block_size, K, D]
    new = jnp.asarray(rng.standard_normal((1, 3, 4, 8)), jnp.float32)
    slots = jnp.asarray([[-1, 7, 0]], jnp.int32)
    k, _ = kernels.write_pages(pages, pages, new, new, slots, layer=1)
    np.testing.assert_array_equal(np.asarray(k[1, 2, 1]), np.asarray(new[0, 1]))  # slot 7 = block 2, offset 1
    np.testing.assert_array_equal(np.asarray(k[1, 0, 0]), np.asarray(new[0, 2]))
    assert float(jnp.abs(k[0]).sum()) == 0.0 and int((k[1] != 0).any(-1).any(-1).sum()) == 2


def test_unknown_impl():
    x = jnp.zeros((1, 2, 2, 8))
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.attention(x, x, x, impl="triton")
