"""Bad input across the CLIs (infer.generate, train.pretrain, train.sft, train.dpo, train.rm, train.grpo),
table-driven.

Each row runs the CLI's `main` in this process on a workspace that already holds results (a finished output,
an unfinished batch's partial file, a run directory with a checkpoint and metrics). For every row: exit code
2, at most two lines of output (stdout and stderr, file descriptors included), the last one `error: ...`
naming the problem, no traceback, and every file that existed before is byte-for-byte unchanged."""

import bz2
import hashlib
import io
import json
import lzma
import os
import shutil

import pytest

from qwen_jax.assets import DEFAULT_MODEL

LONG_PROMPT = "ROMEO. " * 3000


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """The bad inputs, built once."""
    d = tmp_path_factory.mktemp("bad")
    w = lambda name, data: (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())  # noqa: E731
    w("nonutf8.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    w("nonutf8_text.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n')
    w("nonutf8_chats.jsonl", b'{"messages": [{"role": "user", "content": "\xff"}]}\n')
    w("badjson.jsonl", '{"prompt": "a"}\n{"prompt": \n')
    w("hot.jsonl", '{"prompt": "a", "temperature": "hot"}\n')
    w("empty.jsonl", "\n\n")
    w("noprompt.jsonl", '{"text": "a"}\n')
    w("unknownfield.jsonl", '{"prompt": "a", "colour": 1}\n')
    w("negative_tokens.jsonl", '{"prompt": "a"}\n{"prompt": "b", "max_tokens": -5}\n')
    w("corrupt.jsonl.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage that is not deflate")
    xz = lzma.compress(json.dumps({"text": "to be or not to be " * 200}).encode() * 20)
    w("truncated.jsonl.xz", xz[: len(xz) // 2])
    w("corrupt.txt.bz2", bz2.compress(b"some text " * 100)[:40])
    w("random.txt", bytes(range(128, 256)) * 64)  # not UTF-8
    w("controls.txt", "".join(chr(c) for c in range(1, 9)).encode() * 500 + b"a little text")  # UTF-8, not text
    w("corrupt.parquet", b"PAR1" + b"\x00\x13garbage" * 20 + b"PAR1")
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"body": ["some text"] * 4}), buf)
    w("nocolumn.parquet", buf.getvalue())
    w("data.csv", "text\nhello\n")
    w("small.jsonl", '{"text": "to be or not to be"}\n{"text": "that is the question"}\n')
    w("badconfig.json", '{"model_type": "qwen3", "hidden_size": ')
    w("listconfig.json", "[1, 2, 3]")
    w("typeconfig.json", json.dumps({"model_type": "qwen3", "vocab_size": 4096, "hidden_size": "big"}))
    w("tinyconfig.json", json.dumps(dict(model_type="qwen3", vocab_size=4096, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=16, tie_word_embeddings=True)))
    w("bad_chats.jsonl", '{"messages": "not a list"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    w("some_bad_chats.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                              '"content": "hello"}]}\n{"messages": []}\n')
    w("bad_pairs.jsonl", '{"prompt": "x"}\n\n{"chosen": "y"}\n')
    (d / "emptydir").mkdir()
    shutil.copytree(DEFAULT_MODEL, d / "truncated_model")
    st = d / "truncated_model" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    shutil.copytree(DEFAULT_MODEL, d / "badconfig_model")
    (d / "badconfig_model" / "config.json").write_text('{"hidden_size": 256,')
    shutil.copytree(DEFAULT_MODEL, d / "two_label_model")
    cfg = json.loads((d / "two_label_model" / "config.json").read_text())
    cfg.update(architectures=["Qwen3ForSequenceClassification"], id2label={"0": "NO", "1": "YES"})
    (d / "two_label_model" / "config.json").write_text(json.dumps(cfg))
    return d


def _workspace(out):
    """Earlier results that no failing run may touch: a finished output, an unfinished batch, a run."""
    (out / "done.jsonl").write_text('{"line": 1, "text": "earlier result"}\n')
    (out / "unfinished.jsonl.partial").write_text('{"line": 1, "text": "half a batch"}\n')
    run = out / "run" / "checkpoints" / "4"
    run.mkdir(parents=True)
    (run / "state").write_bytes(b"checkpoint bytes")
    (out / "run" / "metrics.jsonl").write_text('{"step": 4, "loss": 3.0}\n')
    (out / "a_file").write_text("not a directory")


def _snapshot(root) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


GEN = ["--max-tokens", "4", "--temperature", "0"]
PRE = ["--config", "{bad}/tinyconfig.json", "--tokenizer", DEFAULT_MODEL, "--steps", "2", "--seq-len", "16",
       "--batch-size", "2", "--warmup", "0", "--no-progress", "--no-export", "--out", "{out}/new"]
FT = ["--steps", "1", "--seq-len", "64", "--batch-size", "2", "--no-progress", "--no-export", "--out", "{out}/new"]
RL = ["--steps", "1", "--max-new-tokens", "4", "--prompts-per-step", "2", "--group-size", "2", "--no-progress",
      "--no-export", "--out", "{out}/new"]

ROWS = [
    # infer.generate: prompts files
    ("generate", ["--prompts-file", "{bad}/missing.jsonl", "--output", "{out}/o.jsonl"], "missing.jsonl: no such file"),
    ("generate", ["--prompts-file", "{bad}/emptydir", "--output", "{out}/o.jsonl"], "is a directory"),
    ("generate", ["--prompts-file", "{bad}/nonutf8.jsonl", "--output", "{out}/o.jsonl"],
     "nonutf8.jsonl:2: not UTF-8 text (byte 32 of the file is 0xe9)"),
    ("generate", ["--prompts-file", "{bad}/badjson.jsonl", "--output", "{out}/o.jsonl"], "badjson.jsonl:2: not valid JSON"),
    ("generate", ["--prompts-file", "{bad}/hot.jsonl", "--output", "{out}/o.jsonl"], "hot.jsonl:1: invalid sampling"),
    ("generate", ["--prompts-file", "{bad}/empty.jsonl", "--output", "{out}/o.jsonl"], "no prompts"),
    ("generate", ["--prompts-file", "{bad}/noprompt.jsonl", "--output", "{out}/o.jsonl"], 'noprompt.jsonl:1: expected {"prompt"'),
    ("generate", ["--prompts-file", "{bad}/unknownfield.jsonl", "--output", "{out}/o.jsonl"], "unknown sampling field"),
    ("generate", ["--prompts-file", "{bad}/negative_tokens.jsonl", "--output", "{out}/o.jsonl"],
     "negative_tokens.jsonl:2: invalid sampling parameter: max_tokens"),
    ("generate", ["--prompts-file", "{bad}/corrupt.jsonl.gz", "--output", "{out}/o.jsonl"], "corrupt or truncated .gz"),
    ("generate", ["--prompts-file", "{bad}/hot.jsonl"], "needs --output"),
    ("generate", ["--prompts-file", "{bad}/noprompt.jsonl", "--output", "{out}/done.jsonl"], "noprompt.jsonl:1"),
    ("generate", ["--prompts-file", "{bad}/unknownfield.jsonl", "--output", "{out}/unfinished.jsonl"],
     "unknown sampling field"),
    # infer.generate: outputs, flags, model, prompt
    ("generate", ["--prompt", "x", "--prompts-file", "{bad}/hot.jsonl"], "not allowed with argument"),
    ("generate", ["--model", DEFAULT_MODEL, "--prompts-file", "{bad}/../missing_dir_x/none.jsonl", "--output", "o"],
     "no such file"),
    ("generate", ["--block-size", "0", "--prompt", "x"], "--block-size must be >= 1"),
    ("generate", ["--max-num-seqs", "0", "--prompt", "x"], "--max-num-seqs must be >= 1"),
    ("generate", ["--dtype", "float8", "--prompt", "x"], "--dtype must be"),
    ("generate", ["--max-model-len", "0", "--prompt", "x"], "--max-model-len must be >= 2"),
    ("generate", ["--kv-cache-memory-fraction", "2", "--prompt", "x"], "--kv-cache-memory-fraction must be"),
    ("generate", ["--top-p", "0", "--prompt", "x"], "top_p must be in"),
    ("generate", ["--max-tokens", "0", "--prompt", "x"], "max_tokens must be"),
    ("generate", ["--temperature", "-1", "--prompt", "x"], "temperature"),
    ("generate", ["--seed", "abc", "--prompt", "x"], "invalid int value: 'abc'"),
    ("generate", ["--bogus", "--prompt", "x"], "unrecognized arguments: --bogus"),
    ("generate", ["--model", "{bad}/no_such_model", "--prompt", "x"], "no_such_model: not a directory"),
    ("generate", ["--model", "{bad}/truncated_model", "--prompt", "x"], "truncated"),
    ("generate", ["--model", "{bad}/badconfig_model", "--prompt", "x"], "not valid JSON"),
    ("generate", ["--prompt", "caf\udce9"], "the prompt is not valid UTF-8 text"),
    ("generate", ["--max-model-len", "32", "--prompt", LONG_PROMPT], "max_model_len is 32"),
    # train.pretrain
    ("pretrain", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("pretrain", ["--steps", "0"], "--steps must be positive"),
    ("pretrain", ["--seq-len", "-1"], "--seq-len must be positive"),
    ("pretrain", ["--lr", "0"], "--lr must be positive"),
    ("pretrain", ["--warmup", "5"], "--warmup (5) must be in [0, --steps]"),
    ("pretrain", ["--remat", "bogus"], "--remat must be one of"),
    ("pretrain", ["--param-dtype", "float8"], "--param-dtype must be"),
    ("pretrain", ["--clip-norm", "-1"], "--clip-norm must be >= 0"),
    ("pretrain", ["--eval-fraction", "1.5"], "--eval-fraction must be in [0, 1)"),
    ("pretrain", ["--vocab-size", "10"], "--vocab-size must be >= 266"),
    ("pretrain", ["--data", "{bad}/missing.jsonl"], "missing.jsonl: no such file or directory"),
    ("pretrain", ["--data", "{bad}/emptydir"], "no .txt/.jsonl/.parquet files found"),
    ("pretrain", ["--data", "{bad}/nonutf8_text.jsonl"], "nonutf8_text.jsonl:2: not UTF-8 text (byte 30 of the file is 0xe9)"),
    ("pretrain", ["--data", "{bad}/random.txt"], "random.txt:1: not UTF-8 text (byte 0 of the file is 0x80)"),
    ("pretrain", ["--data", "{bad}/controls.txt"], "controls.txt: does not look like text"),
    ("pretrain", ["--data", "{bad}/corrupt.parquet"], "corrupt.parquet: not a readable parquet file"),
    ("pretrain", ["--data", "{bad}/nocolumn.parquet"], "no column 'text'"),
    ("pretrain", ["--data", "{bad}/truncated.jsonl.xz"], "corrupt or truncated .xz"),
    ("pretrain", ["--data", "{bad}/corrupt.txt.bz2"], "corrupt or truncated .bz2"),
    ("pretrain", ["--data", "{bad}/empty.jsonl"], "no non-empty documents"),
    ("pretrain", ["--data", "{bad}/data.csv"], "unsupported file type"),
    ("pretrain", ["--out", "{out}/a_file"], "--out {out}/a_file: is a file"),
    ("pretrain", ["--out", "{out}/run"], "already has checkpoints: pass --resume"),
    ("pretrain", ["--config", "{bad}/badconfig.json"], "badconfig.json: not valid JSON"),
    ("pretrain", ["--config", "{bad}/listconfig.json"], "expected a JSON object, got list"),
    ("pretrain", ["--config", "{bad}/typeconfig.json"], "typeconfig.json"),
    ("pretrain", ["--config", "qwen3-7b"], "unknown preset 'qwen3-7b'"),
    ("pretrain", ["--mesh", "data=3"], "mesh {'data': 3} needs 3 devices"),
    ("pretrain", ["--data", "{bad}/small.jsonl", "--seq-len", "64"], "fewer than one batch"),
    # train.sft
    ("sft", ["--data", "{bad}/nonutf8_chats.jsonl"], "nonutf8_chats.jsonl:1: not UTF-8 text"),
    ("sft", ["--data", "{bad}/emptydir"], "is a directory"),
    ("sft", ["--data", "{bad}/bad_chats.jsonl"], "no usable examples"),
    ("sft", ["--data", "{bad}/some_bad_chats.jsonl", "--strict"], "some_bad_chats.jsonl:2:"),
    ("sft", ["--model", "{bad}/no_such_model"], "--model {bad}/no_such_model: not a directory"),
    ("sft", ["--model", "{bad}/badconfig_model"], "not valid JSON"),
    ("sft", ["--epochs", "0"], "--epochs must be positive"),
    ("sft", ["--lora-rank", "-1"], "--lora-rank must be >= 0"),
    ("sft", ["--eval-fraction", "-0.1"], "--eval-fraction must be in [0, 1)"),
    ("sft", ["--out", "{out}/run"], "already has checkpoints"),
    # train.dpo
    ("dpo", ["--data", "{bad}/bad_pairs.jsonl"], "no usable examples"),
    ("dpo", ["--data", "{bad}/missing.jsonl"], "missing.jsonl: no such file"),
    ("dpo", ["--data", "{bad}/nonutf8.jsonl"], "nonutf8.jsonl:2: not UTF-8 text"),
    ("dpo", ["--ref-model", "{bad}/no_such_model"], "--ref-model {bad}/no_such_model: not a directory"),
    ("dpo", ["--beta", "0"], "beta"),
    ("dpo", ["--loss-type", "bogus"], "invalid choice: 'bogus'"),
    ("dpo", ["--out", "{out}/a_file"], "is a file"),
    # train.rm
    ("rm", ["--data", "{bad}/bad_pairs.jsonl"], "no usable examples"),
    ("rm", ["--model", "{bad}/two_label_model"], "a classifier with 2 labels; a reward model has 1"),
    ("rm", ["--center-rewards", "-1"], "--center-rewards must be >= 0"),
    ("rm", ["--out", "{out}/run"], "already has checkpoints"),
    # train.grpo
    ("grpo", ["--reward-model", "{bad}/no_such_model"], "--reward-model {bad}/no_such_model: not a directory"),
    ("grpo", ["--reward-model", DEFAULT_MODEL + "=0.5"], "a causal LM, not a reward model"),
    ("grpo", ["--reward-model", "{bad}/two_label_model"], "a classifier with 2 labels, not a reward model"),
    ("grpo", ["--data", "{bad}/empty.jsonl"], "no usable examples"),
    ("grpo", ["--data", "{bad}/nonutf8.jsonl"], "nonutf8.jsonl:2: not UTF-8 text"),
    ("grpo", ["--data", "{bad}/noprompt.jsonl"], "no usable examples"),
    ("grpo", ["--group-size", "1"], "--group-size must be >= 2"),
    ("grpo", ["--reward", "nope"], "--reward nope: unknown reward"),
    ("grpo", ["--reward", "math=heavy"], "the weight 'heavy' is not a number"),
    ("grpo", ["--reward", "no_such_module_q:f"], "cannot import it"),
    ("grpo", ["--batch-size", "4"], "--batch-size is set by GRPO itself"),
    ("grpo", ["--prompts-per-step", "0"], "--prompts-per-step must be >= 1"),
    ("grpo", ["--temperature", "0"], "--temperature must be > 0"),
    ("grpo", ["--beta", "-1"], "--beta must be >= 0"),
    ("grpo", ["--max-new-tokens", "100000"], "exceeds the model's context"),
    ("grpo", ["--aggregation", "mean"], "invalid choice: 'mean'"),
    ("grpo", ["--moe-routing", "replay"], "--moe-routing replay needs a MoE model"),
    ("grpo", ["--inner-steps", "0"], "--inner-steps must be >= 1"),
]


def _main(cli):
    if cli == "generate":
        from infer.generate import main
    elif cli == "pretrain":
        from train.pretrain import main
    elif cli == "sft":
        from train.sft import main
    elif cli == "grpo":
        from train.grpo import main
    elif cli == "rm":
        from train.rm import main
    else:
        from train.dpo import main
    return main


@pytest.mark.parametrize("cli,argv,message", ROWS, ids=[f"{i:02d}-{r[0]}" for i, r in enumerate(ROWS)])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(cli, argv, message, bad, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _workspace(tmp_path)
    before = _snapshot(tmp_path)
    fmt = lambda s: s.replace("{bad}", str(bad)).replace("{out}", str(tmp_path))  # noqa: E731
    base = {"generate": GEN, "pretrain": PRE, "sft": FT, "dpo": FT, "rm": FT, "grpo": RL}[cli]
    args = [fmt(a) for a in base + argv]
    try:
        rc = _main(cli)(args)
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert rc == 2, (rc, out, err[-3000:])
    assert "Traceback" not in out + err, err[-3000:]
    assert 1 <= len(lines) <= 2, lines
    assert lines[-1].startswith("error: ") and fmt(message) in lines[-1], lines
    after = _snapshot(tmp_path)
    assert {p: h for p, h in after.items() if p in before} == before  # nothing already written changed
    assert not os.path.exists(tmp_path / "new" / "checkpoints")

