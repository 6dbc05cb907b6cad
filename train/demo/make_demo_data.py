"""Regenerate the shipped SFT and DPO demo datasets from the shipped Shakespeare corpus (deterministic).

    python train/demo/make_demo_data.py

sft_chats.jsonl: conversations in which the user gives one character's speech and asks for the reply of the
character who speaks next; the assistant answers with that reply. A third continue with a second exchange (what the next character answers), some a system
message. dpo_pairs.jsonl: the same kind of prompt; chosen is the real reply, rejected the same reply with
the words of every line shuffled (fluent verse is preferred to word salad). grpo_prompts.jsonl: raw play
text (one speech, then the next speaker's name) for the RL demo, whose reward (train/demo/rewards.py) counts
words of love in what the model says next.
"""

from __future__ import annotations

import json
import lzma
import os
import random
import re

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "corpus", "shakespeare.jsonl.xz")
SYSTEM = "You are a player in Shakespeare's company. Answer in character."
MAX_LINES, MAX_CHARS = 4, 240


def speeches(text: str):
    """(speaker, speech) in order, from 'Speaker.\\nline\\nline\\n\\n' blocks."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().split("\n") if ln.strip()]
        if len(lines) < 2 or not re.fullmatch(r"[A-Z][A-Za-z' ]{1,30}\.", lines[0]):
            continue
        body = "\n".join(lines[1:1 + MAX_LINES])
        if len(body) <= MAX_CHARS and not body.startswith(("[", "Enter", "Exit", "Exeunt")):
            out.append((lines[0][:-1], body))
    return out


def shuffle_words(speech: str, rng: random.Random) -> str:
    lines = []
    for line in speech.split("\n"):
        words = line.split()
        for _ in range(5):  # make sure every line of 3+ words actually changes
            rng.shuffle(words)
            if len(words) < 3 or words != line.split():
                break
        lines.append(" ".join(words))
    return "\n".join(lines)


def main():
    rng = random.Random(0)
    plays = [json.loads(line) for line in lzma.open(CORPUS, "rt", encoding="utf-8")]
    triples = []  # (speaker a, speech a, speaker b, speech b, speaker c, speech c) of consecutive speeches
    for play in plays:
        sp = speeches(play["text"])
        for i in range(len(sp) - 2):
            if sp[i][0] != sp[i + 1][0]:
                triples.append((*sp[i], *sp[i + 1], *sp[i + 2]))
    rng.shuffle(triples)
    ask = "Reply as {who}:\n{speech}"
    with open(os.path.join(HERE, "sft_chats.jsonl"), "w", encoding="utf-8") as f:
        for k, (a, sa, b, sb, c, sc) in enumerate(triples[:1200]):
            msgs = [{"role": "system", "content": SYSTEM}] if k % 4 == 0 else []
            msgs += [{"role": "user", "content": ask.format(who=b, speech=sa)}, {"role": "assistant", "content": sb}]
            if k % 3 == 0 and c != b:  # a second exchange: who answers that?
                msgs += [{"role": "user", "content": f"And what does {c} say to that?"},
                         {"role": "assistant", "content": sc}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    with open(os.path.join(HERE, "dpo_pairs.jsonl"), "w", encoding="utf-8") as f:
        for a, sa, b, sb, *_ in triples[1200:2000]:
            if len(sb.split()) < 4:
                continue
            f.write(json.dumps({"prompt": ask.format(who=b, speech=sa), "chosen": sb,
                                "rejected": shuffle_words(sb, rng)}, ensure_ascii=False) + "\n")
    with open(os.path.join(HERE, "grpo_prompts.jsonl"), "w", encoding="utf-8") as f:
        for a, sa, b, *_ in triples[2000:2240]:  # a speech, then the next speaker's name: the model goes on
            f.write(json.dumps({"prompt": f"{a}.\n{sa}\n\n{b}.\n"}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
