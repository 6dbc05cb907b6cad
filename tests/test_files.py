"""The one reader (qwen_jax.files) and what reads through it: exact errors for each kind of unreadable file,
compressed input, and property-based fuzzing of the JSONL, document and prompt readers with arbitrary bytes
and values (a result or a clean QwenJaxError, never another exception). Also the export that is cut short."""

import bz2
import gzip
import json
import lzma
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_jax.errors import DataError, QwenJaxError
from qwen_jax.files import check_text, iter_jsonl, iter_lines, read_text

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("compress", [None, ".gz", ".xz", ".bz2"])
def test_lines_and_jsonl_read_the_same_through_every_compression(tmp_path, compress):
    raw = '\ufeff{"a": 1}\n\n{"b": "caf\u00e9"}\r\n[1]\n'.encode()
    name = "x.jsonl" + (compress or "")
    packed = {None: lambda b: b, ".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress}[compress](raw)
    (tmp_path / name).write_bytes(packed)
    assert [n for n, _ in iter_lines(str(tmp_path / name))] == [1, 2, 3, 4]
    bad = []
    got = list(iter_jsonl(str(tmp_path / name), on_bad=lambda n, r: bad.append((n, r))))
    assert got == [(1, {"a": 1}), (3, {"b": "caf\u00e9"})]
    assert bad == [(4, "expected a JSON object, got list")]


def test_unreadable_files_are_one_line_errors_with_line_and_byte(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"line one\nline two \xc3\x28 here\n")
    with pytest.raises(DataError, match=r"t.txt:2: not UTF-8 text \(byte 18 of the file is 0xc3\)"):
        read_text(str(p))
    with pytest.raises(DataError, match=r"t.txt:2: not UTF-8 text \(byte 18 of the file is 0xc3\)"):
        list(iter_lines(str(p)))
    with pytest.raises(DataError, match="is a directory"):
        read_text(str(tmp_path))
    with pytest.raises(DataError, match="nope.txt: no such file"):
        read_text(str(tmp_path / "nope.txt"))
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"hello " * 100)[:-12])  # the trailer cut off
    with pytest.raises(DataError, match=r"c.txt.gz: a corrupt or truncated .gz file"):
        read_text(str(tmp_path / "c.txt.gz"))
    assert read_text(str(_write(tmp_path / "crlf.txt", b"a\r\nb\rc\n"))) == "a\nb\nc\n"
    if os.geteuid() != 0:  # root reads everything
        q = _write(tmp_path / "locked.txt", b"x")
        q.chmod(0)
        with pytest.raises(DataError, match="permission denied"):
            read_text(str(q))


def _write(path, data):
    path.write_bytes(data)
    return path


def test_text_that_is_not_text_is_refused():
    check_text("plain text with a tab\tand newlines\n" * 10, "doc")
    check_text("x" * 200 + "\x00", "doc")  # one stray control byte in 201 characters: kept
    with pytest.raises(DataError, match=r"doc: does not look like text \(3 of 12 characters"):
        check_text("\x00\x01\x02abcdefghi", "doc")
    with pytest.raises(DataError, match="U\\+FFFD"):
        check_text("\ufffd" * 5 + "text", "doc")


def test_documents_warn_about_duplicates_and_read_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.data import read_documents

    pq.write_table(pa.table({"text": ["alpha", "beta", None, "alpha"]}), tmp_path / "d.parquet")
    (tmp_path / "e.jsonl.gz").write_bytes(gzip.compress(b'{"text": "beta"}\n{"text": "gamma"}\n'))
    warnings = []
    docs = read_documents([str(tmp_path / "d.parquet"), str(tmp_path / "e.jsonl.gz")], warn=warnings.append)
    assert docs == ["alpha", "beta", "alpha", "beta", "gamma"]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 2 of 5 documents are exact duplicates")


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".jsonl.gz", ".txt", ".txt.xz"]))
def test_arbitrary_bytes_give_documents_or_one_clean_error(tmp_path_factory, data, suffix):
    from train.data import read_documents

    d = tmp_path_factory.mktemp("fuzz")
    path = d / ("f" + suffix)
    compress = {".gz": gzip.compress, ".xz": lzma.compress}.get(os.path.splitext(suffix)[1], lambda b: b)
    # half the time the raw bytes go through the compressor's framing, half the time they pretend to be compressed
    path.write_bytes(compress(data) if data[:1] < b"\x80" else data)
    try:
        docs = read_documents(str(path))
    except DataError as e:
        assert str(path) in str(e) or "no non-empty documents" in str(e)
    else:
        assert docs and all(isinstance(x, str) and x.strip() for x in docs)


@FUZZ
@given(lines=st.lists(st.one_of(st.binary(max_size=40), st.builds(lambda v: json.dumps(v).encode(), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8))),
    max_size=6))
def test_arbitrary_jsonl_gives_objects_or_one_clean_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(b"\n".join(lines))
    bad = []
    try:
        for n, obj in iter_jsonl(str(path), on_bad=lambda n, r: bad.append(n)):
            assert isinstance(obj, dict) and n >= 1
    except DataError as e:
        assert "not UTF-8 text" in str(e)


PROMPT_FIELDS = ["prompt", "messages", "id", "max_tokens", "temperature", "top_k", "top_p", "stop", "seed",
                 "logprobs", "n", "ignore_eos", "colour"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True), st.text(max_size=6),
                   st.lists(st.one_of(st.text(max_size=4), st.integers(-3, 3), st.dictionaries(
                       st.sampled_from(["role", "content"]), st.text(max_size=5), max_size=2)), max_size=3))


@FUZZ
@given(objs=st.lists(st.dictionaries(st.sampled_from(PROMPT_FIELDS), VALUES, max_size=5), min_size=1, max_size=4))
def test_arbitrary_prompt_lines_give_requests_or_one_clean_error(tmp_path_factory, objs):
    from infer.generate import _read_prompts, parse_args

    path = tmp_path_factory.mktemp("fuzz") / "p.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in objs) + "\n")
    try:
        items = _read_prompts(str(path), parse_args(["--prompts-file", str(path), "--output", "o"]))
    except QwenJaxError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:
        assert [n for n, _, _ in items] == list(range(1, len(objs) + 1))


def test_an_export_cut_short_never_looks_complete_and_keeps_the_previous(tmp_path):
    """Ctrl-C during the last part of an export (the tokenizer files): the earlier export in the directory
    is untouched, and the new one lies in OUT.incomplete without a config.json."""
    import jax

    from qwen_jax import Qwen3Config, init_params, load_pretrained, save_pretrained

    config = Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8)
    out = tmp_path / "hf"
    save_pretrained(out, config, init_params(config, jax.random.key(0)), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class InterruptedTokenizer:  # the moment a Ctrl-C lands: while the tokenizer files are written
        def save_pretrained(self, path):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_pretrained(out, config, init_params(config, jax.random.key(1)), tokenizer=InterruptedTokenizer(),
                        progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    staged = tmp_path / "hf.incomplete"
    assert (staged / "model.safetensors").exists() and not (staged / "config.json").exists()
    _, params = load_pretrained(out)  # the previous export still loads
    ref = init_params(config, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(ref["embed"]))
    save_pretrained(out, config, init_params(config, jax.random.key(1)), progress=False)  # a rerun completes it
    assert not staged.exists() and (out / "config.json").exists()
    assert not np.array_equal(np.asarray(load_pretrained(out)[1]["embed"]), np.asarray(ref["embed"]))
