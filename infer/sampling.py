"""Sampling parameters and the on-device sampler.

Every request carries its own SamplingParams; the jitted sampler gets them as per-row arrays, so one
batch mixes greedy and sampled requests. Order, as vLLM: repetition / presence / frequency penalties on
the raw logits, then temperature, then top-k, top-p and min-p filtering, then a Gumbel-max draw with the
request's own key: fold_in(PRNGKey(seed), number of tokens generated so far). The same seed therefore gives
the same tokens whatever else is in the batch. Logprobs are of the raw model distribution.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.errors import RequestError, require

MAX_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 256  # None: up to the context length
    n: int = 1  # samples of the prompt (the prompt is prefilled once and its blocks shared)
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in the prompt or the output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0: only the chosen token's)

    def __post_init__(self):
        # A single stop string or stop token is one stop, never a sequence of characters / digits.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is not None and not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop) if isinstance(self.stop, (list, set)) else self.stop)
        if isinstance(self.stop_token_ids, int) and not isinstance(self.stop_token_ids, bool):
            object.__setattr__(self, "stop_token_ids", (self.stop_token_ids,))
        elif isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    def validate(self) -> "SamplingParams":
        """Check every field's type and range; RequestError naming the first bad one."""
        def need(cond, msg):
            require(cond, f"invalid sampling parameter: {msg}", RequestError)

        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            need(number(getattr(self, name)), f"{name} must be a number, got {getattr(self, name)!r}")
        need(self.max_tokens is None or (integer(self.max_tokens) and self.max_tokens >= 1),
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        need(integer(self.n) and 1 <= self.n <= 128, f"n must be in [1, 128], got {self.n!r}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(integer(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        need(self.seed is None or (integer(self.seed) and 0 <= self.seed < 2**32),
             f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        need(self.logprobs is None or (integer(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        need(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
             f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        need(isinstance(self.stop_token_ids, tuple) and all(integer(t) and t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        need(isinstance(self.ignore_eos, bool), f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        return self

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def row_params(params: list[SamplingParams], seeds: list[int], generated: list[int], pad_to: int) -> dict:
    """Per-row numpy arrays for the jitted sampler (padding rows are greedy and ignored)."""
    n = len(params)

    def col(fn, dtype, fill):
        out = np.full(pad_to, fill, dtype)
        out[:n] = [fn(p) for p in params]
        return out

    seed_arr = np.zeros(pad_to, np.uint32)
    seed_arr[:n] = seeds
    gen = np.zeros(pad_to, np.int32)
    gen[:n] = generated
    return {
        "temperature": col(lambda p: p.temperature, np.float32, 0.0),
        "top_k": col(lambda p: p.top_k, np.int32, 0),
        "top_p": col(lambda p: p.top_p, np.float32, 1.0),
        "min_p": col(lambda p: p.min_p, np.float32, 0.0),
        "repetition_penalty": col(lambda p: p.repetition_penalty, np.float32, 1.0),
        "presence_penalty": col(lambda p: p.presence_penalty, np.float32, 0.0),
        "frequency_penalty": col(lambda p: p.frequency_penalty, np.float32, 0.0),
        "logprobs": col(lambda p: p.logprobs or 0, np.int32, 0),
        "seed": seed_arr,
        "generated": gen,
    }


def apply_penalties(logits_BV, rp, counts_BV, seen_BV):
    """Repetition penalty on tokens seen in prompt or output; presence / frequency on output counts."""
    rep = rp["repetition_penalty"][:, None]
    penalised = jnp.where(logits_BV > 0, logits_BV / rep, logits_BV * rep)
    logits_BV = jnp.where(seen_BV | (counts_BV > 0), penalised, logits_BV)
    counts = counts_BV.astype(jnp.float32)
    return (logits_BV - rp["presence_penalty"][:, None] * (counts > 0)
            - rp["frequency_penalty"][:, None] * counts)


def filter_logits(logits_BV, rp):
    """Temperature, then top-k / top-p / min-p masks (-inf outside). Greedy rows are left unscaled.

    The full-vocabulary sort that top-k / top-p need runs only when some row asks for one of them."""
    t = rp["temperature"][:, None]
    logits = jnp.where(t > 0, logits_BV / jnp.where(t > 0, t, 1.0), logits_BV)
    needs_sort = jnp.any((rp["top_k"] > 0) | (rp["top_p"] < 1.0))
    keep = jax.lax.cond(needs_sort, _top_k_top_p_mask, lambda lg, _: jnp.ones(lg.shape, bool), logits, rp)
    probs = jax.nn.softmax(logits, axis=-1)
    keep &= probs >= rp["min_p"][:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(keep, logits, -jnp.inf)


def _top_k_top_p_mask(logits, rp):
    V = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    k = jnp.where(rp["top_k"] > 0, jnp.minimum(rp["top_k"], V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    probs_sorted = jax.nn.softmax(sorted_desc, axis=-1)
    cum_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted  # mass strictly above each sorted token
    last = jnp.maximum(jnp.sum(cum_before < rp["top_p"][:, None], axis=-1) - 1, 0)  # last token in the nucleus
    p_thresh = jnp.take_along_axis(sorted_desc, last[:, None], axis=-1)
    return (logits >= kth) & (logits >= p_thresh)


def argmax_VB(logits_VB):
    """Each column's argmax of vocabulary-major logits [V, B] -> [B] int32 (ties go to the first index, as
    jnp.argmax's). In two passes over blocks of up to 128 vocabulary rows: the
    blocks' maxima, then the winning block's rows. A one-pass reduction down the long axis of [V, B] runs
    3-7x slower on CPU at 8-32 columns (151,936 rows)."""
    V, B = logits_VB.shape
    inner = math.gcd(V, 128)
    if inner < 16:
        return jnp.argmax(logits_VB, axis=0).astype(jnp.int32)
    blocks_CIB = logits_VB.reshape(V // inner, inner, B)
    block_B = jnp.argmax(jnp.max(blocks_CIB, axis=1), axis=0)  # the first block holding each column's max
    rows_IB = jnp.take_along_axis(blocks_CIB, block_B[None, None, :], axis=0)[0]
    return (block_B * inner + jnp.argmax(rows_IB, axis=0)).astype(jnp.int32)


def uses_penalties(rp):
    """[B] bool: the rows whose request has a repetition, presence or frequency penalty."""
    return (rp["repetition_penalty"] != 1) | (rp["presence_penalty"] != 0) | (rp["frequency_penalty"] != 0)


def sample(logits_BV, rp, counts_BV, seen_BV):
    """-> (tokens [B] int32, chosen logprob [B], top ids [B, MAX_LOGPROBS], top logprobs [B, MAX_LOGPROBS]);
    the top-n lists are computed only when some row asks for them (zeros otherwise)."""
    raw_logprobs = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    logits = jax.lax.cond(jnp.any(uses_penalties(rp)), lambda lg: apply_penalties(lg, rp, counts_BV, seen_BV),
                          lambda lg: lg, logits_BV.astype(jnp.float32))
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(lg):
        filtered = filter_logits(lg, rp)
        keys = jax.vmap(lambda s, g: jax.random.fold_in(jax.random.PRNGKey(s), g))(rp["seed"], rp["generated"])
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, lg.shape[-1:], jnp.float32))(keys)
        return jnp.where(rp["temperature"] > 0, jnp.argmax(filtered + gumbel, axis=-1).astype(jnp.int32), greedy)

    tokens = jax.lax.cond(jnp.any(rp["temperature"] > 0), draw, lambda lg: greedy, logits)
    chosen = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    n = min(MAX_LOGPROBS, logits.shape[-1])
    none = (jnp.zeros((logits.shape[0], n), jnp.float32), jnp.zeros((logits.shape[0], n), jnp.int32))
    top_lp, top_ids = jax.lax.cond(jnp.any(rp["logprobs"] > 0), lambda lp: tuple(jax.lax.top_k(lp, n)), lambda lp: none,
                                   raw_logprobs)
    return tokens, chosen, top_ids, top_lp
