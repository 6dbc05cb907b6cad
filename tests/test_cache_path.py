"""The forward's paged-KV-cache path (prefill + decode) reproduces the full-sequence forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from conftest import rel_err
from qwen_jax import AttentionMeta
from reference.hf_models import build

BLOCK = 4


@pytest.mark.parametrize("overrides,packed", [(dict(), False), (dict(num_experts=8), False), (dict(), True),
                                              (dict(num_experts=8), True)])
def test_prefill_then_decode_matches_full_forward(tmp_path, overrides, packed, rng):
    """Prefill padded (rows right-aligned) or packed (both prompts back to back in one row, segment ids,
    padding at the end), then decode from the pages the prefill wrote."""
    _, src = build(tmp_path, num_hidden_layers=2, **overrides)
    cfg, params = qwen_jax.load_pretrained(src, progress=False)
    lens = [11, 6]  # two sequences of different lengths, decoded together
    extra = 5
    total = [n + extra for n in lens]
    seqs = [rng.integers(0, cfg.vocab_size, t) for t in total]
    max_blocks = -(-max(total) // BLOCK)
    num_blocks = 2 * max_blocks + 3
    pages = rng.permutation(num_blocks)[: 2 * max_blocks].reshape(2, max_blocks)  # shuffled block tables
    block_tables = jnp.asarray(pages, jnp.int32)
    cache = qwen_jax.init_cache(cfg, num_blocks, BLOCK, dtype=jnp.float32)

    def slot(b, pos):
        return int(pages[b, pos // BLOCK]) * BLOCK + pos % BLOCK

    step = jax.jit(lambda p, c, ids, pos, meta, seg=None, longest=None: qwen_jax.forward(
        cfg, p, ids, positions=pos, segment_ids=seg, cache=c, meta=meta, max_segment=longest),
        donate_argnums=1, static_argnames="longest")
    if packed:  # one row: prompt 0, prompt 1, 3 padding tokens (slot -1, a segment of their own)
        T = sum(lens) + 3
        ids, pos, seg = np.zeros((1, T), np.int32), np.zeros((1, T), np.int32), np.full((1, T), 2, np.int32)
        slots = -np.ones((1, T), np.int32)
        starts = [0, lens[0]]
        for b, n in enumerate(lens):
            a = starts[b]
            ids[0, a:a + n], pos[0, a:a + n], seg[0, a:a + n] = seqs[b][:n], np.arange(n), b
            slots[0, a:a + n] = [slot(b, i) for i in range(n)]
        meta = AttentionMeta(jnp.asarray(slots), block_tables, jnp.zeros(2, jnp.int32))  # the pool is not read
        out = step(params, cache, jnp.asarray(ids), jnp.asarray(pos), meta, jnp.asarray(seg), max(lens))
        got = {b: [np.asarray(out.logits[0, starts[b]:starts[b] + n])] for b, n in enumerate(lens)}
    else:  # both prompts in one batch, right-aligned: padding goes first with slot -1
        T = max(lens)
        ids = np.zeros((2, T), np.int32)
        pos = np.zeros((2, T), np.int32)
        slots = -np.ones((2, T), np.int32)
        for b, n in enumerate(lens):
            ids[b, T - n:] = seqs[b][:n]
            pos[b, T - n:] = np.arange(n)
            slots[b, T - n:] = [slot(b, i) for i in range(n)]
        meta = AttentionMeta(jnp.asarray(slots), block_tables, jnp.asarray(lens, jnp.int32))
        out = step(params, cache, jnp.asarray(ids), jnp.asarray(pos), meta)
        got = {b: [np.asarray(out.logits[b, T - n:])] for b, n in enumerate(lens)}
    cache = out.cache
    # Decode one token per sequence per step.
    for i in range(extra):
        cur = [n + i for n in lens]
        ids = np.asarray([[seqs[b][cur[b]]] for b in range(2)], np.int32)
        meta = AttentionMeta(jnp.asarray([[slot(b, cur[b])] for b in range(2)], jnp.int32), block_tables,
                             jnp.asarray([c + 1 for c in cur], jnp.int32))
        out = step(params, cache, jnp.asarray(ids), jnp.asarray([[c] for c in cur], jnp.int32), meta)
        cache = out.cache
        for b in range(2):
            got[b].append(np.asarray(out.logits[b]))
    for b in range(2):
        full = qwen_jax.forward(cfg, params, jnp.asarray(seqs[b][None], jnp.int32)).logits[0]
        assert rel_err(np.concatenate(got[b]), full) <= 1e-5


def test_cache_and_meta_go_together(tmp_path):
    cfg = qwen_jax.Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                               num_kv_heads=1, head_dim=8)
    params = qwen_jax.init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="together"):
        qwen_jax.forward(cfg, params, jnp.zeros((1, 2), jnp.int32), cache=qwen_jax.init_cache(cfg, 2, 4))
