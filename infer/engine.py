"""LLM: the engine facade (vLLM-style API).

    llm = LLM("/models/Qwen3-0.6B", max_model_len=4096)
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason

The loop is plain Python: schedule a step (scheduler.py), run it (runner.py), append the sampled tokens,
and finish the sequences that hit EOS, a stop token or string, max_tokens or max_model_len.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Iterator, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import qwen_jax
from infer.block_manager import BlockManager, Sequence, Status
from infer.runner import ModelRunner
from infer.sampling import SamplingParams
from infer.scheduler import Scheduler
from qwen_jax.errors import ConfigError, RequestError


def device_memory_stats() -> dict | None:
    """The first device's allocator statistics (None on CPU)."""
    return jax.devices()[0].memory_stats()


@dataclasses.dataclass
class RequestOutput:
    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop", "length" or "error"
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}, chosen token first
    num_cached_tokens: int = 0
    error: str | None = None


class LLM:
    def __init__(self, model: str | None = None, *, tensor_parallel: int = 1, max_model_len: int | None = None,
                 kv_cache_memory_fraction: float = 0.9, num_kv_blocks: int | None = None,
                 kv_cache_gb: float = 1.0, block_size: int = 16, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 1024, dtype: str | None = None, seed: int = 0,
                 attn_impl: str = "auto"):
        from qwen_jax.assets import DEFAULT_MODEL

        self.model_path = model or DEFAULT_MODEL
        if tensor_parallel < 1 or tensor_parallel > jax.device_count():
            raise ConfigError(f"tensor_parallel={tensor_parallel} but {jax.device_count()} device(s) are available")
        if not 0 < kv_cache_memory_fraction <= 1:
            raise ConfigError(f"kv_cache_memory_fraction must be in (0, 1], got {kv_cache_memory_fraction}")
        mesh = qwen_jax.make_mesh(f"tensor={tensor_parallel}", devices=jax.devices()[:tensor_parallel])
        self.rules = qwen_jax.ShardingRules(mesh)
        on_cpu = jax.default_backend() == "cpu"
        self.config, params = qwen_jax.load_pretrained(self.model_path, dtype=dtype or (None if on_cpu else "bfloat16"),
                                                       mesh=mesh, progress=False)
        self.dtype = jnp.dtype(dtype) if dtype else params["embed"].dtype
        self.tokenizer = qwen_jax.load_tokenizer(self.model_path)
        c = self.config
        self.max_model_len = min(max_model_len or c.max_position_embeddings, c.max_position_embeddings)
        if self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        self.attn_impl = attn_impl
        self.max_num_batched_tokens = max_num_batched_tokens
        eos = set(self.tokenizer.eos_token_ids)
        eos.update((c.eos_token_id,) if isinstance(c.eos_token_id, int) else (c.eos_token_id or ()))
        self.eos_ids = frozenset(eos)
        self.block_size = block_size
        per_seq = -(-self.max_model_len // block_size)
        num_blocks = num_kv_blocks or self._size_pool(params, kv_cache_gb, kv_cache_memory_fraction, max_num_seqs,
                                                      per_seq)
        if num_blocks < per_seq:
            raise ConfigError(f"the KV pool ({num_blocks} blocks of {block_size}) cannot hold one sequence of "
                              f"max_model_len={self.max_model_len}; lower max_model_len or give more memory")
        self.num_blocks = num_blocks
        self.max_num_seqs = max_num_seqs
        self.runner = ModelRunner(c, params, self.rules, num_blocks, block_size, max_num_seqs, self.max_model_len,
                                  self.dtype, attn_impl)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self._rng = np.random.default_rng(seed)
        self._free_slots = list(range(max_num_seqs))

    def _bytes_per_block(self) -> int:
        c = self.config
        tp = self.rules.mesh.shape["tensor"]
        kv_heads = c.num_kv_heads // tp if c.num_kv_heads % tp == 0 else c.num_kv_heads
        return 2 * c.num_layers * self.block_size * kv_heads * c.head_dim * self.dtype.itemsize

    def _size_pool(self, params, kv_cache_gb, fraction, max_num_seqs, per_seq) -> int:
        """Blocks in the KV pool. On GPU: a warm-up runs the largest prefill step against a minimal pool, and
        the pool gets `fraction` of the memory left at that step's peak. On CPU: `kv_cache_gb`, at most
        enough for max_num_seqs full-length sequences."""
        stats = device_memory_stats()
        if stats and "bytes_limit" in stats:
            probe = ModelRunner(self.config, params, self.rules, per_seq + 1, self.block_size, max_num_seqs,
                                self.max_model_len, self.dtype, self.attn_impl)
            seq = Sequence([0] * min(self.max_num_batched_tokens, self.max_model_len - 1), SamplingParams(), 0, 0)
            seq.block_table = list(range(self.block_manager_blocks(len(seq))))
            jax.block_until_ready(probe.run([(seq, len(seq))], BlockManager(per_seq + 1, self.block_size)))
            stats = device_memory_stats()
            peak = max(stats.get("peak_bytes_in_use", 0), stats["bytes_in_use"])
            del probe
            return max(int((stats["bytes_limit"] - peak) * fraction) // self._bytes_per_block(), 0)
        budget = int(kv_cache_gb * 2**30) // self._bytes_per_block()
        return max(min(budget, max_num_seqs * per_seq + 1), per_seq)

    def block_manager_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ requests
    def _make_sequences(self, prompts, params_list) -> tuple[list[Sequence], dict[int, RequestOutput]]:
        seqs, errors = [], {}
        V = self.config.vocab_size
        for i, (prompt, sp) in enumerate(zip(prompts, params_list)):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            err = None
            if not ids:
                err = "empty prompt"
            elif len(ids) >= self.max_model_len:
                err = f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}"
            elif min(ids) < 0 or max(ids) >= V:
                bad = next(t for t in ids if t < 0 or t >= V)
                err = f"token id {bad} is outside the vocabulary [0, {V})"
            if err:
                errors[i] = RequestOutput(i, prompt if isinstance(prompt, str) else None, ids, [], "", "error",
                                          error=err)
                continue
            seed = sp.seed if sp.seed is not None else int(self._rng.integers(2**32))
            seqs.append(Sequence(ids, sp, seed, i))
        return seqs, errors

    def _params_list(self, n, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * n
        if len(sampling_params) != n:
            raise RequestError(f"{len(sampling_params)} sampling params for {n} prompts")
        for sp in sampling_params:
            sp.validate()
        return list(sampling_params)

    # ------------------------------------------------------------------ the loop
    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        sp = seq.params
        if (token in self.eos_ids and not sp.ignore_eos) or token in sp.stop_token_ids:
            return "stop"
        if sp.stop:
            text = self.tokenizer.decode(seq.output_ids)
            hits = [text.find(s) for s in sp.stop if s in text]
            if hits:
                seq.text = text[:min(hits)]  # the output, cut before the stop string
                return "stop"
        if len(seq.output_ids) >= sp.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def _steps(self, seqs: list[Sequence]) -> Iterator[tuple[list[Sequence], int]]:
        """Run until every sequence finishes; yields (sequences finished this step, tokens generated)."""
        for seq in seqs:
            self.scheduler.add(seq)
        try:
            yield from self._loop()
        finally:  # an abandoned stream or an exception: release what unfinished requests hold
            for seq in seqs:
                if seq.status != Status.FINISHED:
                    self.scheduler.abort(seq)
                    if seq.slot >= 0:
                        self._free_slots.append(seq.slot)
                        seq.slot = -1

    def _loop(self) -> Iterator[tuple[list[Sequence], int]]:
        while not self.scheduler.done:
            batch, _ = self.scheduler.schedule()
            for seq, _ in batch:
                if seq.slot < 0:
                    seq.slot = self._free_slots.pop()
                    if seq.params.uses_penalties:
                        self.runner.reset_slot(seq)
            tokens, chosen, top_ids, top_lp, valid = self.runner.run(batch, self.block_manager)
            finished, generated = [], 0
            for r, (seq, k) in enumerate(batch):
                seq.num_computed += k
                self.block_manager.commit(seq)
                if not valid[r]:
                    continue
                token = int(tokens[r])
                seq.output_ids.append(token)
                generated += 1
                if seq.params.logprobs is not None:
                    lp = {token: float(chosen[r])}
                    lp.update((int(t), float(v)) for t, v in zip(top_ids[r][:seq.params.logprobs],
                                                                 top_lp[r][:seq.params.logprobs]) if int(t) != token)
                    seq.logprobs.append(lp)
                reason = self._finish_reason(seq, token)
                if reason:
                    seq.finish_reason = reason
                    self.scheduler.finish(seq)
                    self._free_slots.append(seq.slot)
                    finished.append(seq)
            yield finished, generated

    def _output(self, seq: Sequence, prompt) -> RequestOutput:
        text = seq.text if seq.text is not None else self.tokenizer.decode(seq.output_ids)
        return RequestOutput(seq.index, prompt if isinstance(prompt, str) else None, seq.prompt_ids,
                             list(seq.output_ids), text, seq.finish_reason,
                             seq.logprobs if seq.params.logprobs is not None else None, seq.num_cached)

    def generate(self, prompts: str | Seq[int] | list, sampling_params=None, use_tqdm: bool = True
                 ) -> list[RequestOutput]:
        """Generate for prompts (strings or token-id lists). Invalid sampling parameters raise RequestError
        before any work; a bad prompt gets finish_reason "error" and an `error` message, alone."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        params = self._params_list(len(prompts), sampling_params)
        seqs, outputs = self._make_sequences(prompts, params)
        bar = tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm or None, dynamic_ncols=True)
        bar.update(len(outputs))
        t0, total = time.perf_counter(), 0
        with contextlib.closing(self._steps(seqs)) as steps:
            for finished, generated in steps:
                total += generated
                for seq in finished:
                    outputs[seq.index] = self._output(seq, prompts[seq.index])
                if finished:
                    bar.update(len(finished))
                    bar.set_postfix(tok_s=f"{total / max(time.perf_counter() - t0, 1e-9):,.0f}")
        bar.close()
        return [outputs[i] for i in range(len(prompts))]

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text as it grows (one request). Raises RequestError for a bad prompt."""
        params = self._params_list(1, sampling_params)
        seqs, errors = self._make_sequences([prompt], params)
        if errors:
            raise RequestError(errors[0].error)
        seq, emitted = seqs[0], ""
        with contextlib.closing(self._steps(seqs)) as steps:
            for finished, _ in steps:
                text = self._output(seq, prompt).text if finished else self.tokenizer.decode(seq.output_ids)
                if seq.params.stop and not finished:
                    text = text[:max(0, len(text) - max(len(s) for s in seq.params.stop))]  # a stop may be forming
                if text.endswith("\ufffd") and not finished:
                    continue  # an incomplete multi-byte character
                if len(text) > len(emitted) and text.startswith(emitted):
                    yield text[len(emitted):]
                    emitted = text
        self.last_finish_reason = seq.finish_reason
