"""python -m train.sft / train.dpo end to end (in-process, tiny step counts): LoRA and full fine-tuning,
malformed lines, one-line errors, precomputed reference log-probs, and the merged HF export."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from qwen_jax.assets import DEFAULT_MODEL
from train import dpo, sft
from train.finetune import DEMO_DIR

COMMON = ["--seq-len", "256", "--batch-size", "4", "--log-every", "1", "--no-progress", "--save-every", "100"]


def _demo_lines(name, n):
    with open(os.path.join(DEMO_DIR, name)) as f:
        return [next(f).rstrip("\n") for _ in range(n)]


def _data(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_sft_lora_reports_bad_lines_and_exports_merged_model(tmp_path, capsys):
    bad = ['{"messages": [{"role": "user", "content": "no answer"}]}', "{oops"]
    data = _data(tmp_path, "chats.jsonl", _demo_lines("sft_chats.jsonl", 40) + bad)
    out = str(tmp_path / "run")
    rc = sft.main(["--data", data, "--steps", "3", "--lr", "1e-2", "--lora-rank", "4", "--lora-targets", "q,v",
                   "--out", out, *COMMON])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "skipped 2 of 42 lines (line 41: the conversation has no assistant turn; line 42: not valid JSON" in err
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["step"] == 3 and summary["export"].endswith("hf")
    cfg = qwen_jax.Qwen3Config.from_json_file(DEFAULT_MODEL)
    r = 4
    assert summary["trainable_params"] == cfg.num_layers * r * (2 * cfg.hidden_size + cfg.num_heads * cfg.head_dim
                                                                + cfg.num_kv_heads * cfg.head_dim)
    _, base = qwen_jax.load_pretrained(DEFAULT_MODEL, progress=False)
    _, tuned = qwen_jax.load_pretrained(summary["export"], progress=False)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), base, tuned)
    assert changed["layers_0"]["attn"]["q"] and changed["layers_0"]["attn"]["v"]
    assert not changed["layers_0"]["attn"]["k"] and not changed["embed"]  # only the adapted weights moved
    assert qwen_jax.load_tokenizer(summary["export"]).has_chat_template


@pytest.mark.parametrize("extra,message", [
    (["--strict"], r":41: the conversation has no assistant turn \(drop --strict"),
    (["--lora-rank", "2", "--lora-targets", "q,router"], "unknown LoRA target"),
])
def test_sft_one_line_errors(tmp_path, capsys, extra, message):
    data = _data(tmp_path, "chats.jsonl", _demo_lines("sft_chats.jsonl", 40) +
                 ['{"messages": [{"role": "user", "content": "no answer"}]}'])
    rc = sft.main(["--data", data, "--steps", "1", "--out", str(tmp_path / "run"), *COMMON, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ")
    import re

    assert re.search(message, err[-1]), err


def test_empty_dataset_is_an_error(tmp_path, capsys):
    data = _data(tmp_path, "prefs.jsonl", ['{"prompt": "x"}', "", '{"chosen": "y"}'])
    rc = dpo.main(["--data", data, "--out", str(tmp_path / "run"), *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: no usable examples in"), err


def test_dpo_full_finetune_with_precomputed_reference(tmp_path, capsys):
    data = _data(tmp_path, "prefs.jsonl", _demo_lines("dpo_pairs.jsonl", 48))
    out = str(tmp_path / "run")
    rc = dpo.main(["--data", data, "--steps", "4", "--lr", "2e-4", "--precompute-ref", "--eval-fraction", "0.2",
                   "--out", out, *COMMON])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "reference log-probs precomputed for 48 pairs" in err
    summary = json.load(open(os.path.join(out, "summary.json")))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
                "logps/rejected"):
        assert np.isfinite(summary["train"][key]) and np.isfinite(summary["eval"]["eval_" + key]), key
    # real replies beat word-shuffled ones after 4 steps (the shipped model already knows some English)
    assert summary["eval"]["eval_rewards/accuracy"] > 0.7, summary["eval"]
    logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in logged if "rewards/accuracy" in r] == [1, 2, 3, 4]
    rc = dpo.main(["--data", data, "--steps", "4", "--out", out, *COMMON])
    assert rc == 2 and "already has checkpoints" in capsys.readouterr().err


def test_dpo_rejects_label_smoothing_with_ipo(tmp_path, capsys):
    rc = dpo.main(["--loss-type", "ipo", "--label-smoothing", "0.1", "--out", str(tmp_path / "r"), *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: --label-smoothing applies to the sigmoid loss only, not 'ipo'"]
