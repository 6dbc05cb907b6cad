"""Tokenizer wrapper: the checkpoint's own chat template (Qwen3's, with enable_thinking) via transformers."""

import pytest

import qwen_jax
from qwen_jax import CheckpointError
from reference.hf_models import build_tokenizer, qwen3_chat_template

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello, world!"},
    {"role": "assistant", "content": "<think>\nthe user greets\n</think>\n\nHello."},
    {"role": "user", "content": "How are you today?"},
]


@pytest.fixture
def tok_dir(tmp_path):
    build_tokenizer(tmp_path, qwen3_chat_template())
    return tmp_path


def test_chat_template_matches_transformers(tok_dir):
    from transformers import AutoTokenizer

    ours = qwen_jax.load_tokenizer(tok_dir)
    hf = AutoTokenizer.from_pretrained(tok_dir)
    for thinking in (None, True, False):
        kw = {} if thinking is None else {"enable_thinking": thinking}
        text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, **kw)
        assert ours.apply_chat_template(MESSAGES, enable_thinking=thinking, tokenize=False) == text
        assert ours.apply_chat_template(MESSAGES, enable_thinking=thinking) == hf.encode(text, add_special_tokens=False)


def test_enable_thinking_switch(tok_dir):
    tok = qwen_jax.load_tokenizer(tok_dir)
    off = tok.apply_chat_template(MESSAGES, enable_thinking=False, tokenize=False)
    on = tok.apply_chat_template(MESSAGES, enable_thinking=True, tokenize=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")
    # Earlier turns' reasoning is dropped by Qwen3's template; the system prompt is kept.
    assert "the user greets" not in on and on.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")


def test_encode_decode_and_special_tokens(tok_dir):
    tok = qwen_jax.load_tokenizer(tok_dir)
    ids = tok.encode("To be, or not to be")
    assert tok.decode(ids) == "To be, or not to be"
    im_end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tok.eos_token_ids
    assert tok.decode(ids + [im_end]) == "To be, or not to be"
    assert tok.decode(ids + [im_end], skip_special_tokens=False).endswith("<|im_end|>")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        qwen_jax.load_tokenizer(tmp_path)
    build_tokenizer(tmp_path)  # no chat template
    with pytest.raises(CheckpointError, match="no chat template"):
        qwen_jax.load_tokenizer(tmp_path).apply_chat_template(MESSAGES)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load tokenizer"):
        qwen_jax.load_tokenizer(tmp_path)
