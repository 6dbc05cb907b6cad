"""Post-training data: chat conversations for SFT and preference pairs for DPO.

Both are rendered with the checkpoint's own chat template. The loss mask marks the tokens of assistant
turns, from just after the template's generation prompt (`<|im_start|>assistant\\n` for Qwen3) through the
end-of-turn token (`<|im_end|>`); everything else (system, user and tool turns, the role headers, the
newline after the end of turn) carries no loss. A turn's span is found by rendering the conversation up to
that turn with `add_generation_prompt=True`, which must be a prefix of the full rendering, and the tokens
are assigned through the tokenizer's character offsets, so the ids are exactly those of the full rendering.

Malformed lines (bad JSON, missing fields, no assistant turn, too long for --seq-len) are collected with
their line numbers: skipped and reported by default, or a DataError naming the first one with strict=True.

SFT rows pack whole conversations (best fit, never split) with segment ids; pad positions have segment id 0.
DPO rows hold one (chosen, rejected) pair each: tokens [N, 2, T+1], right-padded.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from qwen_jax.errors import DataError
from qwen_jax.files import iter_jsonl
from train.data import holdout_indices

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class BadLines:
    """Line-numbered problems met while reading one file."""

    path: str
    strict: bool = False
    items: list[tuple[int, str]] = field(default_factory=list)
    total: int = 0  # lines read (good and bad)
    notes: dict[str, list[int]] = field(default_factory=dict)  # degenerate but kept: what -> line numbers

    def note(self, line: int, what: str) -> None:
        self.notes.setdefault(what, []).append(line)

    def warnings(self) -> list[str]:
        """One line per kind of degenerate example kept, with its count and first lines."""
        out = []
        for what, lines in self.notes.items():
            first = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
            out.append(f"warning: {self.path}: {what} on {len(lines)} of {self.total} lines ({first}); kept")
        return out

    def add(self, line: int, reason: str) -> None:
        if self.strict:
            raise DataError(f"{self.path}:{line}: {reason} (drop --strict to skip such lines)")
        self.items.append((line, reason))

    def summary(self, total: int, show: int = 5) -> str | None:
        if not self.items:
            return None
        head = "; ".join(f"line {n}: {r}" for n, r in self.items[:show])
        more = f"; and {len(self.items) - show} more" if len(self.items) > show else ""
        return f"{self.path}: skipped {len(self.items)} of {total} lines ({head}{more})"


def read_lines(path: str, bad: BadLines):
    """(line number, object) for every JSON-object line; the others go to `bad`. Counts lines in bad.total."""

    def on_bad(n, reason):
        bad.total += 1
        bad.add(n, reason)

    for n, obj in iter_jsonl(path, on_bad=on_bad):
        bad.total += 1
        yield n, obj


def check_messages(messages, what: str = "messages") -> str | None:
    """Why a message list is malformed, or None."""
    if not isinstance(messages, list) or not messages:
        return f"{what!r} must be a non-empty list of {{'role', 'content'}} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"{what}[{i}] needs a 'role' in {ROLES}"
        if not isinstance(m.get("content"), str) and not m.get("tool_calls"):
            return f"{what}[{i}] ({m['role']}) needs a string 'content'"
    return None


class ChatRenderer:
    """Conversation -> (token ids, loss mask) with the tokenizer's chat template."""

    def __init__(self, tokenizer, template_kwargs: dict | None = None):
        self.tok = tokenizer
        self.hf = tokenizer.hf if hasattr(tokenizer, "hf") else tokenizer
        if not getattr(self.hf, "chat_template", None):
            raise DataError("the tokenizer has no chat template (tokenizer_config.json: chat_template), which "
                            "SFT and DPO need to render conversations")
        if not getattr(self.hf, "is_fast", False):
            raise DataError("SFT/DPO need a fast tokenizer (tokenizer.json) for token offsets")
        vocab = self.hf.get_vocab()
        self.end_of_turn = "<|im_end|>" if "<|im_end|>" in vocab else self.hf.eos_token
        self.kwargs = template_kwargs or {}

    def _text(self, messages, add_generation_prompt: bool) -> str:
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **self.kwargs)

    def render(self, messages: list[dict], loss_from: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """ids [n] int32 and mask [n] int8: 1 on the tokens of assistant turns at index >= loss_from.
        Raises ValueError (with the reason) when the template cannot render or split the conversation."""
        try:
            text = self._text(messages, False)
            spans = []
            for i, m in enumerate(messages):
                if m["role"] != "assistant" or i < loss_from:
                    continue
                prefix = self._text(messages[:i], True)
                if not text.startswith(prefix):
                    raise ValueError("the chat template does not render this conversation's prefix consistently")
                end = text.find(self.end_of_turn, len(prefix)) if self.end_of_turn else -1
                spans.append((len(prefix), len(text) if end < 0 else end + len(self.end_of_turn)))
        except ValueError:
            raise
        except Exception as e:  # jinja's TemplateError and raise_exception() in templates
            raise ValueError(f"the chat template rejected it ({e})") from None
        if not spans:
            raise ValueError("no assistant turn to train on")
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int32)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64)
        mask = np.zeros(len(ids), np.int8)
        for a, b in spans:
            mask[(starts >= a) & (starts < b)] = 1
        return ids, mask


# ------------------------------------------------------------------ SFT
def read_conversations(path: str, renderer: ChatRenderer, max_len: int, last_turn_only: bool = False,
                       strict: bool = False) -> tuple[list[tuple[np.ndarray, np.ndarray]], BadLines, int]:
    """-> ([(ids, mask)], the skipped lines, lines read). `max_len` = tokens a row holds (seq_len + 1)."""
    bad, out = BadLines(path, strict), []
    for n, obj in read_lines(path, bad):
        messages = obj.get("messages")
        err = check_messages(messages)
        if err is None:
            if not any(m["role"] == "assistant" for m in messages):
                err = "the conversation has no assistant turn"
        if err is None:
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            try:
                ids, mask = renderer.render(messages, loss_from=last if last_turn_only else 0)
            except ValueError as e:
                err = str(e)
        if err is None and len(ids) > max_len:
            err = f"{len(ids)} tokens, longer than --seq-len + 1 = {max_len}"
        if err is not None:
            bad.add(n, err)
            continue
        if any(m["role"] == "assistant" and not (m.get("content") or "").strip() and not m.get("tool_calls")
               for m in messages):
            bad.note(n, "an empty assistant turn")
        out.append((ids, mask))
    return out, bad, bad.total


def pack_conversations(examples: list[tuple[np.ndarray, np.ndarray]], row_len: int, pad_id: int):
    """Best-fit-decreasing packing of whole conversations into rows of row_len.

    -> tokens, segment_ids (1, 2, ... per conversation, 0 = padding), loss_mask; each [rows, row_len]."""
    longest = max((len(ids) for ids, _ in examples), default=0)
    if longest > row_len:
        raise ValueError(f"a conversation of {longest} tokens does not fit rows of {row_len}")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row)
    for i in order:
        n = len(examples[i][0])
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = row_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    tokens = np.full((len(rows), row_len), pad_id, np.int32)
    seg = np.zeros((len(rows), row_len), np.int32)
    mask = np.zeros((len(rows), row_len), np.int8)
    for r, members in enumerate(rows):
        pos = 0
        for s, i in enumerate(sorted(members), 1):
            ids, m = examples[i]
            tokens[r, pos:pos + len(ids)], seg[r, pos:pos + len(ids)], mask[r, pos:pos + len(ids)] = ids, s, m
            pos += len(ids)
    return tokens, seg, mask


# ------------------------------------------------------------------ DPO
def _as_messages(value, role: str, what: str):
    """A DPO field -> a message list: a string becomes one `role` message; a message or a list is checked."""
    if isinstance(value, str):
        return [{"role": role, "content": value}], None
    if isinstance(value, dict):
        value = [value]
    err = check_messages(value, what)
    return (None, err) if err else (value, None)


def read_preferences(path: str, renderer: ChatRenderer, max_len: int, strict: bool = False):
    """-> ([(chosen ids, chosen mask, rejected ids, rejected mask)], the skipped lines, lines read).

    Each line: {"prompt": str | messages, "chosen": str | message(s), "rejected": str | message(s)}. A string
    prompt is one user message; a string response is one assistant message. The loss mask covers the
    response's assistant turns only."""
    bad, out = BadLines(path, strict), []
    for n, obj in read_lines(path, bad):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
        err = f"missing field(s) {', '.join(missing)}" if missing else None
        if err is None:
            prompt, err = _as_messages(obj["prompt"], "user", "prompt")
        pair = []
        for key in ("chosen", "rejected"):
            if err is not None:
                break
            resp, err = _as_messages(obj[key], "assistant", key)
            if err is None and not any(m["role"] == "assistant" for m in resp):
                err = f"{key!r} has no assistant message"
            if err is None:
                try:
                    ids, mask = renderer.render(prompt + resp, loss_from=len(prompt))
                except ValueError as e:
                    err = f"{key}: {e}"
                else:
                    if len(ids) > max_len:
                        err = f"{key}: {len(ids)} tokens, longer than --seq-len + 1 = {max_len}"
                    pair += [ids, mask]
        if err is not None:
            bad.add(n, err)
            continue
        if np.array_equal(pair[0], pair[2]):
            bad.note(n, "identical chosen and rejected replies (no preference to learn)")
        out.append(tuple(pair))
    return out, bad, bad.total


def pad_pairs(pairs, row_len: int, pad_id: int):
    """-> tokens, segment_ids (1 on real tokens, 0 on padding), loss_mask: each [N, 2, row_len]."""
    N = len(pairs)
    tokens = np.full((N, 2, row_len), pad_id, np.int32)
    seg = np.zeros((N, 2, row_len), np.int32)
    mask = np.zeros((N, 2, row_len), np.int8)
    for i, (ci, cm, ri, rm) in enumerate(pairs):
        for j, (ids, m) in enumerate(((ci, cm), (ri, rm))):
            tokens[i, j, :len(ids)], seg[i, j, :len(ids)], mask[i, j, :len(ids)] = ids, 1, m
    return tokens, seg, mask


def split_examples(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded hold-out of round(fraction * n) examples (at least 1 when fraction > 0 and n >= 2)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    held = holdout_indices(len(examples), fraction, seed)
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])
