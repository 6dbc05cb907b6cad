"""Reading, packing and iterating training data."""

import gzip
import json

import numpy as np
import pytest

from qwen_jax import DataError
from train import data as D


def test_read_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nline two")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third", "id": 3}) + "\n")
    (tmp_path / "ignored.csv").write_text("x")
    docs = D.read_documents([str(tmp_path)])
    assert docs == ["first document\nline two", "second", "third"]
    assert D.read_documents(D.DEFAULT_CORPUS)[0].startswith("ALL'S WELL THAT ENDS WELL")


def test_read_errors_name_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        D.read_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected an object with a string field 'text'"):
        D.read_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n" + json.dumps({"text": "   "}) + "\n")
    with pytest.raises(DataError, match="no non-empty documents"):
        D.read_documents(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        D.read_documents(str(tmp_path / "missing.txt"))


def test_pack_and_positions():
    import jax.numpy as jnp

    from train.tasks import positions_from_segments

    docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 28)]  # 5 + 3 + 8 = 16 tokens
    tokens, seg = D.pack(docs, 6)
    assert tokens.shape == (2, 6)  # the last 4 tokens do not fill a row
    np.testing.assert_array_equal(tokens.reshape(-1), np.concatenate(docs)[:12])
    np.testing.assert_array_equal(seg, [[1, 1, 1, 1, 1, 2], [2, 2, 3, 3, 3, 3]])
    pos = positions_from_segments(jnp.asarray(seg))
    np.testing.assert_array_equal(pos, [[0, 1, 2, 3, 4, 0], [0, 1, 0, 1, 2, 3]])


def test_iterator_is_deterministic_and_resumable():
    ds = D.PackedDataset(np.arange(70).reshape(35, 2), np.ones((35, 2), np.int32))
    a = D.PackedDataset.batches(ds, 4, seed=7)
    first = [next(a) for _ in range(20)]  # crosses epoch boundaries (8 batches per epoch)
    again = [next(D.PackedDataset.batches(ds, 4, seed=7)) for _ in range(1)]
    np.testing.assert_array_equal(first[0][0]["tokens"], again[0][0]["tokens"])
    resumed = D.PackedDataset.batches(ds, 4, seed=7, state=first[12][1])
    for expect in first[13:]:
        got = next(resumed)
        np.testing.assert_array_equal(got[0]["tokens"], expect[0]["tokens"])
        assert got[1] == expect[1]
    epoch0 = np.concatenate([b["tokens"][:, 0] for b, _ in first[:8]])
    assert len(set(epoch0.tolist())) == 32  # no row repeats within an epoch
    other = next(D.PackedDataset.batches(ds, 4, seed=8))[0]["tokens"]
    assert not np.array_equal(other, first[0][0]["tokens"])
    with pytest.raises(DataError, match="fewer than one batch"):
        next(D.PackedDataset.batches(ds, 64, seed=0))


def test_holdout_split():
    few = [np.arange(100), np.arange(50)]
    train, held = D.split_holdout(few, 0.1, seed=0)
    assert [len(x) for x in train] == [90, 45] and [len(x) for x in held] == [10, 5]
    many = [np.full(10, i) for i in range(100)]
    train, held = D.split_holdout(many, 0.1, seed=0)
    assert len(train) == 90 and len(held) == 10
    assert not {int(d[0]) for d in train} & {int(d[0]) for d in held}


def test_bpe_tokenizer_has_qwen_specials_and_template(tmp_path):
    tok = D.train_bpe_tokenizer(["To be, or not to be: that is the question."] * 20, 300, str(tmp_path))
    for t in D.QWEN_SPECIAL_TOKENS:
        assert len(tok.encode(t)) == 1
    text = "Whether 'tis nobler in the mind to suffer"
    assert tok.decode(tok.encode(text)) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_and_z_loss_match_direct(rng, dtype):
    """The fused cross-entropy (gradient made in the forward pass, chunk by chunk) against the plain
    formula, values and gradients, with a padded last chunk, masked tokens and the z-loss."""
    import jax
    import jax.numpy as jnp

    from train.losses import cross_entropy

    dt = jnp.dtype(dtype)
    h = jnp.asarray(rng.standard_normal((37, 16)), dt)
    w = jnp.asarray(rng.standard_normal((16, 50)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 50, 37))
    m = jnp.asarray(rng.random(37) > 0.2)

    def direct(h, w):
        logits = jnp.einsum("ND,DV->NV", h, w.astype(dt), preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, -1)
        ce = jnp.sum((lse - logits[jnp.arange(37), t]) * m)
        return ce + 0.1 * jnp.sum(lse**2 * m), ce

    def fused(h, w):
        loss, ce, _ = cross_entropy(h, w, t, m, z_weight=0.1, chunk=8)  # 37 tokens: the last chunk is padded
        return loss, ce

    tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    (lf, cf), (ld, cd) = fused(h, w), direct(h, w)
    np.testing.assert_allclose([float(lf), float(cf)], [float(ld), float(cd)], **tol)
    gf = jax.grad(lambda h, w: fused(h, w)[0], (0, 1))(h, w)
    gd = jax.grad(lambda h, w: direct(h, w)[0], (0, 1))(h, w)
    for a, b in zip(gf, gd):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
    # ce and z are values only; the eval path (no differentiation) gives the same numbers
    assert float(jax.jit(lambda h, w: fused(h, w)[1])(h, w)) == pytest.approx(float(cf), rel=1e-5)
