"""Rewards for RL (train.grpo): rule-based rewards, user functions, and their weighted combination.

A reward is a function `(prompt: str, completion: str, info: dict) -> float`. `info` holds the prompt line's
own fields (e.g. `answer`, and `messages` for a chat prompt) plus `completion_tokens` (the completion's length
in tokens) and `completion_token_ids`. A reward whose function has `batched = True` (a reward model,
train/reward_model.py) takes lists instead and returns one value per completion.

Built in:
* `math`: 1 when the completion's final answer (the last `\\boxed{...}`, else the last number) equals the
  line's `answer` (numerically when both are numbers: 0.5 = 1/2 = 0.50; else as normalised text), else 0.
* `format`: 1 for one well-formed `<think>...</think>` block followed by a non-empty answer, else 0.
* `length`: 0 up to `length_budget` completion tokens, then -(tokens - budget) / budget, down to -1.
* `even_tokens`: the share of completion tokens with an even id (a task a fresh model knows nothing of:
  the tests' and the benchmark's learning signal).

`--reward NAME[=WEIGHT]` picks them (repeatable); NAME is a built-in or `module:function` (a user function).
A reward that raises, or returns something other than a finite number, stops the run with one line naming
the reward and the prompt.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np

from qwen_jax.errors import ConfigError, DataError

RewardFn = Callable[[str, str, dict], float]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _as_number(s: str) -> Fraction | None:
    s = s.strip().strip("$").replace(",", "").replace(" ", "").rstrip(".")
    if s.startswith("\\frac{") and s.endswith("}") and "}{" in s:
        a, b = s[len("\\frac{"):-1].split("}{", 1)
        s = f"{a}/{b}"
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(completion: str) -> str | None:
    """The last \\boxed{...}, else the last number in the completion (after any think block)."""
    text = completion.rsplit("</think>", 1)[-1]
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def math_reward(prompt: str, completion: str, info: dict) -> float:
    pred, answer = final_answer(completion), info.get("answer")
    if pred is None or answer is None:
        return 0.0
    a, b = _as_number(pred), _as_number(str(answer))
    if a is not None and b is not None:
        return float(a == b)
    norm = lambda s: re.sub(r"\s+", "", str(s)).strip("$.").lower()  # noqa: E731
    return float(norm(pred) == norm(answer))


_FORMAT = re.compile(r"\s*<think>(?:(?!<think>|</think>).)*</think>\s*\S", re.S)


def format_reward(prompt: str, completion: str, info: dict) -> float:
    return float(_FORMAT.match(completion) is not None and completion.count("<think>") == 1
                 and completion.count("</think>") == 1)


def length_reward(budget: int) -> RewardFn:
    def length(prompt: str, completion: str, info: dict) -> float:
        over = info["completion_tokens"] - budget
        return 0.0 if over <= 0 else -min(1.0, over / budget)

    return length


def even_tokens_reward(prompt: str, completion: str, info: dict) -> float:
    ids = info["completion_token_ids"]
    return sum(1 for t in ids if t % 2 == 0) / len(ids) if ids else 0.0


BUILT_IN = {"math": lambda budget: math_reward, "format": lambda budget: format_reward, "length": length_reward,
            "even_tokens": lambda budget: even_tokens_reward}


@dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFn
    weight: float


def parse_rewards(specs: list[str], length_budget: int) -> list[Reward]:
    """`NAME[=WEIGHT]` specs -> rewards. ConfigError for an unknown name, a bad weight or an unimportable
    user function."""
    if not specs:
        raise ConfigError("no reward: give --reward (math, format, length, even_tokens or module:function)")
    out = []
    for spec in specs:
        name, _, weight = spec.partition("=")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"--reward {spec}: the weight {weight!r} is not a number") from None
        if not math.isfinite(w):
            raise ConfigError(f"--reward {spec}: the weight must be finite")
        if name in BUILT_IN:
            out.append(Reward(name, BUILT_IN[name](length_budget), w))
        elif ":" in name:
            module, _, attr = name.partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"--reward {name}: cannot import it ({type(e).__name__}: {e})") from None
            if not callable(fn):
                raise ConfigError(f"--reward {name}: not a function")
            out.append(Reward(name, fn, w))
        else:
            raise ConfigError(f"--reward {name}: unknown reward (built in: {', '.join(BUILT_IN)}; or module:function)")
    return out


@dataclass(frozen=True)
class Scored:
    """What one completion's rewards are computed from."""
    prompt: str
    completion: str
    info: dict
    where: str  # the prompt's file:line, for errors


def _checked(r: Reward, value, where: str) -> float:
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DataError(f"reward {r.name} returned {value!r} on {where}; a reward must be a finite number")
    return float(value)


def _values(r: Reward, items: list[Scored]) -> list[float]:
    if getattr(r.fn, "batched", False):  # e.g. a reward model: one call for the whole batch
        try:
            values = list(r.fn([i.prompt for i in items], [i.completion for i in items], [i.info for i in items]))
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"reward {r.name} failed on the completions of {items[0].where} and others: "
                            f"{type(e).__name__}: {e}") from None
        if len(values) != len(items):
            raise DataError(f"reward {r.name} returned {len(values)} values for {len(items)} completions")
        return [_checked(r, v, i.where) for v, i in zip(values, items)]
    out = []
    for i in items:
        try:
            value = r.fn(i.prompt, i.completion, i.info)
        except Exception as e:  # a user function's bug: one line naming it and the prompt
            raise DataError(f"reward {r.name} failed on {i.where}: {type(e).__name__}: {e}") from None
        out.append(_checked(r, value, i.where))
    return out


def score(rewards: list[Reward], items: list[Scored]) -> dict[str, np.ndarray]:
    """Each reward's values over the completions, checked: {name: [len(items)] float64}. DataError naming the
    reward and the prompt when a reward raises or returns something other than a finite number."""
    return {r.name: np.asarray(_values(r, items), np.float64) for r in rewards}


def total(rewards: list[Reward], values: dict[str, np.ndarray]) -> np.ndarray:
    """The weighted sum of the rewards' values."""
    return sum(r.weight * values[r.name] for r in rewards)
