"""SFT / DPO data: the assistant loss mask against the rendered chat template, malformed lines, packing."""

import json

import numpy as np
import pytest

import qwen_jax
from qwen_jax.assets import DEFAULT_MODEL
from qwen_jax.errors import DataError
from train import chat_data as C

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who art thou?"},
    {"role": "assistant", "content": "A poor player, my lord."},
    {"role": "user", "content": "And whence?"},
    {"role": "assistant", "content": "From Verona,\nfair Verona."},
]


@pytest.fixture(scope="module")
def tok():
    return qwen_jax.load_tokenizer(DEFAULT_MODEL)  # Qwen3's chat template and special tokens


def _runs(mask):
    """[(start, stop)] of the runs of 1s."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_mask_covers_assistant_content_and_end_of_turn_only(tok):
    ids, mask = C.ChatRenderer(tok).render(CONVO)
    full = tok.apply_chat_template(CONVO, add_generation_prompt=False, tokenize=False)
    assert ids.tolist() == tok.encode(full)  # exactly the template's tokens
    spans = [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in _runs(mask)]
    # Earlier turns are rendered without a think block; Qwen3 gives the final turn an (empty) one, which the
    # model generates too, so it is part of the assistant's tokens.
    assert spans == ["A poor player, my lord.<|im_end|>", "<think>\n\n</think>\n\nFrom Verona,\nfair Verona.<|im_end|>"]
    rest = tok.decode(ids[mask == 0], skip_special_tokens=False)
    for text in ("Be brief.", "Who art thou?", "And whence?", "<|im_start|>assistant\n"):
        assert text in rest


def test_last_turn_only(tok):
    ids, mask = C.ChatRenderer(tok).render(CONVO, loss_from=4)
    assert [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in _runs(mask)] == [
        "<think>\n\n</think>\n\nFrom Verona,\nfair Verona.<|im_end|>"]


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


BAD_SFT = [
    {"messages": CONVO},
    "{not json",
    {"messages": []},
    {"messages": [{"role": "user", "content": "hello"}]},
    {"messages": [{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "user", "content": "speak " * 200}, {"role": "assistant", "content": "no"}]},
    {"text": "not a conversation"},
    {"messages": CONVO[1:3]},
]


def test_malformed_sft_lines_are_reported_with_line_numbers(tmp_path, tok):
    path = _write(tmp_path / "chats.jsonl", BAD_SFT)
    examples, bad, total = C.read_conversations(path, C.ChatRenderer(tok), max_len=128)
    assert total == 8 and len(examples) == 2
    reasons = dict(bad.items)
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7]
    assert "JSON" in reasons[2] and "non-empty list" in reasons[3] and "no assistant turn" in reasons[4]
    assert "role" in reasons[5] and "longer than --seq-len" in reasons[6] and "messages" in reasons[7]
    assert bad.summary(total).startswith(f"{path}: skipped 6 of 8 lines (line 2: not valid JSON")
    with pytest.raises(DataError, match=r"chats.jsonl:2: not valid JSON"):
        C.read_conversations(path, C.ChatRenderer(tok), max_len=128, strict=True)


def test_packing_keeps_conversations_whole(tok, rng):
    renderer = C.ChatRenderer(tok)
    examples = []
    for _ in range(40):
        n = int(rng.integers(1, 4))
        msgs = []
        for _ in range(n):
            msgs += [{"role": "user", "content": " ".join(["what"] * int(rng.integers(1, 12)))},
                     {"role": "assistant", "content": " ".join(["so"] * int(rng.integers(1, 12)))}]
        examples.append(renderer.render(msgs))
    row_len = 96
    with pytest.raises(ValueError, match="does not fit rows of 8"):
        C.pack_conversations(examples, 8, pad_id=0)
    examples = [ex for ex in examples if len(ex[0]) <= row_len]  # the reader drops longer ones
    tokens, seg, mask = C.pack_conversations(examples, row_len, pad_id=0)
    assert len(tokens) < len(examples)  # several per row
    found = []
    for r in range(len(tokens)):
        s = seg[r]
        n_real = int((s > 0).sum())
        assert (s[:n_real] > 0).all() and (s[n_real:] == 0).all() and (np.diff(s[:n_real]) >= 0).all()
        for k in np.unique(s[s > 0]):
            found.append((tokens[r][s == k].tolist(), mask[r][s == k].tolist()))
    assert sorted(found) == sorted((ids.tolist(), m.tolist()) for ids, m in examples)
    assert int(mask.sum()) == sum(int(m.sum()) for _, m in examples)


def test_preference_lines(tmp_path, tok):
    lines = [
        {"prompt": "Who art thou?", "chosen": "A player.", "rejected": "player A."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "chosen": {"role": "assistant", "content": "Good morrow."},
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"prompt": "x", "chosen": "y"},
        {"prompt": "x", "chosen": [{"role": "user", "content": "y"}], "rejected": "z"},
        {"prompt": "x", "chosen": 5, "rejected": "z"},
    ]
    path = _write(tmp_path / "prefs.jsonl", lines)
    pairs, bad, total = C.read_preferences(path, C.ChatRenderer(tok), max_len=128)
    assert total == 5 and len(pairs) == 2
    assert [n for n, _ in bad.items] == [3, 4, 5] and "rejected" in bad.items[0][1]
    assert "no assistant message" in bad.items[1][1]
    ci, cm, ri, rm = pairs[0]
    assert tok.decode(ci[cm == 1], skip_special_tokens=False) == "<think>\n\n</think>\n\nA player.<|im_end|>"
    assert tok.decode(ri[rm == 1], skip_special_tokens=False) == "<think>\n\n</think>\n\nplayer A.<|im_end|>"
    ci, cm, _, _ = pairs[1]
    assert tok.decode(ci[cm == 1], skip_special_tokens=False).endswith("Good morrow.<|im_end|>")
    assert "Be brief." in tok.decode(ci[cm == 0], skip_special_tokens=False)
    tokens, seg, mask = C.pad_pairs(pairs, 64, pad_id=0)
    assert tokens.shape == (2, 2, 64) and seg[0, 0, :len(pairs[0][0])].all() and not seg[0, 0, len(pairs[0][0]):].any()


def test_degenerate_examples_are_kept_and_counted_in_one_warning(tmp_path, tok):
    empty_turn = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "  "}]
    chats = _write(tmp_path / "chats.jsonl", [{"messages": CONVO}, {"messages": empty_turn},
                                              {"messages": CONVO[:2] + empty_turn[1:] + CONVO[3:]}])
    convos, bad, _ = C.read_conversations(chats, C.ChatRenderer(tok), max_len=256)
    assert len(convos) == 3 and not bad.items
    assert bad.warnings() == [f"warning: {chats}: an empty assistant turn on 2 of 3 lines (2, 3); kept"]
    prefs = _write(tmp_path / "prefs.jsonl", [{"prompt": "Hi", "chosen": "Good morrow.", "rejected": "Go away."},
                                              {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}])
    pairs, bad, _ = C.read_preferences(prefs, C.ChatRenderer(tok), max_len=128)
    assert len(pairs) == 2 and bad.warnings() == [
        f"warning: {prefs}: identical chosen and rejected replies (no preference to learn) on 1 of 2 lines (2); kept"]
