"""The GRPO demo's reward: how much of what the model says is about love.

    python -m train.grpo --reward train.demo.rewards:love_words

A user reward like any other: a function (prompt, completion, info) -> float.
"""

from __future__ import annotations

import re

LOVE = frozenset("""love loves loved lover lovers loving lovely heart hearts sweet sweeter sweetest sweetly dear
dearest darling kiss kisses kissed fair fairest beauty beauteous gentle desire passion adore cupid venus bride
wed wedding marry married embrace affection tender rose roses""".split())


def love_words(prompt: str, completion: str, info: dict) -> float:
    """The share of the completion's words that are words of love (0 for an empty completion)."""
    words = re.findall(r"[a-z']+", completion.lower())
    return sum(w.strip("'") in LOVE for w in words) / len(words) if words else 0.0
