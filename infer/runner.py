"""The model runner: it owns the paged KV pool (and its sizing) and the sampler's penalty state, and runs
the jitted step: forward over the paged cache, logits at each row's last token only, and sampling, all on
device. The cache and the penalty state are donated and come back updated.

With `record_routes` (MoE models, for RL's routing replay) each step also returns the experts every token
went to in every MoE layer; the runner keeps them on the host in a pool indexed like the KV pool (one row
per cache slot), so a prefix shared through the cache shares its routes too, and `collect_routes` reads a
sequence's back through its block table before its blocks are freed.

Shapes are bucketed to powers of two (rows, tokens per row, block-table width), so after the first few
steps decoding never recompiles. Rows are right-aligned: each row's new tokens end in the last column
(padding goes in front with cache slot -1), so the last column holds every row's last token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import qwen_jax
from infer import sampling
from infer.sampling import SamplingParams
from infer.sequence import Sequence
from qwen_jax.config import Qwen3Config
from qwen_jax.errors import ConfigError
from qwen_jax.model import AttentionMeta, output_head
from qwen_jax.sharding import ShardingRules
from kernels.util import cdiv

CACHE_AXES = ("layers", "cache_blocks", None, "cache_kv_heads", "head_dim")


def bucket(n: int, cap: int | None = None) -> int:
    b = 1 << max(0, (n - 1).bit_length())
    return b if cap is None else min(b, cap)


def device_memory_stats() -> dict | None:
    """The first device's allocator statistics (None on CPU)."""
    return jax.devices()[0].memory_stats()


class ModelRunner:
    """`num_blocks=None` sizes the pool: on a GPU, a warm-up runs the largest prefill step against a minimal
    pool and the pool gets `memory_fraction` of the memory left at that step's peak; on a CPU (no memory
    statistics) it gets `kv_cache_gb`, at most enough for max_num_seqs full-length sequences."""

    def __init__(self, config: Qwen3Config, params, rules: ShardingRules, block_size: int, max_num_seqs: int,
                 max_model_len: int, max_num_batched_tokens: int, dtype, attn_impl: str = "auto",
                 num_blocks: int | None = None, memory_fraction: float = 0.9, kv_cache_gb: float = 1.0,
                 record_routes: bool = False):
        self.config, self.params, self.rules = config, params, rules
        self.record_routes = record_routes and config.is_moe
        self.routes_pool: np.ndarray | None = None  # [num_blocks * block_size, L_moe, k] expert ids
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_blocks = cdiv(max_model_len, block_size)
        self.dtype = jnp.dtype(dtype)
        self.attn_impl = attn_impl
        self._step = jax.jit(self._step_impl, donate_argnums=(1, 2), static_argnames=("top_logprobs",))
        self._reset_slot = jax.jit(self._reset_slot_impl, donate_argnums=(0,))
        self._init_penalty()
        if num_blocks is None:
            num_blocks = self._size_pool(max_model_len, max_num_batched_tokens, memory_fraction, kv_cache_gb)
        if num_blocks < self.max_blocks:
            raise ConfigError(f"the KV pool ({num_blocks} blocks of {block_size}) cannot hold one sequence of "
                              f"max_model_len={max_model_len}; lower max_model_len or give more memory")
        self.num_blocks = num_blocks
        self.cache = qwen_jax.init_cache(config, num_blocks, block_size, self.dtype, rules)
        if self.record_routes:
            n_moe = sum(config.is_moe_layer(i) for i in range(config.num_layers))
            self.routes_pool = np.zeros((num_blocks * block_size, n_moe, config.num_experts_per_tok), np.int16)

    # ------------------------------------------------------------------ pool sizing
    def bytes_per_block(self) -> int:
        """Bytes one KV block takes on each device (K and V, every layer), under the cache's sharding."""
        c = self.config
        shape = (c.num_layers, 1, self.block_size, c.num_kv_heads, c.head_dim)
        shard = self.rules.sharding(CACHE_AXES, shape).shard_shape(shape)
        return 2 * math.prod(shard) * self.dtype.itemsize

    def _size_pool(self, max_model_len, max_num_batched_tokens, fraction, kv_cache_gb) -> int:
        per_seq = self.max_blocks
        stats = device_memory_stats()
        if stats and "bytes_limit" in stats:
            self.cache = qwen_jax.init_cache(self.config, per_seq + 1, self.block_size, self.dtype, self.rules)
            n = min(max_num_batched_tokens, max_model_len - 1)
            probe = Sequence([0] * n, SamplingParams(), seed=0, max_tokens=1)
            probe.block_table = list(range(cdiv(n, self.block_size)))
            jax.block_until_ready(self.run([(probe, n)]))
            del self.cache
            self._init_penalty()
            stats = device_memory_stats()
            peak = max(stats.get("peak_bytes_in_use", 0), stats["bytes_in_use"])
            return max(int((stats["bytes_limit"] - peak) * fraction) // self.bytes_per_block(), 0)
        budget = int(kv_cache_gb * 2**30) // self.bytes_per_block()
        return max(min(budget, self.max_num_seqs * per_seq + 1), per_seq)

    # ------------------------------------------------------------------ penalty state
    def _init_penalty(self) -> None:
        V = self.config.vocab_size
        replicated = self.rules.sharding((None, None), (self.max_num_seqs, V))
        self.penalty = {
            "counts": jax.device_put(np.zeros((self.max_num_seqs, V), np.int32), replicated),
            "seen": jax.device_put(np.zeros((self.max_num_seqs, V), bool), replicated),
        }
        self.slot_owner = [-1] * self.max_num_seqs  # which sequence's counts each penalty row holds

    @staticmethod
    def _reset_slot_impl(penalty, slot, prompt_ids, n):
        """Zero a slot's output counts and mark its prompt tokens as seen."""
        V = penalty["seen"].shape[1]
        mask = jnp.arange(prompt_ids.shape[0]) < n
        seen_row = jnp.zeros((V,), bool).at[jnp.where(mask, prompt_ids, V)].set(True, mode="drop")
        return {"counts": penalty["counts"].at[slot].set(0), "seen": penalty["seen"].at[slot].set(seen_row)}

    def _claim_slot(self, seq: Sequence) -> None:
        """A penalised sequence's row starts from its prompt (its output so far is recounted only after a
        slot change, which the scheduler never makes: a sequence keeps its slot until it finishes)."""
        if self.slot_owner[seq.slot] == seq.id:
            return
        self.slot_owner[seq.slot] = seq.id
        ids = np.zeros(bucket(len(seq.prompt_ids)), np.int32)
        ids[:len(seq.prompt_ids)] = seq.prompt_ids
        self.penalty = self._reset_slot(self.penalty, jnp.int32(seq.slot), jnp.asarray(ids),
                                        jnp.int32(len(seq.prompt_ids)))

    # ------------------------------------------------------------------ the step
    def _step_impl(self, params, cache, penalty, ids, positions, slots, block_tables, lengths, rows, valid, rp,
                   top_logprobs):
        meta = AttentionMeta(slots, block_tables, lengths)
        out = qwen_jax.forward(self.config, params, ids, positions=positions, cache=cache, meta=meta,
                               dtype=self.dtype, rules=self.rules, attn_impl=self.attn_impl, return_hidden=True)
        head = output_head(self.config, params).astype(self.dtype)
        logits = jnp.einsum("BD,DV->BV", out.hidden[:, -1], head, preferred_element_type=jnp.float32)
        tokens, chosen, top_ids, top_lp = sampling.sample(logits, rp, penalty["counts"][rows], penalty["seen"][rows],
                                                          top_logprobs)
        counts = penalty["counts"].at[rows, tokens].add(valid.astype(jnp.int32))
        routes = out.routes.astype(jnp.int16) if self.record_routes else None  # [L_moe, B, T, k]
        return out.cache, {"counts": counts, "seen": penalty["seen"]}, tokens, chosen, top_ids, top_lp, routes

    def run(self, batch: list[tuple[Sequence, int]]):
        """One step for [(seq, new tokens)] -> (tokens, chosen logprobs, top ids, top logprobs, valid) as numpy;
        `valid[r]`: row r reached its sequence's end, so its sample is a new token."""
        n = len(batch)
        B = bucket(n, self.max_num_seqs)
        T = bucket(max(k for _, k in batch))
        W = bucket(max(len(s.block_table) for s, _ in batch), self.max_blocks)
        bs = self.block_size
        ids = np.zeros((B, T), np.int32)
        positions = np.zeros((B, T), np.int32)
        slots = np.full((B, T), -1, np.int32)
        tables = np.zeros((B, W), np.int32)
        lengths = np.zeros(B, np.int32)
        rows = np.zeros(B, np.int32)
        valid = np.zeros(B, bool)
        for r, (seq, k) in enumerate(batch):
            start = seq.num_computed
            pos = np.arange(start, start + k)
            table = np.asarray(seq.block_table, np.int32)
            ids[r, T - k:] = seq.tokens(start, start + k)
            positions[r, T - k:] = pos
            slots[r, T - k:] = table[pos // bs] * bs + pos % bs
            tables[r, :len(table)] = table
            lengths[r] = start + k
            rows[r] = max(seq.slot, 0)
            valid[r] = start + k == len(seq)  # this step reaches the end: its sample is kept
            if seq.slot >= 0 and seq.params.uses_penalties:
                self._claim_slot(seq)
        rp = sampling.row_params([s.params for s, _ in batch], [s.seed for s, _ in batch],
                                 [len(s.output_ids) for s, _ in batch], B)
        top = sampling.MAX_LOGPROBS if any((s.params.logprobs or 0) > 0 for s, _ in batch) else 0
        self.cache, self.penalty, tokens, chosen, top_ids, top_lp, routes = self._step(
            self.params, self.cache, self.penalty, ids, positions, slots, tables, lengths, rows, valid,
            rp, top_logprobs=top)
        tokens, chosen, top_ids, top_lp, routes = jax.device_get((tokens, chosen, top_ids, top_lp, routes))
        if routes is not None and self.routes_pool is not None:
            filled = slots >= 0
            self.routes_pool[slots[filled]] = np.moveaxis(routes, 0, 2)[filled]  # [tokens, L_moe, k]
        return tokens[:n], chosen[:n], top_ids[:n], top_lp[:n], valid[:n]

    def collect_routes(self, seq: Sequence) -> None:
        """seq.routes = the experts of each of its computed positions, [num_computed, L_moe, k] int32 (call
        before its blocks are freed)."""
        pos = np.arange(seq.num_computed)
        table = np.asarray(seq.block_table, np.int64)
        slots = table[pos // self.block_size] * self.block_size + pos % self.block_size
        seq.routes = self.routes_pool[slots].astype(np.int32)
