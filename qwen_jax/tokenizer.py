"""Tokenizer and chat template: a thin wrapper over transformers' fast tokenizer.

The checkpoint's own chat template renders conversations (`apply_chat_template`), including Qwen3's
`enable_thinking` switch; nothing here re-implements a template. Files are read from a local
directory only (never a hub download).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from qwen_jax.errors import CheckpointError


# Markers that are part of Qwen3's output text (reasoning and tool calls). Qwen3's own tokenizer does not
# mark them special; some checkpoints (the shipped small one) do. Decoding keeps them either way.
CONTENT_MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>")


class Tokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        special = set(getattr(hf_tokenizer, "all_special_ids", ()))
        for tok in getattr(hf_tokenizer, "added_tokens_decoder", {}).values():
            if getattr(tok, "special", False):
                special.add(hf_tokenizer.convert_tokens_to_ids(tok.content))
        kept = {hf_tokenizer.convert_tokens_to_ids(m) for m in CONTENT_MARKERS}
        self._skip = frozenset(special - kept)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(
                os.path.join(path, "tokenizer_config.json")):
            raise CheckpointError(f"{path}: no tokenizer.json or tokenizer_config.json")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises many types for broken files
            raise CheckpointError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from None
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids: the tokenizer's eos plus Qwen's end-of-turn token when present."""
        ids = []
        for tok in (self.hf.eos_token, "<|im_end|>", "<|endoftext|>"):
            if tok is not None:
                i = self.hf.convert_tokens_to_ids(tok)
                if isinstance(i, int) and i != self.hf.unk_token_id and i not in ids:
                    ids.append(i)
        return tuple(ids)

    @property
    def pad_token_id(self) -> int | None:
        return self.hf.pad_token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. skip_special_tokens drops control tokens (end of turn, padding, ...) but keeps the
        reasoning and tool-call markers, which are part of the model's answer."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skip]
        return self.hf.decode(list(ids), skip_special_tokens=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            enable_thinking: bool | None = None, tokenize: bool = True, **kwargs):
        """Render with the checkpoint's template -> token ids (or the text with tokenize=False).

        enable_thinking=None leaves the template's default (Qwen3: thinking on)."""
        if not self.has_chat_template:
            raise CheckpointError("this tokenizer has no chat template (tokenizer_config.json: chat_template)")
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **kwargs)
        return self.encode(text) if tokenize else text

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.hf.save_pretrained(os.fspath(path))


def qwen3_chat_template() -> str:
    """The chat template shipped with the Qwen3 checkpoints (tokenizer_config.json), with enable_thinking."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "chat_templates", "qwen3.jinja")) as f:
        return f.read()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    return Tokenizer.from_pretrained(path)
