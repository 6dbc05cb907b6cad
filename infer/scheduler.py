"""Continuous batching: which sequences run in the next step, how many tokens each, and what happens to
them after it. The scheduler owns the block manager and the sampler's penalty slots.

A step is either a prefill step or a decode step (prefill first, as nano-vllm):
  * prefill: sequences still prefilling (a long prompt continues in chunks) and newly admitted ones, up to
    `max_num_batched_tokens` tokens and `max_num_seqs` sequences. A prompt is split only when it does not
    fit an empty step: one that does not fit what a step has left waits for the next, so that steps of new
    prompts stay whole (the runner packs those; a continued chunk needs the padded layout);
  * decode: one token for every running sequence. When the pool has no block for a sequence's next token,
    the most recently admitted sequence is preempted: its blocks are freed and it returns to the front of
    the queue, to be recomputed later. No request is ever dropped.
Sample i > 0 of an n-sample request waits until its first sample's full prompt blocks are computed, then
shares them through the prefix cache (reference counts), so the prompt is prefilled once.

After a step, `postprocess` appends each sequence's sampled token, registers newly full blocks in the
prefix cache, and finishes sequences that hit EOS, a stop token, their token budget or the context length.
Stop strings are the engine's (they need text); it calls `finish`.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from infer.block_manager import BlockManager
from infer.sequence import Sequence, Status


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_ids: frozenset[int] = frozenset()):
        self.block_manager = BlockManager(num_blocks, block_size)
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_ids = eos_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_num_seqs))
        self.num_preemptions = 0
        self.on_finish = None  # called with a finishing sequence before its blocks are freed

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def _held(self, seq: Sequence) -> bool:
        """Sample i > 0 waits (before its first admission) while its parent's full prompt blocks are not yet
        computed, so that it finds them in the prefix cache."""
        p = seq.parent
        if p is None or seq.slot >= 0 or p.finished:
            return False
        bs = self.block_manager.block_size
        return p.status != Status.RUNNING or p.num_computed < (len(p.prompt_ids) - 1) // bs * bs

    def schedule(self) -> list[tuple[Sequence, int]]:
        """-> [(sequence, tokens this step)]: a prefill step if anything is to prefill, else a decode step."""
        bm = self.block_manager
        batch: list[tuple[Sequence, int]] = []
        budget = self.max_tokens
        for seq in self.running:
            if seq.in_prefill and budget > 0 and len(batch) < self.max_num_seqs:
                n = min(len(seq) - seq.num_computed, budget)
                batch.append((seq, n))
                budget -= n
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if self._held(seq):
                continue
            if batch and len(seq) > budget and len(seq) - bm.cached_tokens(seq) > budget:
                break  # it waits for a step with room for it whole (see the module's note)
            if not bm.can_allocate(seq) or (seq.slot < 0 and not self.free_slots):
                break
            self.waiting.remove(seq)
            bm.allocate(seq)
            if seq.slot < 0:
                seq.slot = self.free_slots.pop()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed, budget)
            batch.append((seq, n))
            budget -= n
        if batch:
            return batch
        if self.waiting and not self.running and not any(self._held(s) for s in self.waiting):
            raise RuntimeError("the KV pool cannot hold the next waiting sequence even when empty")

        decode: list[Sequence] = []
        queue = list(self.running)
        while queue and len(decode) < self.max_num_seqs:
            seq = queue.pop(0)
            while not bm.can_append(seq):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                bm.append_slot(seq)
                decode.append(seq)
        self.running = decode + [s for s in queue if s.status == Status.RUNNING]
        return [(s, 1) for s in decode]

    def left(self, seq: Sequence) -> int:
        """Tokens seq may still receive (its max_tokens, and the context length)."""
        return min(seq.max_tokens - len(seq.output_ids), self.max_model_len - len(seq))

    def plan_window(self, batch: list[tuple[Sequence, int]], max_steps: int) -> list[int] | None:
        """For a decode batch (each row's last token uncomputed), how many tokens each row takes in one
        multi-step window, with the blocks for them reserved; None: not a decode batch. The window is
        `max_steps` long, shorter when sequences wait (it then ends when the first running one must finish,
        so a slot frees up without delay) or when the free blocks cannot hold it (halved until they can)."""
        if any(k != 1 or seq.num_computed != len(seq) - 1 for seq, k in batch):
            return None
        left = [self.left(seq) for seq, _ in batch]
        n = min(max_steps, max(left))
        if self.waiting:
            n = min(n, min(left))
        bm = self.block_manager
        while n > 1:
            extra = sum(bm.missing(seq, len(seq) - 1 + min(n, lf)) for (seq, _), lf in zip(batch, left))
            if extra <= bm.num_free:
                break
            n //= 2
        n = max(n, 1)  # one token each: schedule() has reserved its block
        budgets = [min(n, lf) for lf in left]
        for (seq, _), b in zip(batch, budgets):
            bm.reserve(seq, len(seq) - 1 + b)
        return budgets

    def plan_next_window(self, seqs: list[Sequence], ahead: list[int], max_steps: int,
                         rows: Callable[[int, int], int], rows_now: int) -> list[int] | None:
        """Budgets for a window that continues one still in flight, where each sequence takes up to ahead[r]
        tokens, with the blocks reserved; None when no sequence would be left, when those left would run on
        fewer padded rows (`rows(n, horizon)`: the rows a fresh window takes for n sequences that may still
        take up to `horizon` tokens) than the window's `rows_now`, or when the free blocks cannot hold the
        window (the caller then reads the window in flight and schedules afresh)."""
        left = [0 if seq.finished else self.left(seq) - a for seq, a in zip(seqs, ahead)]
        n = min(max_steps, max(left))
        if n <= 0 or rows(sum(lf > 0 for lf in left), max(left)) < rows_now:
            return None
        bm = self.block_manager
        budgets = [max(min(n, lf), 0) for lf in left]
        need = [len(seq) - 1 + a + b for seq, a, b in zip(seqs, ahead, budgets)]
        if sum(bm.missing(seq, k) for seq, k, b in zip(seqs, need, budgets) if b) > bm.num_free:
            return None
        for seq, k, b in zip(seqs, need, budgets):
            if b:
                bm.reserve(seq, k)
        return budgets

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.block_manager.deallocate(seq)
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, batch: list[tuple[Sequence, int]], tokens, valid) -> list[Sequence]:
        """Record a step's results: every row's K/V are computed; rows that reached their end (`valid`) get
        their sampled token. -> the sequences that received a token (finished ones are released)."""
        sampled = []
        bm, bs = self.block_manager, self.block_manager.block_size
        for r, (seq, k) in enumerate(batch):  # the per-token hot path: checks inlined
            seq.num_computed += k
            if (len(seq.hashes) + 1) * bs <= seq.num_computed:
                bm.commit(seq)
            if not valid[r]:
                continue
            token = int(tokens[r])
            out = seq.output_ids
            out.append(token)
            sampled.append(seq)
            sp = seq.params
            if (token in self.eos_ids and not sp.ignore_eos) or token in sp.stop_token_ids:
                self.finish(seq, "stop")
            elif len(out) >= seq.max_tokens or len(seq.prompt_ids) + len(out) >= self.max_model_len:  # left() <= 0
                self.finish(seq, "length")
        return sampled

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish a sequence (done, or aborted: its caller went away) and release its blocks and slot."""
        if seq.finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.on_finish is not None:
            self.on_finish(seq)
        self.block_manager.deallocate(seq)
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1
        seq.status = Status.FINISHED
        seq.finish_reason = reason
