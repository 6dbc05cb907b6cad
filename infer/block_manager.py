"""The KV block manager: reference-counted pages with prefix caching.

A full block is identified by a chained hash of (hash of the previous block, its tokens). A block's hash
is registered only once its K/V are computed (`commit`, after each step), so a chunked prefill never
shares a block that is still being filled. When a new sequence's prompt starts with registered blocks
(held by a running request, or freed but not yet reused), those blocks are shared: their reference count
goes up and their prefill is skipped. The block holding a prompt's last token is never taken from the
cache, so every prefill computes at least one token (whose logits start generation) and never writes
into a shared block.
"""

from __future__ import annotations

from collections import deque

from infer.sequence import Sequence
from kernels.util import cdiv


class Block:
    __slots__ = ("id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: deque[int] = deque(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.cache_hits = 0  # blocks reused from the prefix cache (cumulative)
        self.cache_queries = 0  # full prompt blocks looked up in the prefix cache (cumulative)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def usage(self) -> float:
        """Share of the pool held by live sequences (free blocks that keep a cached prefix count as free)."""
        return 1.0 - self.num_free / max(self.num_blocks, 1)

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks seq lacks for positions 0 .. num_tokens - 1 (what `reserve` would take)."""
        return max(self.blocks_needed(num_tokens) - len(seq.block_table), 0)

    @staticmethod
    def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free >= self.blocks_needed(len(seq))

    def _cached_prefix(self, tokens: list[int]) -> list[tuple[int, int]]:
        """(hash, block id) of the leading full blocks of `tokens` found in the prefix cache; the block holding
        the last token is never shared (its K/V must be computed for the first sample)."""
        bs, prev, out = self.block_size, None, []
        for i in range((len(tokens) - 1) // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = self.chain_hash(prev, chunk)
            cached = self.hash_to_block.get(h)
            if cached is None or self.blocks[cached].token_ids != chunk:  # a miss, or a hash collision
                break
            out.append((h, cached))
            prev = h
        return out

    def cached_tokens(self, seq: Sequence) -> int:
        """Tokens of seq that `allocate` would find in the prefix cache now."""
        return len(self._cached_prefix(seq.token_ids)) * self.block_size

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of seq's current tokens, sharing cached full prefix blocks."""
        assert not seq.block_table
        tokens = seq.token_ids
        hits = self._cached_prefix(tokens)
        self.cache_queries += (len(tokens) - 1) // self.block_size  # the blocks that could be shared
        self.cache_hits += len(hits)
        for h, block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free.remove(block.id)
            block.ref_count += 1
            seq.hashes.append(h)
            seq.block_table.append(block.id)
        seq.num_cached = len(hits) * self.block_size
        for _ in range(self.blocks_needed(len(tokens)) - len(hits)):
            seq.block_table.append(self._new_block().id)
        seq.num_computed = seq.num_cached

    def _new_block(self) -> Block:
        block = self.blocks[self.free.popleft()]
        self._forget(block)  # its old contents are about to be overwritten
        block.ref_count = 1
        return block

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self.hash_to_block.get(block.hash) == block.id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids = None, ()

    def _register(self, block: Block, h: int, tokens: tuple[int, ...]) -> None:
        block.hash, block.token_ids = h, tokens
        self.hash_to_block[h] = block.id

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (the K/V were computed with weights that have since changed). Blocks
        held by live sequences stay theirs; only their sharing ends."""
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.hash_to_block.clear()

    def deallocate(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free.append(block_id)  # keeps its hash: a later prompt may still revive it
        seq.block_table = []
        seq.hashes = []
        seq.num_computed = 0

    def can_append(self, seq: Sequence) -> bool:
        """Room for the K/V of seq's newest token (position len - 1)."""
        return len(seq.block_table) >= self.blocks_needed(len(seq)) or self.num_free >= 1

    def append_slot(self, seq: Sequence) -> None:
        """Make sure the block for position len - 1 exists."""
        self.reserve(seq, len(seq))

    def reserve(self, seq: Sequence, num_tokens: int) -> None:
        """Make sure seq has blocks for positions 0 .. num_tokens - 1 (a multi-step decode window's)."""
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._new_block().id)

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of seq's full blocks whose K/V are now computed (call after each step)."""
        bs = self.block_size
        if (len(seq.hashes) + 1) * bs > seq.num_computed:
            return
        tokens = seq.token_ids
        while (len(seq.hashes) + 1) * bs <= seq.num_computed:
            i = len(seq.hashes)
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = self.chain_hash(seq.hashes[-1] if seq.hashes else None, chunk)
            seq.hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:
                self._register(block, h, chunk)
