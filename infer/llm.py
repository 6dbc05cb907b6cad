"""LLM: the engine facade (vLLM-style API). It loads the checkpoint, starts the engine loop, and turns
calls into requests; any number of threads may call it at once, and each call gets exactly its own outputs.

    llm = LLM("/models/Qwen3-0.6B", max_model_len=4096)
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].outputs   # outputs: the n samples
    for piece in llm.stream("Once upon a time"): ...
"""

from __future__ import annotations

import queue
import time
import weakref
import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

import qwen_jax
from infer.engine import CompletionOutput, Engine, RequestOutput, require_causal_lm
from infer.sampling import SamplingParams
from qwen_jax.errors import ConfigError, RequestError, require


class LLM:
    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, skip_tokenizer_init: bool = False,
                 tensor_parallel: int = 1, max_model_len: int | None = None, kv_cache_memory_fraction: float = 0.9,
                 num_kv_blocks: int | None = None, kv_cache_gb: float = 1.0, block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 1024, dtype: str | None = None, seed: int = 0,
                 attn_impl: str = "auto", max_waiting: int | None = None, compilation_cache: str | bool = True,
                 decode_steps: int = 8, warmup: int | bool = False, overlap: bool = True):
        """`compilation_cache`: JAX's persistent compilation cache (qwen_jax.compilation_cache): True for the
        default directory, a path, or False to leave JAX's configuration alone. `decode_steps`: the longest
        multi-step decode window (decode steps run on device per host round trip; 1 turns it off).
        `warmup`: compile at start-up, with a progress bar, the programs that sequences of up to that many
        tokens meet (True: min(max_model_len, 2048)), so no request waits for a compilation. `overlap`: the
        next decode window is dispatched before the one in flight is read (False: strictly one at a time)."""
        from qwen_jax import compilation_cache as cc
        from qwen_jax.assets import DEFAULT_MODEL

        self.compilation_cache = cc.enable(compilation_cache)

        self.model_path = model or DEFAULT_MODEL
        require(1 <= tensor_parallel <= jax.device_count(),
                f"tensor_parallel={tensor_parallel} but {jax.device_count()} device(s) are available")
        require(0 < kv_cache_memory_fraction <= 1,
                f"kv_cache_memory_fraction must be in (0, 1], got {kv_cache_memory_fraction}")
        require(block_size >= 1 and max_num_seqs >= 1 and max_num_batched_tokens >= 1 and decode_steps >= 1,
                "block_size, max_num_seqs, max_num_batched_tokens and decode_steps must be >= 1")
        mesh = qwen_jax.make_mesh(f"tensor={tensor_parallel}", devices=jax.devices()[:tensor_parallel])
        rules = qwen_jax.ShardingRules(mesh)
        on_cpu = jax.default_backend() == "cpu"
        require_causal_lm(qwen_jax.Qwen3Config.from_json_file(self.model_path))  # before reading the weights
        self.config, params = qwen_jax.load_pretrained(self.model_path, dtype=dtype or (None if on_cpu else "bfloat16"),
                                                       mesh=mesh, progress=False)
        self.tokenizer = None if skip_tokenizer_init else qwen_jax.load_tokenizer(tokenizer or self.model_path)
        c = self.config
        self.max_model_len = min(max_model_len or c.max_position_embeddings, c.max_position_embeddings)
        if self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        self.engine = Engine(c, params, self.tokenizer, rules, max_model_len=self.max_model_len,
                             block_size=block_size, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens, num_kv_blocks=num_kv_blocks,
                             kv_cache_memory_fraction=kv_cache_memory_fraction, kv_cache_gb=kv_cache_gb,
                             dtype=jnp.dtype(dtype) if dtype else params["embed"].dtype, attn_impl=attn_impl,
                             seed=seed, max_waiting=max_waiting, decode_steps=decode_steps,
                             warmup=min(self.max_model_len, 2048) if warmup is True else (warmup or None),
                             overlap=overlap)
        self.num_blocks = self.engine.runner.num_blocks
        self._finalizer = weakref.finalize(self, self.engine.shutdown)

    def stats(self) -> dict:
        """Engine statistics: running / waiting requests, KV blocks free and in use, preemptions, prefix-cache
        queries and hits, token counters."""
        return self.engine.stats()

    def shutdown(self, grace: float | None = 0.0) -> None:
        """Stop the engine: running requests get up to `grace` seconds (None: as long as they take)."""
        self._finalizer.detach()
        self.engine.shutdown(grace)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ------------------------------------------------------------------ requests
    @staticmethod
    def _params_list(n, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * n
        if len(sampling_params) != n:
            raise RequestError(f"{len(sampling_params)} sampling params for {n} prompts")
        for sp in sampling_params:
            sp.validate()
        return list(sampling_params)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for prompts (strings or token-id lists). Invalid sampling parameters raise RequestError
        before any work; a bad prompt gets finish_reason "error" and an `error` message, alone."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        params = self._params_list(len(prompts), sampling_params)
        done: queue.SimpleQueue = queue.SimpleQueue()
        outputs: dict[int, RequestOutput] = {}
        streams = []
        try:
            for i, (prompt, item) in enumerate(zip(prompts, self.engine.add_requests(prompts, params, notify=done))):
                if isinstance(item, RequestError):
                    ids = list(prompt) if not isinstance(prompt, str) else []
                    outputs[i] = RequestOutput(f"invalid-{i}", prompt if isinstance(prompt, str) else None, ids,
                                               [CompletionOutput(0, "", [], "error")], error=str(item), index=i)
                else:
                    streams.append(item)
            bar = tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm or None,
                       dynamic_ncols=True)
            bar.update(len(outputs))
            t0, total = time.perf_counter(), 0
            for _ in streams:
                self.engine.next_done(done)
                bar.update(1)
            for s in streams:
                out = s.result()
                outputs[out.index] = out
                total += sum(len(o.token_ids) for o in out.outputs)
            bar.set_postfix(tok_s=f"{total / max(time.perf_counter() - t0, 1e-9):,.0f}")
            bar.close()
        finally:  # an exception or Ctrl-C: unfinished requests are aborted and release their blocks
            for s in streams:
                s.close()
        return [outputs[i] for i in range(len(prompts))]

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> "TextStream":
        """Iterate the completion's text as it grows (one request, n = 1); `.finish_reason` is set at the
        end. Raises RequestError for a bad prompt. Closing the iterator early aborts the request."""
        sp = self._params_list(1, sampling_params)[0]
        if sp.n != 1:
            raise RequestError("stream() takes one sample (n = 1); use generate() for n > 1")
        return TextStream(self.engine.add_request(prompt, sp, stream=True))


class TextStream:
    """Text pieces of one streamed request; `finish_reason` and `output` once it ends."""

    def __init__(self, stream):
        self._stream = stream
        self._it = iter(stream)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        for delta in self._it:
            if delta.text:
                return delta.text
        raise StopIteration

    def close(self) -> None:
        self._stream.close()

    @property
    def output(self) -> RequestOutput | None:
        return self._stream.output

    @property
    def finish_reason(self) -> str | None:
        return self._stream.output.finish_reason if self._stream.output else None
