"""Which tiles of a full-sequence attention a kernel must visit, and which of those need no mask.

A (query block, key tile) pair is *visible* when some query row of the block may attend to some key of the
tile, and *full* when every (valid row, key) pair may: then the kernel runs it without building a mask.
Both come from the causal offset, the sliding window and each block's range of segment ids (packed
training rows), computed here in XLA before the kernel: a tile that is not visible is never loaded.

The kernel visits, per query block, one contiguous run of tiles [lo, hi) split into a masked head
[lo, u_lo), an unmasked middle [u_lo, u_hi) and a masked tail [u_hi, hi). Everything is conservative
in the safe direction: `visible` may include tiles with nothing to see (they run masked and add
nothing), `full` never includes a tile that needs a mask. Padding rows (past T) may see anything: their
results are dropped. Padding keys (past S) are never full.
"""

from __future__ import annotations

import jax.numpy as jnp


def _block_minmax(seg, block: int, valid):
    """Per-block min and max of seg [B, L] over its valid entries -> ([B, L // block], same); blocks with
    no valid entry give (max int, min int), an empty range."""
    B, L = seg.shape
    big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
    s = seg.reshape(B, L // block, block)
    v = valid.reshape(1, L // block, block)
    return jnp.where(v, s, big).min(-1), jnp.where(v, s, small).max(-1)


def visibility(q_seg, kv_seg, *, T: int, S: int, block_q: int, block_kv: int, causal: bool,
               window: int | None):
    """(visible, full) booleans [B, nQ, nK] for query blocks of block_q rows against key tiles of block_kv.

    q_seg [B, Tp] and kv_seg [B, Sp] are the padded segment ids (Tp, Sp multiples of the blocks); query
    row t sits at position t + S - T (causal alignment at the end)."""
    Tp, Sp = q_seg.shape[1], kv_seg.shape[1]
    offset = S - T
    q_valid = jnp.arange(Tp) < T
    k_valid = jnp.arange(Sp) < S
    qmin, qmax = _block_minmax(q_seg, block_q, q_valid)  # [B, nQ]
    kmin, kmax = _block_minmax(kv_seg, block_kv, k_valid)  # [B, nK]
    q0 = jnp.arange(Tp // block_q) * block_q
    q_first = (q0 + offset)[:, None]  # [nQ, 1]
    q_last = (jnp.minimum(q0 + block_q, T) - 1 + offset)[:, None]
    k0 = jnp.arange(Sp // block_kv) * block_kv
    k_first = k0[None, :]  # [1, nK]
    k_last = (jnp.minimum(k0 + block_kv, S) - 1)[None, :]
    any_q = (q0 < T)[None, :, None]
    any_k = (k0 < S)[None, None, :]
    overlap = (kmin[:, None, :] <= qmax[:, :, None]) & (kmax[:, None, :] >= qmin[:, :, None])
    visible = any_q & any_k & overlap
    one_seg = (qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :] & (qmin[:, :, None] == kmin[:, None, :])
    full = visible & one_seg & ((k0 + block_kv) <= S)[None, None, :]
    if causal:
        visible &= (k_first <= q_last)[None]
        full &= (k_last <= q_first)[None]
    if window is not None:
        visible &= (q_first - k_last < window)[None]
        full &= (q_last - k_first < window)[None]
    return visible, full


def runs(visible, full):
    """Per row of [..., n] booleans: (lo, u_lo, u_hi, hi) int32 [..., 4], the tiles [lo, hi) from the first
    to the last visible one, and [u_lo, u_hi) the first run of full tiles in it (u_lo = u_hi = hi when
    there is none). A row with nothing visible gives (0, 0, 0, 0)."""
    n = visible.shape[-1]
    j = jnp.arange(n)
    has = visible.any(-1)
    lo = jnp.where(has, jnp.argmax(visible, -1), 0)
    hi = jnp.where(has, n - jnp.argmax(visible[..., ::-1], -1), 0)
    has_full = full.any(-1)
    u_lo = jnp.where(has_full, jnp.argmax(full, -1), hi)
    after = ~full & (j >= u_lo[..., None])
    u_hi = jnp.where(after.any(-1), jnp.argmax(after, -1), n)
    u_hi = jnp.where(has_full, jnp.minimum(u_hi, hi), hi)
    return jnp.stack([lo, u_lo, u_hi, hi], -1).astype(jnp.int32)


def program_ranges(visible, full):
    """A kernel's table [B, n // 2, 10] int32 for programs of two consumer blocks (pairs along axis 1 of
    [B, n, m] visible/full, tiles along axis 2): the producer's stream [plo, phi) (the union of the
    consumers' runs), then each consumer's (lo, u_lo, u_hi, hi). A consumer with nothing to see gets an
    empty run at phi. The forward and dQ kernels pair query blocks; dK/dV pairs key blocks (transposed)."""
    B, nQ, _ = visible.shape
    r = runs(visible, full).reshape(B, nQ // 2, 2, 4)
    empty = r[..., 3] <= r[..., 0]  # [B, P, 2]
    plo = jnp.where(empty, jnp.iinfo(jnp.int32).max, r[..., 0]).min(-1)
    phi = jnp.where(empty, 0, r[..., 3]).max(-1)
    plo = jnp.where(phi > 0, plo, 0)
    r = jnp.where(empty[..., None], phi[..., None, None], r)
    return jnp.concatenate([plo[..., None], phi[..., None], r.reshape(B, nQ // 2, 8)], -1).astype(jnp.int32)
