"""Sequence: the per-sample state of a request, from admission to finish.

The scheduler owns the lifecycle (status, block table, computed-token count, penalty slot) and appends the
sampled tokens; the engine owns the text side (detokenized text, what was already streamed). One request
with n samples has n sequences that share its prompt; sample i > 0 records the first sample as `parent`,
so the scheduler can admit it once the parent's prompt blocks are in the prefix cache.
"""

from __future__ import annotations

import enum
import itertools

from infer.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, seed: int, max_tokens: int,
                 request_id: str = "", index: int = 0, parent: "Sequence | None" = None):
        self.id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index  # sample index within its request (0 .. n-1)
        self.parent = parent
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.seed = seed
        self.max_tokens = max_tokens  # params.max_tokens, or what the context leaves when that is None
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.num_cached = 0  # prompt tokens found in the prefix cache at the last admission
        self.slot = -1  # row in the sampler's penalty state, held from first admission to finish
        self.finish_reason: str | None = None
        self.logprobs: list[dict[int, float]] = []
        self.hashes: list[int] = []  # chain hashes of the leading full blocks whose K/V are computed
        self.routes = None  # with routing recorded: [num_computed, L_moe, k] experts, set when it finishes

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.id}, request={self.request_id!r}, index={self.index}, {self.status.value}, "
                f"len={len(self)}, computed={self.num_computed})")

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, stop: int) -> list[int]:
        """token_ids[start:stop] without building the whole list (the per-step hot path)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n:stop - n]
        return self.prompt_ids[start:stop] + self.output_ids[:max(0, stop - n)]

    @property
    def in_prefill(self) -> bool:
        """More than the last token still lacks K/V (a prompt, or a recompute after preemption). A sequence
        with only its last token uncomputed is in decode: one token in, the next one sampled."""
        return self.num_computed < len(self) - 1

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
