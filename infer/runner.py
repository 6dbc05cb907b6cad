"""The jitted model step: forward over the paged KV cache, logits at each row's last token only, and
sampling, all on device. The cache and the penalty state are donated and come back updated.

Shapes are bucketed to powers of two (rows, tokens per row, block-table width), so after the first few
steps decoding never recompiles. Rows are right-aligned: each row's new tokens end in the last column
(padding goes in front with cache slot -1), so the last column holds every row's last token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import qwen_jax
from infer import sampling
from infer.block_manager import BlockManager, Sequence
from qwen_jax.config import Qwen3Config
from qwen_jax.model import AttentionMeta, output_head
from qwen_jax.sharding import ShardingRules


def bucket(n: int, cap: int | None = None) -> int:
    b = 1 << max(0, (n - 1).bit_length())
    return b if cap is None else min(b, cap)


class ModelRunner:
    def __init__(self, config: Qwen3Config, params, rules: ShardingRules, num_blocks: int, block_size: int,
                 max_num_seqs: int, max_model_len: int, dtype, attn_impl: str = "auto"):
        self.config, self.params, self.rules = config, params, rules
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_blocks = -(-max_model_len // block_size)
        self.dtype = jnp.dtype(dtype)
        self.attn_impl = attn_impl
        self.cache = qwen_jax.init_cache(config, num_blocks, block_size, self.dtype, rules)
        replicated = rules.sharding((None, None), (max_num_seqs, config.vocab_size))
        self.penalty = {
            "counts": jax.device_put(np.zeros((max_num_seqs, config.vocab_size), np.int32), replicated),
            "seen": jax.device_put(np.zeros((max_num_seqs, config.vocab_size), bool), replicated),
        }
        self._step = jax.jit(self._step_impl, donate_argnums=(1, 2), static_argnames=("top_logprobs",))
        self._reset_slot = jax.jit(self._reset_slot_impl, donate_argnums=(0,))

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
        return out.cache, {"counts": counts, "seen": penalty["seen"]}, tokens, chosen, top_ids, top_lp

    @staticmethod
    def _reset_slot_impl(penalty, slot, prompt_ids, n):
        """Zero a slot's output counts and mark its prompt tokens as seen."""
        V = penalty["seen"].shape[1]
        mask = jnp.arange(prompt_ids.shape[0]) < n
        seen_row = jnp.zeros((V,), bool).at[jnp.where(mask, prompt_ids, V)].set(True, mode="drop")
        return {"counts": penalty["counts"].at[slot].set(0), "seen": penalty["seen"].at[slot].set(seen_row)}

    def reset_slot(self, seq: Sequence) -> None:
        ids = np.zeros(bucket(len(seq.prompt_ids)), np.int32)
        ids[:len(seq.prompt_ids)] = seq.prompt_ids
        self.penalty = self._reset_slot(self.penalty, jnp.int32(seq.slot), jnp.asarray(ids),
                                        jnp.int32(len(seq.prompt_ids)))

    def run(self, batch: list[tuple[Sequence, int]], bm: BlockManager):
        """One step for [(seq, new tokens)] -> (tokens, chosen logprobs, top ids, top logprobs) as numpy."""
        n = len(batch)
        B = bucket(n, self.max_num_seqs)
        T = bucket(max(k for _, k in batch))
        W = bucket(max(len(s.block_table) for s, _ in batch), self.max_blocks)
        ids = np.zeros((B, T), np.int32)
        positions = np.zeros((B, T), np.int32)
        slots = np.full((B, T), -1, np.int32)
        tables = np.zeros((B, W), np.int32)
        lengths = np.zeros(B, np.int32)
        rows = np.zeros(B, np.int32)
        valid = np.zeros(B, bool)
        for r, (seq, k) in enumerate(batch):
            start = seq.num_computed
            ids[r, T - k:] = seq.tokens(start, start + k)
            positions[r, T - k:] = np.arange(start, start + k)
            slots[r, T - k:] = [bm.slot(seq, p) for p in range(start, start + k)]
            tables[r, :len(seq.block_table)] = seq.block_table
            lengths[r] = start + k
            rows[r] = max(seq.slot, 0)
            valid[r] = start + k == len(seq)  # this step reaches the end: its sample is kept
        rp = sampling.row_params([s.params for s, _ in batch], [s.seed for s, _ in batch],
                                 [len(s.output_ids) for s, _ in batch], B)
        top = sampling.MAX_LOGPROBS if any((s.params.logprobs or 0) > 0 for s, _ in batch) else 0
        self.cache, self.penalty, tokens, chosen, top_ids, top_lp = self._step(
            self.params, self.cache, self.penalty, ids, positions, slots, tables, lengths, rows, valid,
            rp, top_logprobs=top)
        tokens, chosen, top_ids, top_lp = jax.device_get((tokens, chosen, top_ids, top_lp))
        return tokens[:n], chosen[:n], top_ids[:n], top_lp[:n], valid[:n]
