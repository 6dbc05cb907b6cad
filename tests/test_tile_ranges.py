"""`kernels.tile_ranges` against a brute-force mask: the attention kernels skip every tile it calls
invisible and build no mask on the tiles it calls full, so `visible` must cover every tile with a visible
pair and `full` must hold only tiles where every valid pair is visible."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.flash_attention import _PAD_KV_SEG, _PAD_Q_SEG, attention_mask
from kernels.tile_ranges import program_ranges, runs, visibility


def _case(T, S, bq, bk, causal, window, q_seg, kv_seg):
    Tp, Sp = -(-T // (2 * bq)) * 2 * bq, -(-S // (2 * bk)) * 2 * bk
    qs = np.full((1, Tp), _PAD_Q_SEG, np.int32)
    ks = np.full((1, Sp), _PAD_KV_SEG, np.int32)
    qs[0, :T], ks[0, :S] = q_seg, kv_seg
    vis, full = (np.asarray(x) for x in visibility(qs, ks, T=T, S=S, block_q=bq, block_kv=bk, causal=causal,
                                                    window=window))
    mask = np.zeros((Tp, Sp), bool)  # padded rows and keys see nothing
    mask[:T, :S] = np.asarray(attention_mask(T, S, causal=causal, q_segment_ids=np.asarray(q_seg)[None],
                                             kv_segment_ids=np.asarray(kv_seg)[None], sliding_window=window))[0]
    tiles = mask.reshape(Tp // bq, bq, Sp // bk, bk).transpose(0, 2, 1, 3)  # [nQ, nK, bq, bk]
    real_rows = (np.arange(Tp) < T).reshape(Tp // bq, 1, bq, 1)
    any_pair = tiles.any((2, 3))
    all_pairs = (tiles | ~real_rows).all((2, 3)) & real_rows.any((2, 3))  # padding rows may see anything
    return vis[0], full[0], any_pair, all_pairs


@st.composite
def _cases(draw):
    T = draw(st.integers(1, 300))
    S = T if draw(st.booleans()) else draw(st.integers(T, 400))
    sorted_segments = draw(st.booleans())
    n_seg = draw(st.integers(1, 4))
    if sorted_segments:  # packed documents: ids rise along the row, the same ids for queries and keys
        ids = np.sort(np.asarray(draw(st.lists(st.integers(0, n_seg - 1), min_size=S, max_size=S)), np.int32))
        kv_seg, q_seg = ids, ids[S - T:]
    else:  # any ids
        q_seg = np.asarray(draw(st.lists(st.integers(0, n_seg - 1), min_size=T, max_size=T)), np.int32)
        kv_seg = np.asarray(draw(st.lists(st.integers(0, n_seg - 1), min_size=S, max_size=S)), np.int32)
    window = draw(st.one_of(st.none(), st.integers(1, 200)))
    return dict(T=T, S=S, bq=draw(st.sampled_from([64, 128])), bk=draw(st.sampled_from([64, 128])),
                causal=draw(st.booleans()), window=window, q_seg=q_seg, kv_seg=kv_seg)


@settings(max_examples=50, deadline=None)
@given(_cases())
def test_visible_covers_every_visible_pair_and_full_needs_no_mask(case):
    vis, full, any_pair, all_pairs = _case(**case)
    assert not (any_pair & ~vis).any(), "a tile with a visible pair would be skipped"
    assert not (full & ~all_pairs).any(), "a tile called full has a pair that must be masked"
    assert not (full & ~vis).any()
    r = np.asarray(runs(vis, full))  # [nQ, 4]
    j = np.arange(vis.shape[1])
    for (lo, u_lo, u_hi, hi), v, f in zip(r, vis, full):
        assert 0 <= lo <= u_lo <= u_hi <= hi <= len(j)
        assert not (v & ((j < lo) | (j >= hi))).any()  # every visible tile is inside [lo, hi)
        assert f[u_lo:u_hi].all()  # the unmasked middle is all full


@settings(max_examples=20, deadline=None)
@given(_cases())
def test_a_program_streams_the_union_of_its_consumers_runs(case):
    vis, full, _, _ = _case(**case)
    table = np.asarray(program_ranges(vis[None], full[None]))[0]  # [nQ // 2, 10]
    per_block = np.asarray(runs(vis, full)).reshape(-1, 2, 4)
    for (plo, phi, *rest), own in zip(table, per_block):
        mine = np.asarray(rest).reshape(2, 4)
        assert plo <= phi
        for (lo, u_lo, u_hi, hi), (olo, ou_lo, ou_hi, ohi) in zip(mine, own):
            assert plo <= lo <= u_lo <= u_hi <= hi <= phi
            if ohi > olo:  # a consumer with tiles to visit keeps its run
                assert (lo, u_lo, u_hi, hi) == (olo, ou_lo, ou_hi, ohi)
            else:
                assert lo == hi


def test_packed_rows_skip_tiles_and_run_unmasked_middles():
    """Two documents of 200 and 184 tokens, causal: the second's last query block skips the first
    document's key tiles, and blocks well inside a document run full tiles without a mask."""
    seg = np.repeat(np.int32([0, 1]), [200, 184])
    vis, full, any_pair, _ = _case(384, 384, 64, 64, True, None, seg, seg)
    assert not vis[5, :3].any() and vis[5, 3:6].all()  # rows 320-383 (doc 1) skip keys 0-191 (doc 0)
    assert full[2, :2].all() and not full[2, 2]  # rows 128-191: keys 0-127 full, 128-191 diagonal
    assert (vis.sum() < vis.size) and full.any()
