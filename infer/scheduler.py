"""Continuous batching: which sequences run in the next step, and how many tokens each.

A step is either a prefill step or a decode step (prefill first, as nano-vllm):
  * prefill: sequences still prefilling (a long prompt continues in chunks) and newly admitted ones, up to
    `max_num_batched_tokens` tokens and `max_num_seqs` sequences;
  * decode: one token for every running sequence. When the pool has no block for a sequence's next token,
    the most recently admitted sequence is preempted: its blocks are freed and it returns to the front of
    the queue, to be recomputed later. No request is ever dropped.
"""

from __future__ import annotations

from collections import deque

from infer.block_manager import BlockManager, Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[tuple[Sequence, int]], bool]:
        """-> ([(sequence, tokens this step)], is_prefill)."""
        batch: list[tuple[Sequence, int]] = []
        budget = self.max_tokens
        for seq in self.running:
            if seq.in_prefill and budget > 0 and len(batch) < self.max_num_seqs:
                n = min(len(seq) - seq.num_computed, budget)
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.can_allocate(seq):
                break
            self.waiting.popleft()
            self.bm.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed, budget)
            batch.append((seq, n))
            budget -= n
        if batch:
            return batch, True
        if self.waiting and not self.running:
            raise RuntimeError("the KV pool cannot hold the next waiting sequence even when empty")

        decode: list[Sequence] = []
        queue = list(self.running)
        while queue and len(decode) < self.max_num_seqs:
            seq = queue.pop(0)
            while not self.bm.can_append(seq):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.bm.append_slot(seq)
                decode.append(seq)
        self.running = decode + [s for s in queue if s.status == Status.RUNNING]
        return [(s, 1) for s in decode], False

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.bm.deallocate(seq)
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.bm.deallocate(seq)
        self.running.remove(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop an unfinished sequence (its caller went away), freeing its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.deallocate(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"
