"""The model runner: it owns the paged KV pool (and its sizing) and the sampler's penalty state, and runs
the jitted step: forward over the paged cache, logits at each row's last token only, and sampling, all on
device. The cache and the penalty state are donated and come back updated.

With `record_routes` (MoE models, for RL's routing replay) each step also returns the experts every token
went to in every MoE layer; the runner keeps them on the host in a pool indexed like the KV pool (one row
per cache slot), so a prefix shared through the cache shares its routes too, and `collect_routes` reads a
sequence's back through its block table before its blocks are freed.

Shapes are bucketed to powers of two (rows, tokens per row, block-table width), so after the first few
steps decoding never recompiles. Rows are right-aligned: each row's new tokens end in the last column
(padding goes in front with cache slot -1), so the last column holds every row's last token. A prefill
step of new sequences only runs packed instead (`_run_packed`): their tokens back to back in one row with
a segment id each, so the step computes the tokens it has rather than rows x the longest.

Decoding runs in multi-step windows (`decode`): one jitted call runs up to `decode_steps` steps in a
`lax.while_loop`, feeding each sampled token back on device, stopping a row at its stop tokens or token
budget, and is read back once. Each step is the same computation as a one-step call (same sampler key,
same penalty counts), so the tokens are identical to stepping one at a time.

The sampler has a greedy fast path (`fast`, static): when no row samples, uses penalties or asks for
logprobs, a step is a plain argmax and the penalty state is left untouched.

Which program runs a step is `programs.Programs`' choice: the step's own bucket, or a larger program
already built until the padding it wastes has cost what a build costs. The runner measures both (the
dispatch that builds a program; a step's run until its results are read).
"""

from __future__ import annotations

import logging
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import qwen_jax
from infer import sampling
from infer.programs import Programs, Shape
from infer.sampling import SamplingParams
from infer.sequence import Sequence
from qwen_jax.config import Qwen3Config
from qwen_jax.errors import ConfigError
from qwen_jax.model import AttentionMeta, stored_output_head
from qwen_jax.sharding import ShardingRules
from kernels.util import cdiv

log = logging.getLogger("infer.runner")

CACHE_AXES = ("layers", "cache_blocks", None, "cache_kv_heads", "head_dim")
# Decode windows pad to at least this many rows: a decode step reads every weight whatever the batch, so 8
# rows cost about what 1 does, and the row buckets 1, 2 and 4 would each compile another program.
MIN_DECODE_ROWS = 8
# Prefill rows pad to at least this many tokens (short chunks cost little; each token bucket is a program).
MIN_PREFILL_TOKENS = 16


def bucket(n: int, cap: int | None = None) -> int:
    b = 1 << max(0, (n - 1).bit_length())
    return b if cap is None else min(b, cap)


def row_bucket(n: int, cap: int) -> int:
    """Decode rows: two buckets per power of two (8, 12, 16, 24, 32, 48, ...), so a shrinking batch pads at
    most a third instead of a half: decode is compute-bound on small devices, and padding rows cost."""
    b = bucket(n)
    if b >= 8 and n <= b * 3 // 4:
        b = b * 3 // 4
    return min(b, cap)


class Window(NamedTuple):
    """A decode window dispatched to the device: its rows, and what `collect` and a continuing window need."""
    seqs: list[Sequence]
    budgets: list[int]
    stop_ids: list[tuple[int, ...]]
    positions: np.ndarray  # [B] each row's first position
    tables: np.ndarray  # [B, W] block tables
    out: dict  # device arrays (see _decode_impl)
    own: Shape  # the window's own program
    used: Shape  # the program it runs on
    dispatched: float  # perf_counter() when its dispatch returned


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
                 record_routes: bool = False, decode_steps: int = 8):
        self.config, self.params, self.rules = config, params, rules
        self._replicated = NamedSharding(rules.mesh, P())  # per-row window inputs and outputs
        self.decode_steps = decode_steps  # the longest multi-step decode window
        self.record_routes = record_routes and config.is_moe
        self.routes_pool: np.ndarray | None = None  # [num_blocks * block_size, L_moe, k] expert ids
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_blocks = cdiv(max_model_len, block_size)
        self.dtype = jnp.dtype(dtype)
        self.attn_impl = attn_impl
        self._step = jax.jit(self._step_impl, donate_argnums=(1, 2), static_argnames=("fast",))
        self._packed_step = jax.jit(self._packed_step_impl, donate_argnums=(1, 2),
                                    static_argnames=("fast", "max_segment"))
        # prefill steps of new sequences only run packed (cuDNN's attention takes no segment ids)
        self.packed_prefill = attn_impl != "cudnn"
        self._decode = jax.jit(self._decode_impl, donate_argnums=(1, 2), static_argnames=("fast",))
        self._reset_slot = jax.jit(self._reset_slot_impl, donate_argnums=(0,))
        self.programs = Programs()
        self._idle_since = 0.0  # perf_counter() when the last step's results were read
        self._last_build = 0.0  # perf_counter() when the last program build ended
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
            self.programs = Programs()  # the probe's program was built for a pool of another size
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
    def _logits(self, params, cache, ids, positions, meta, packed=None):
        """-> (logits at each row's last token, vocabulary-major [V, B] float32, updated cache, routes
        [L_moe, B, T, k] or None). The head is the product's left operand (V rows against a handful of
        batch columns): on CPU that runs 1.3-1.5x faster than [B, D] x [D, V] at 8-32 rows.
        `packed` (segments [1, T], last [B], max_segment): the rows packed in one (`_packed_step_impl`)."""
        segments, last, max_segment = packed or (None, None, None)
        out = qwen_jax.forward(self.config, params, ids, positions=positions, segment_ids=segments, cache=cache,
                               meta=meta, dtype=self.dtype, rules=self.rules, attn_impl=self.attn_impl,
                               return_hidden=True, max_segment=max_segment)
        hidden_BD = out.hidden[:, -1] if last is None else out.hidden[0, last]
        head, axes = stored_output_head(self.config, params)
        logits_VB = jnp.einsum(f"{axes},BD->VB", head.astype(self.dtype), hidden_BD,
                               preferred_element_type=jnp.float32)
        routes = out.routes.astype(jnp.int16) if self.record_routes else None
        return logits_VB, out.cache, routes

    @staticmethod
    def _sample(logits_VB, penalty, rows, valid, rp, fast):
        """-> (tokens, chosen logprobs, top ids, top logprobs, penalty); `fast`: argmax only, state untouched."""
        B = logits_VB.shape[1]
        if fast:
            empty = jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), jnp.float32)
            return sampling.argmax_VB(logits_VB), jnp.zeros((B,), jnp.float32), *empty, penalty
        logits_BV = logits_VB.T
        tokens, chosen, top_ids, top_lp = sampling.sample(logits_BV, rp, penalty["counts"][rows],
                                                          penalty["seen"][rows])
        counts = penalty["counts"].at[rows, tokens].add((valid & sampling.uses_penalties(rp)).astype(jnp.int32))
        return tokens, chosen, top_ids, top_lp, {"counts": counts, "seen": penalty["seen"]}

    def _step_impl(self, params, cache, penalty, ids, positions, slots, block_tables, lengths, rows, valid, rp,
                   fast):
        logits, cache, routes = self._logits(params, cache, ids, positions, AttentionMeta(slots, block_tables, lengths))
        tokens, chosen, top_ids, top_lp, penalty = self._sample(logits, penalty, rows, valid, rp, fast)
        return cache, penalty, tokens, chosen, top_ids, top_lp, routes

    def _packed_step_impl(self, params, cache, penalty, ids, positions, slots, segments, last, rows, valid, rp,
                          fast, max_segment):
        """A prefill step of new sequences packed into one row: ids, positions, slots and segments [1, T] hold
        row r's tokens (segment r) back to back, padding at the end (slot -1, segment B); last [B]: the
        column of each row's last token. Attention stays within a segment (`qwen_jax.forward`)."""
        B = last.shape[0]
        meta = AttentionMeta(slots, jnp.zeros((B, 1), jnp.int32), jnp.zeros((B,), jnp.int32))  # pool not read
        logits, cache, routes = self._logits(params, cache, ids, positions, meta, (segments, last, max_segment))
        tokens, chosen, top_ids, top_lp, penalty = self._sample(logits, penalty, rows, valid, rp, fast)
        return cache, penalty, tokens, chosen, top_ids, top_lp, routes

    def _decode_impl(self, params, cache, penalty, tokens_B, halted_B, positions_B, tables_BW, rows, budget_B,
                     stop_BS, n_steps, rp, fast):
        """Up to n_steps decode steps: row b (unless halted_B[b]) feeds tokens_B[b] at positions_B[b], samples, feeds
        the sample back, and stops after budget_B[b] tokens or at a token in stop_BS[b] (-1 = none).
        -> (cache, penalty, out) with out[name] [K, B, ...] per step, out["valid"][i, b]: row b produced a
        token at step i; out["last"] [B]: each row's last token, out["halted"] [B]: it met a stop token."""
        K, bs = self.decode_steps, self.block_size
        B, W = tables_BW.shape
        top_logprobs = 0 if fast else min(sampling.MAX_LOGPROBS, self.config.vocab_size)
        out = {"tokens": jnp.zeros((K, B), jnp.int32), "chosen": jnp.zeros((K, B), jnp.float32),
               "top_ids": jnp.zeros((K, B, top_logprobs), jnp.int32),
               "top_lp": jnp.zeros((K, B, top_logprobs), jnp.float32), "valid": jnp.zeros((K, B), bool)}
        if self.record_routes:
            n_moe = sum(self.config.is_moe_layer(i) for i in range(self.config.num_layers))
            out["routes"] = jnp.zeros((K, n_moe, B, self.config.num_experts_per_tok), jnp.int16)

        def body(carry):
            i, cache, penalty, tok_B, active_B, halted_B, out = carry
            pos_B = positions_B + i
            page_B = jnp.take_along_axis(tables_BW, jnp.minimum(pos_B // bs, W - 1)[:, None], axis=1)[:, 0]
            slot_B = jnp.where(active_B, page_B * bs + pos_B % bs, -1)
            meta = AttentionMeta(slot_B[:, None], tables_BW, jnp.minimum(pos_B + 1, W * bs))
            logits, cache, routes = self._logits(params, cache, tok_B[:, None], pos_B[:, None], meta)
            step_rp = {**rp, "generated": rp["generated"] + i}
            new_B, chosen, top_ids, top_lp, penalty = self._sample(logits, penalty, rows, active_B, step_rp, fast)
            new_B = jnp.where(active_B, new_B, tok_B)
            step = {"tokens": new_B, "chosen": chosen, "top_ids": top_ids, "top_lp": top_lp, "valid": active_B}
            if routes is not None:
                step["routes"] = routes[:, :, 0]
            out = {k: v.at[i].set(step[k]) for k, v in out.items()}
            hit = active_B & jnp.any(new_B[:, None] == stop_BS, axis=1)
            return i + 1, cache, penalty, new_B, active_B & ~hit & (i + 1 < budget_B), hit | halted_B, out

        def cond(carry):
            return (carry[0] < n_steps) & jnp.any(carry[4])

        # a row that met a stop token in an earlier window stays halted
        init = (jnp.int32(0), cache, penalty, tokens_B, ~halted_B & (budget_B > 0), halted_B, out)
        _, cache, penalty, last_B, _, halted_B, out = jax.lax.while_loop(cond, body, init)
        last_B, halted_B = (jax.lax.with_sharding_constraint(x, self._replicated) for x in (last_B, halted_B))
        return cache, penalty, {**out, "last": last_B, "halted": halted_B}

    def _prepare_rows(self, batch: list[Sequence], B: int) -> np.ndarray:
        """Claim penalty rows for the batch's penalised sequences -> the penalty row of each of B rows."""
        rows = np.zeros(B, np.int32)
        for r, seq in enumerate(batch):
            rows[r] = max(seq.slot, 0)
            if seq.slot >= 0 and seq.params.uses_penalties:
                self._claim_slot(seq)
        return rows

    def decode_rows(self, n: int) -> int:
        return row_bucket(max(n, MIN_DECODE_ROWS), self.max_num_seqs)

    @staticmethod
    def _fast(seqs: list[Sequence]) -> bool:
        """Whether the greedy fast path serves every row (no sampling, penalties or logprobs)."""
        return all(s.params.temperature == 0 and not s.params.uses_penalties and s.params.logprobs is None
                   for s in seqs)

    def _table_width(self, seqs: list[Sequence]) -> int:
        return bucket(max(len(s.block_table) for s in seqs), self.max_blocks)

    def _table_array(self, seqs: list[Sequence], B: int, W: int) -> np.ndarray:
        tables = np.zeros((B, W), np.int32)
        for r, seq in enumerate(seqs):
            tables[r, :len(seq.block_table)] = seq.block_table
        return tables

    def run(self, batch: list[tuple[Sequence, int]]):
        """One step for [(seq, new tokens)] -> (tokens, chosen logprobs, top ids, top logprobs, valid) as numpy;
        `valid[r]`: row r reached its sequence's end, so its sample is a new token. A step of new sequences
        only (nothing of them cached) runs packed (`_run_packed`); else each row is padded to the longest."""
        if self.packed_prefill and all(seq.num_computed == 0 for seq, _ in batch):
            return self._run_packed(batch)
        n = len(batch)
        seqs = [s for s, _ in batch]
        T = bucket(max(max(k for _, k in batch), MIN_PREFILL_TOKENS))
        own = Shape("prefill", (bucket(n, self.max_num_seqs), T, self._table_width(seqs)), self._fast(seqs))
        used = self.programs.choose(own)
        B, T, W = used.dims
        rows = self._prepare_rows(seqs, B)
        tables = self._table_array(seqs, B, W)
        bs = self.block_size
        ids = np.zeros((B, T), np.int32)
        positions = np.zeros((B, T), np.int32)
        slots = np.full((B, T), -1, np.int32)
        lengths = np.zeros(B, np.int32)
        valid = np.zeros(B, bool)
        for r, (seq, k) in enumerate(batch):
            start = seq.num_computed
            pos = np.arange(start, start + k)
            ids[r, T - k:] = seq.tokens(start, start + k)
            positions[r, T - k:] = pos
            slots[r, T - k:] = tables[r, pos // bs] * bs + pos % bs
            lengths[r] = start + k
            valid[r] = start + k == len(seq)  # this step reaches the end: its sample is kept
        rp = sampling.row_params([s.params for s in seqs], [s.seed for s in seqs],
                                 [len(s.output_ids) for s in seqs], B)
        t0 = time.perf_counter()
        self.cache, self.penalty, *outs = self._step(
            self.params, self.cache, self.penalty, ids, positions, slots, tables, lengths, rows, valid,
            rp, fast=used.fast)
        return self._read_step(own, used, t0, outs, slots, valid, n)

    def _run_packed(self, batch: list[tuple[Sequence, int]]):
        """`run` for new sequences: their tokens back to back in one row, so a step computes the tokens it
        has (rounded up to a power of two) instead of rows x the longest row. Its program's dims are (rows,
        tokens, the longest row), the last bounding how far back attention looks."""
        n = len(batch)
        seqs = [s for s, _ in batch]
        lens = np.array([k for _, k in batch])
        own = Shape("packed", (bucket(n, self.max_num_seqs), bucket(max(int(lens.sum()), MIN_PREFILL_TOKENS)),
                               bucket(max(int(lens.max()), MIN_PREFILL_TOKENS))), self._fast(seqs))
        used = self.programs.choose(own)
        B, T, longest = used.dims
        rows = self._prepare_rows(seqs, B)
        bs = self.block_size
        ids = np.zeros((1, T), np.int32)
        positions = np.zeros((1, T), np.int32)
        slots = np.full((1, T), -1, np.int32)
        segments = np.full((1, T), B, np.int32)  # padding: a segment of its own
        ends = np.cumsum(lens)
        last = np.zeros(B, np.int32)
        last[:n] = ends - 1
        valid = np.zeros(B, bool)
        for r, (seq, k) in enumerate(batch):
            a, pos = ends[r] - k, np.arange(k)
            ids[0, a:a + k] = seq.tokens(0, k)
            positions[0, a:a + k] = pos
            slots[0, a:a + k] = np.asarray(seq.block_table, np.int32)[pos // bs] * bs + pos % bs
            segments[0, a:a + k] = r
            valid[r] = k == len(seq)
        rp = sampling.row_params([s.params for s in seqs], [s.seed for s in seqs],
                                 [len(s.output_ids) for s in seqs], B)
        t0 = time.perf_counter()
        self.cache, self.penalty, *outs = self._packed_step(
            self.params, self.cache, self.penalty, ids, positions, slots, segments, last, rows, valid, rp,
            fast=used.fast, max_segment=longest)
        return self._read_step(own, used, t0, outs, slots, valid, n)

    def _read_step(self, own: Shape, used: Shape, t0: float, outs, slots: np.ndarray, valid: np.ndarray, n: int):
        """A dispatched prefill step's results, read back (routes to the routes pool) -> `run`'s tuple."""
        start = self._built(used, t0)
        tokens, chosen, top_ids, top_lp, routes = jax.device_get(outs)
        self._idle_since = time.perf_counter()
        self.programs.record_run(own, used, self._idle_since - start)
        if routes is not None and self.routes_pool is not None:
            filled = slots >= 0
            self.routes_pool[slots[filled]] = np.moveaxis(routes, 0, 2)[filled]  # [tokens, L_moe, k]
        return tokens[:n], chosen[:n], top_ids[:n], top_lp[:n], valid[:n]

    def _built(self, used: Shape, t0: float) -> float:
        """After dispatching `used` (started at t0): record its build if this dispatch built it (the
        dispatch then took the trace, lowering and compile) -> when its run started."""
        t1 = time.perf_counter()
        if used in self.programs.built:
            return t0
        self.programs.record_build(used, t1 - t0)
        self._last_build = t1
        log.info("built the %s program %s%s in %.2f s", used.kind, "x".join(map(str, used.dims)),
                 " (greedy)" if used.fast else "", t1 - t0)
        return t1

    def _on_device(self, *arrays: np.ndarray) -> list[jax.Array]:
        """Per-row window inputs placed as a window's outputs are (replicated), so a window that starts from
        host values and one that continues from a window in flight run the same compiled program."""
        return [jax.device_put(a, self._replicated) for a in arrays]

    def decode(self, seqs: list[Sequence], budgets: list[int], stop_ids: list[tuple[int, ...]],
               after: "Window | None" = None, horizon: int | None = None) -> "Window":
        """Dispatch a multi-step decode window (asynchronously: `collect` reads it). Each sequence (its last
        token not yet computed, blocks reserved for budgets[r] more tokens) takes up to budgets[r] tokens,
        stopping early at one of stop_ids[r]. `after`: the window still in flight that this one continues,
        with the same sequences, each assumed to take its whole budget there; its last tokens, and which rows
        met a stop token, are read on device. `horizon`: the most steps the sequences may still take (for
        the choice of program)."""
        n = len(seqs)
        live = sum(b > 0 for b in budgets)  # a continuing window keeps rows that finished in the one before
        own = Shape("decode", (self.decode_rows(live), self._table_width(seqs)), self._fast(seqs))
        used = self.programs.choose(own, rows=None if after is None else after.used.dims[0], steps=max(budgets),
                                    horizon=horizon)
        B, W = used.dims
        rows = self._prepare_rows(seqs, B)
        tables = self._table_array(seqs, B, W)
        ahead = np.zeros(B, np.int32)  # tokens the window in flight adds first
        if after is not None:
            ahead[:n] = after.budgets
        positions = np.zeros(B, np.int32)
        positions[:n] = [len(s) - 1 for s in seqs]
        positions += ahead
        budget = np.zeros(B, np.int32)
        budget[:n] = budgets
        S = bucket(max(4, max(map(len, stop_ids))))
        stops = np.full((B, S), -1, np.int32)
        for r, ids in enumerate(stop_ids):
            stops[r, :len(ids)] = ids
        if after is None:
            tokens = np.zeros(B, np.int32)
            tokens[:n] = [s.output_ids[-1] if s.output_ids else s.prompt_ids[-1] for s in seqs]
            tokens, halted = self._on_device(tokens, np.zeros(B, bool))
        else:
            tokens, halted = after.out["last"], after.out["halted"]
        rp = sampling.row_params([s.params for s in seqs], [s.seed for s in seqs],
                                 [len(s.output_ids) + int(a) for s, a in zip(seqs, ahead)], B)
        t0 = time.perf_counter()
        self.cache, self.penalty, out = self._decode(
            self.params, self.cache, self.penalty, tokens, halted, positions, tables, rows, budget, stops,
            np.int32(max(budgets)), rp, fast=used.fast)
        return Window(seqs, list(budgets), stop_ids, positions, tables, out, own, used, self._built(used, t0))

    def window_rows(self, n: int, w: Window, horizon: int) -> int:
        """The rows a fresh window for n of `w`'s sequences, which may still take up to `horizon` tokens,
        would take (at w's table width and variant)."""
        own = Shape("decode", (self.decode_rows(n), w.used.dims[1]), w.used.fast)
        return self.programs.choose(own, steps=max(min(self.decode_steps, horizon), 1), horizon=horizon).dims[0]

    def collect(self, w: "Window"):
        """Wait for a window -> (tokens, chosen logprobs, top ids, top logprobs, valid), numpy, each
        [steps run, n, ...]; with routes recorded, they go to the routes pool."""
        n = len(w.seqs)
        out = jax.device_get({k: v for k, v in w.out.items() if k not in ("last", "halted")})
        end = time.perf_counter()  # the device ran this window since it was dispatched or the last read
        steps = int(out["valid"].any(axis=1).sum())
        if self._last_build < w.dispatched:  # (a window that ran beside a build has no time of its own)
            self.programs.record_run(w.own, w.used, end - max(w.dispatched, self._idle_since), steps)
        self._idle_since = end
        if self.routes_pool is not None:
            bs = self.block_size
            for i in range(steps):
                r_ok = np.flatnonzero(out["valid"][i])
                pos = w.positions[r_ok] + i
                slot = w.tables[r_ok, pos // bs] * bs + pos % bs
                self.routes_pool[slot] = np.moveaxis(out["routes"][i][:, r_ok], 1, 0)  # [rows, L_moe, k]
        return tuple(out[k][:steps, :n] for k in ("tokens", "chosen", "top_ids", "top_lp", "valid"))

    # ------------------------------------------------------------------ warm-up
    def warmup_shapes(self, max_len: int) -> list[tuple[str, int, int]]:
        """The programs sequences up to `max_len` tokens meet, as (kind, rows, tokens or table width):
        ("decode", B, W) for greedy and for sampling windows at every row and table-width bucket, and
        ("prefill", 1, T) for one new prompt (packed) at every token bucket (the full sampler's program,
        which serves greedy batches too: `programs.Shape.covers`)."""
        bs = self.block_size
        rows = sorted({self.decode_rows(n) for n in range(1, self.max_num_seqs + 1)})
        widths = sorted({bucket(w, self.max_blocks) for w in range(1, cdiv(max_len, bs) + 1)})
        chunks = sorted({bucket(max(t, MIN_PREFILL_TOKENS)) for t in range(1, min(self.max_num_batched_tokens,
                                                                                   max_len - 1) + 1)})
        return ([("decode-greedy", b, w) for b in rows for w in widths]
                + [("decode", b, w) for b in rows for w in widths] + [("prefill", 1, t) for t in chunks])

    def compile_shape(self, kind: str, rows: int, n: int) -> None:
        """Compile (and run on padding: no cache slot is written) the program of one warmup_shapes entry."""
        B = rows
        rp = sampling.row_params([], [], [], B)
        zeros = np.zeros(B, np.int32)
        t0 = time.perf_counter()
        if kind.startswith("decode"):
            shape = Shape("decode", (B, n), kind == "decode-greedy")
            self.cache, self.penalty, out = self._decode(
                self.params, self.cache, self.penalty, *self._on_device(zeros, np.zeros(B, bool)), zeros,
                np.zeros((B, n), np.int32), zeros, zeros, np.full((B, 4), -1, np.int32), np.int32(0), rp,
                fast=shape.fast)
        elif self.packed_prefill:
            shape = Shape("packed", (B, n, n), False)
            grid = np.zeros((1, n), np.int32)
            self.cache, self.penalty, *out = self._packed_step(
                self.params, self.cache, self.penalty, grid, grid, np.full((1, n), -1, np.int32), grid, zeros,
                zeros, np.zeros(B, bool), rp, fast=False, max_segment=n)
        else:
            W = bucket(cdiv(n, self.block_size), self.max_blocks)
            shape = Shape("prefill", (B, n, W), False)
            grid = np.zeros((B, n), np.int32)
            self.cache, self.penalty, *out = self._step(
                self.params, self.cache, self.penalty, grid, grid, np.full((B, n), -1, np.int32),
                np.zeros((B, W), np.int32), np.full(B, n, np.int32), zeros, np.zeros(B, bool), rp, fast=False)
        self._built(shape, t0)
        jax.block_until_ready(out)

    def collect_routes(self, seq: Sequence) -> None:
        """seq.routes = the experts of each of its computed positions, [num_computed, L_moe, k] int32 (call
        before its blocks are freed)."""
        pos = np.arange(seq.num_computed)
        table = np.asarray(seq.block_table, np.int64)
        slots = table[pos // self.block_size] * self.block_size + pos % self.block_size
        seq.routes = self.routes_pool[slots].astype(np.int32)
