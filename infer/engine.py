"""The engine: one background thread owns the devices and steps the scheduler; everything else (LLM.generate,
LLM.stream, the HTTP server, RL rollouts) is a client that adds requests and reads its own output stream.

    engine = Engine(config, params, tokenizer, rules, ...)
    stream = engine.add_request([1, 2, 3], SamplingParams(max_tokens=8), stream=True)
    for delta in stream:            # StreamDelta: index, text, token_ids, logprobs, finish_reason
        ...
    stream.output                   # RequestOutput, once the iteration ends

Requests enter through a thread-safe command queue (`add_request`, `abort_request`); the loop takes them
between steps. A stream that is closed or garbage-collected aborts its request, which frees its blocks at
the next step. A bad request (empty or over-long prompt, out-of-vocabulary ids, bad sampling parameter)
raises RequestError in the caller's thread and never reaches the loop.

One step: schedule (scheduler.py), run (runner.py), append the sampled tokens (scheduler.postprocess),
then detokenize, check stop strings and hand each request its new pieces.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
import traceback
from typing import Iterator

import numpy as np

from infer.detokenizer import Detokenizer
from infer.runner import ModelRunner
from infer.sampling import SamplingParams
from infer.scheduler import Scheduler
from infer.sequence import Sequence
from qwen_jax.config import Qwen3Config
from qwen_jax.errors import ConfigError, RequestError
from qwen_jax.sharding import ShardingRules

log = logging.getLogger("infer.engine")


class EngineBusy(RequestError):
    """The waiting queue is full (`max_waiting`): try again later."""


class EngineStopped(RequestError):
    """The engine is shutting down or has stopped: it takes no new requests."""


@dataclasses.dataclass
class CompletionOutput:
    index: int  # sample index (0 .. n-1)
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}, chosen token first
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it, if any
    # With Engine(record_routes=True) on a MoE model: the experts of every position the model read (prompt
    # and completion but the last token), [len(prompt) + len(token_ids) - 1, L_moe, k] int32.
    routes: np.ndarray | None = None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    error: str | None = None
    index: int = 0  # position in the caller's prompt list (LLM.generate)

    # The first sample, for the common n = 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason if self.outputs else "error"

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs if self.outputs else None


@dataclasses.dataclass
class StreamDelta:
    index: int  # sample index
    text: str  # new text (settled: never revised)
    token_ids: list[int]  # new tokens
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None


_DONE = object()


class RequestStream:
    """A request's output, read by one client: iterate for StreamDeltas (if added with stream=True), or call
    `result()`. Closing it (or dropping it) before the end aborts the request."""

    def __init__(self, engine: "Engine", request_id: str, sink=None):
        self._engine, self.request_id = engine, request_id
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._put = sink or self._q.put  # where the engine thread delivers this request's items
        self.output: RequestOutput | None = None

    def __iter__(self) -> Iterator[StreamDelta]:
        while self.output is None:
            item = self._q.get()
            if isinstance(item, RequestOutput):
                self.output = item
            else:
                yield item

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Wait for the final output (deltas are skipped). TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.output is None:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                item = self._q.get(timeout=left)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id} not finished after {timeout} s") from None
            if isinstance(item, RequestOutput):
                self.output = item
        return self.output

    def close(self) -> None:
        if self.output is None:
            self._engine.abort_request(self.request_id)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class _Request:
    def __init__(self, rid: str, prompt, prompt_ids: list[int], params: SamplingParams, seqs: list[Sequence],
                 detoks: list[Detokenizer], stream: RequestStream, streaming: bool, notify, index: int):
        self.id, self.prompt, self.prompt_ids, self.params = rid, prompt, prompt_ids, params
        self.seqs, self.detoks, self.stream, self.streaming = seqs, detoks, stream, streaming
        self.notify, self.index = notify, index
        self.stop_reasons: list[str | int | None] = [None] * len(seqs)


def require_causal_lm(config: Qwen3Config) -> None:
    if config.is_classifier:
        raise ConfigError(f"the model is a {config.architecture} (a reward model or classifier): it scores text "
                          f"and does not generate")


class Engine:
    def __init__(self, config: Qwen3Config, params, tokenizer, rules: ShardingRules, *, max_model_len: int,
                 block_size: int = 16, max_num_seqs: int = 64, max_num_batched_tokens: int = 1024,
                 num_kv_blocks: int | None = None, kv_cache_memory_fraction: float = 0.9,
                 kv_cache_gb: float = 1.0, dtype=None, attn_impl: str = "auto", seed: int = 0,
                 max_waiting: int | None = None, record_routes: bool = False, decode_steps: int = 8,
                 warmup: int | None = None, overlap: bool = True):
        """`warmup`: compile, before serving, the programs sequences of up to that many tokens meet (every row
        and table-width bucket of greedy and sampling decode windows, and one prompt chunk per token bucket),
        with a progress bar; the persistent compilation cache makes later starts load them instead.
        `overlap`: dispatch the next decode window before reading the one in flight (`_continue`)."""
        require_causal_lm(config)
        self.config, self.tokenizer, self.max_model_len = config, tokenizer, max_model_len
        eos = set(tokenizer.eos_token_ids) if tokenizer is not None else set()
        eos.update((config.eos_token_id,) if isinstance(config.eos_token_id, int) else (config.eos_token_id or ()))
        self.eos_ids = frozenset(eos)
        self.runner = ModelRunner(config, params, rules, block_size, max_num_seqs, max_model_len,
                                  max_num_batched_tokens, dtype, attn_impl, num_kv_blocks, kv_cache_memory_fraction,
                                  kv_cache_gb, record_routes, decode_steps)
        self.scheduler = Scheduler(self.runner.num_blocks, block_size, max_num_seqs, max_num_batched_tokens,
                                   max_model_len, self.eos_ids)
        if self.runner.record_routes:
            self.scheduler.on_finish = self.runner.collect_routes
        if warmup:
            self._warmup(min(warmup, max_model_len))
        self.max_waiting = max_waiting
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # guards _rng, the id counter and the counters below
        self._ids = itertools.count()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}  # owned by the loop thread
        self._window = None  # the decode window in flight (dispatched, not yet read), owned by the loop thread
        self.overlap = overlap
        self._pending = 0  # requests added and not yet finished
        self.counters = {"requests_finished": 0, "prompt_tokens": 0, "generation_tokens": 0, "steps": 0,
                         "windows_overlapped": 0}  # decode windows dispatched before the previous one was read
        self._accepting = True
        self._stop = threading.Event()
        self.error: str | None = None  # set if the loop died (a bug): every request then fails
        self._thread = threading.Thread(target=self._loop, name="infer-engine", daemon=True)
        self._thread.start()

    def _warmup(self, max_len: int) -> None:
        from tqdm.auto import tqdm

        shapes = self.runner.warmup_shapes(max_len)
        t = time.perf_counter()
        for shape in tqdm(shapes, desc=f"warmup (sequences up to {max_len} tokens)", unit="program",
                          dynamic_ncols=True):
            self.runner.compile_shape(*shape)
        log.info("warmup: %d programs in %.1f s", len(shapes), time.perf_counter() - t)

    # ------------------------------------------------------------------ client side (any thread)
    def add_request(self, prompt, params: SamplingParams | None = None, *, stream: bool = False,
                    request_id: str | None = None, notify: queue.SimpleQueue | None = None,
                    index: int = 0, sink=None) -> RequestStream:
        """Queue a request: `prompt` is a string or a list of token ids. With stream=True the returned stream
        yields StreamDeltas. `notify`, if given, receives the request id when the request ends. `sink`, if
        given, receives every delta and the final output instead of the stream's own queue (called from the
        engine thread: the asyncio server passes loop.call_soon_threadsafe)."""
        req = self._build(prompt, params, stream, request_id, notify, index, sink)
        self._commands.put(("add", [req]))
        return req.stream

    def add_requests(self, prompts, params: list[SamplingParams], *, notify: queue.SimpleQueue | None = None
                     ) -> list[RequestStream | RequestError]:
        """Queue many requests at once (the loop takes them together, so its first step sees them all): request
        i gets index i. -> per prompt its stream, or the RequestError that rejected it alone; EngineBusy and
        EngineStopped concern the whole call and are raised (nothing is queued then)."""
        items: list[_Request | RequestError] = []
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, params)):
                try:
                    items.append(self._build(prompt, sp, False, None, notify, i, None))
                except RequestError as e:
                    if type(e) is not RequestError:
                        raise
                    items.append(e)
        except RequestError:
            with self._lock:
                self._pending -= sum(isinstance(x, _Request) for x in items)
            raise
        self._commands.put(("add", [x for x in items if isinstance(x, _Request)]))
        return [x.stream if isinstance(x, _Request) else x for x in items]

    def _build(self, prompt, params, stream, request_id, notify, index, sink) -> "_Request":
        params = (params or SamplingParams()).validate()
        if not self._accepting or self.error:
            raise EngineStopped(self.error or "the engine is shutting down")
        ids = self._prompt_ids(prompt)
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer (the engine runs without one)")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        with self._lock:
            if self.max_waiting is not None and self._pending - len(self.scheduler.running) >= self.max_waiting:
                raise EngineBusy(f"too many requests waiting ({self.max_waiting}); retry later")
            rid = request_id or f"req-{next(self._ids)}"
            base = params.seed if params.seed is not None else int(self._rng.integers(2**32))
            self._pending += 1
        seeds = [base] + [int(np.random.SeedSequence([base, i]).generate_state(1)[0]) for i in range(1, params.n)]
        first = Sequence(ids, params, seeds[0], max_tokens, rid, 0)
        seqs = [first] + [Sequence(ids, params, s, max_tokens, rid, i, parent=first)
                          for i, s in enumerate(seeds[1:], 1)]
        detoks = [Detokenizer(self.tokenizer, params.stop) for _ in seqs]
        return _Request(rid, prompt, ids, params, seqs, detoks, RequestStream(self, rid, sink), stream, notify, index)

    def abort_request(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer (the engine runs without one): send token ids")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # e.g. undecodable command-line bytes (surrogate escapes)
                raise RequestError(f"the prompt is not valid UTF-8 text (character {e.start})") from None
            ids = self.tokenizer.encode(prompt)
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise RequestError("a prompt is a string or a list of token ids") from None
        V = self.config.vocab_size
        if not ids:
            raise RequestError("empty prompt")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} (the prompt "
                               f"and at least one generated token must fit)")
        bad = next((t for t in ids if t < 0 or t >= V), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {V})")
        return ids

    def update_params(self, params, timeout: float = 600.0) -> None:
        """Serve `params` (same tree and placement as before) from the next step on, and forget the prefix
        cache (its K/V came from the old weights). Thread-safe: the loop thread makes the switch between
        two steps; this call returns once it has. RL rollouts call it with the trainer's current weights."""
        done = threading.Event()
        self._commands.put(("params", (params, done)))
        if not done.wait(timeout):
            raise RuntimeError(self.error or f"the engine did not take the new parameters within {timeout} s")

    def stats(self) -> dict:
        """A snapshot for metrics: requests running / waiting, KV usage, cumulative counters (the programs
        built, and the seconds their builds took, included)."""
        s, bm = self.scheduler, self.scheduler.block_manager
        running = len({q.request_id for q in list(s.running)})
        builds = list(self.runner.programs.built.values())  # (one call: safe beside the loop thread)
        return {"running": running, "waiting": max(self._pending - running, 0), "kv_usage": bm.usage,
                "num_blocks": bm.num_blocks, "free_blocks": bm.num_free, "preemptions": s.num_preemptions,
                "prefix_cache_queries": bm.cache_queries, "prefix_cache_hits": bm.cache_hits,
                "programs_built": len(builds), "program_build_seconds": sum(builds), **self.counters}

    def next_done(self, notify: queue.SimpleQueue) -> str:
        """The id of the next request to end among those added with `notify`; RuntimeError if the loop died."""
        while True:
            try:
                return notify.get(timeout=1.0)
            except queue.Empty:
                if self.error:
                    raise RuntimeError(self.error) from None

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no request is in flight (aborts included); -> whether that happened within `timeout`."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.005)
        return self._pending == 0

    def shutdown(self, grace: float | None = 0.0) -> None:
        """Stop taking requests; let running ones finish for up to `grace` seconds (None: as long as they
        take), abort the rest, and stop the loop."""
        self._accepting = False
        deadline = None if grace is None else time.monotonic() + grace
        while self._pending and self._thread.is_alive() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.01)
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=60)

    # ------------------------------------------------------------------ the loop (engine thread)
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._take_commands(block=self.scheduler.done and self._window is None)
                if not self.scheduler.done or self._window is not None:
                    self._step()
        except Exception as e:  # a bug: fail every request rather than hang their callers
            self.error = f"engine error: {type(e).__name__}: {e}"
            log.error("engine loop failed:\n%s", traceback.format_exc())
        for req in list(self._requests.values()):
            self._end(req, "abort" if self.error is None else "error", self.error)

    def _take_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = cmd
            if kind == "add":
                for req in arg:
                    self._requests[req.id] = req
                    for seq in req.seqs:
                        self.scheduler.add(seq)
                    self.counters["prompt_tokens"] += len(req.prompt_ids)
            elif kind == "abort" and arg in self._requests:
                self._end(self._requests[arg], "abort")
            elif kind == "params":
                self.runner.params = arg[0]
                self.scheduler.block_manager.reset_prefix_cache()
                arg[1].set()
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        if self._window is not None:  # a decode window is in flight: queue the next one, then read this one
            window = self._window
            self._window = self._continue(window)
            self._read(window)
            return
        batch = self.scheduler.schedule()
        budgets = self.scheduler.plan_window(batch, self.runner.decode_steps)
        if budgets is None:
            self._apply(batch, *self.runner.run(batch))
            return
        seqs = [seq for seq, _ in batch]
        stops = [tuple(sorted(set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else self.eos_ids)))
                 for s in seqs]
        self._window = self.runner.decode(seqs, budgets, stops, horizon=max(map(self.scheduler.left, seqs)))

    def _continue(self, window):
        """Overlap: while `window` runs, dispatch the window after it for the same sequences (assuming each
        takes its whole budget; the device skips rows that stopped), so the host's reading of one window
        runs beside the device's next. Only when nothing else waits (no request to admit, no command), the
        free blocks hold it, and the sequences left would not run on fewer rows (a finished row is still
        computed); None otherwise."""
        if not self.overlap or self.scheduler.waiting or not self._commands.empty():
            return None
        budgets = self.scheduler.plan_next_window(window.seqs, window.budgets, self.runner.decode_steps,
                                                  lambda n, horizon: self.runner.window_rows(n, window, horizon),
                                                  window.used.dims[0])
        if budgets is None:
            return None
        self.counters["windows_overlapped"] += 1
        return self.runner.decode(window.seqs, budgets, window.stop_ids, after=window)

    def _read(self, window) -> None:
        """A window's results, step by step, as if each step had run alone (rows whose sequence finished
        meanwhile, on the host, are dropped)."""
        seqs = window.seqs
        tokens, chosen, top_ids, top_lp, valid = self.runner.collect(window)
        token_list, valid_list = tokens.tolist(), valid.tolist()
        live = [r for r, seq in enumerate(seqs) if not seq.finished]  # a row the device stopped never comes back
        for i in range(len(token_list)):
            ok, toks = valid_list[i], token_list[i]
            rows = [r for r in live if ok[r]]
            if not rows:
                break
            self._apply([(seqs[r], 1) for r in rows], [toks[r] for r in rows], chosen[i, rows], top_ids[i, rows],
                        top_lp[i, rows], [True] * len(rows))
            live = [r for r in rows if not seqs[r].finished]

    def _apply(self, batch, tokens, chosen, top_ids, top_lp, valid) -> None:
        """A step's results: append the sampled tokens, then detokenize, check stop strings and deliver."""
        rows = {seq.id: r for r, (seq, _) in enumerate(batch)}
        sampled = self.scheduler.postprocess(batch, tokens, valid)
        self.counters["steps"] += 1
        self.counters["generation_tokens"] += len(sampled)
        ended: dict[str, _Request] = {}  # requests with a sample that finished in this step
        for seq in sampled:
            req = self._requests[seq.request_id]
            r, token = rows[seq.id], seq.output_ids[-1]
            lp = None
            if seq.params.logprobs is not None:
                n = seq.params.logprobs
                lp = {token: float(chosen[r])}
                lp.update((int(t), float(v)) for t, v in zip(top_ids[r][:n], top_lp[r][:n]) if int(t) != token)
                seq.logprobs.append(lp)
            det = req.detoks[seq.index]
            finished = seq.finished
            if finished and seq.finish_reason == "stop" and token not in self.eos_ids:
                req.stop_reasons[seq.index] = token
            if req.streaming or seq.params.stop:
                det.add(seq.output_ids)
                if det.stopped and not finished:
                    self.scheduler.finish(seq, "stop")
                    req.stop_reasons[seq.index] = det.stop_hit
                    finished = True
            if req.streaming:
                text = det.finish(seq.output_ids) if finished else det.release()
                self._deliver(req, StreamDelta(seq.index, text, [token], [lp] if lp is not None else None,
                                               seq.finish_reason))
            if finished:
                ended[req.id] = req
        for req in ended.values():
            if all(s.finished for s in req.seqs):
                self._end(req)

    def _end(self, req: _Request, abort_reason: str | None = None, error: str | None = None) -> None:
        """Deliver a request's final output and forget it; unfinished samples end with `abort_reason`."""
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, abort_reason or "abort")
        outputs = []
        for seq, det, stop in zip(req.seqs, req.detoks, req.stop_reasons):
            det.finish(seq.output_ids)
            outputs.append(CompletionOutput(seq.index, det.text, list(seq.output_ids),
                                            seq.finish_reason, seq.logprobs if seq.params.logprobs is not None
                                            else None, stop, seq.routes))
        del self._requests[req.id]
        self.counters["requests_finished"] += 1
        with self._lock:
            self._pending -= 1
        self._deliver(req, RequestOutput(req.id, req.prompt if isinstance(req.prompt, str) else None,
                                         req.prompt_ids, outputs, req.seqs[0].num_cached, error, req.index))
        if req.notify is not None:
            req.notify.put(req.id)

    @staticmethod
    def _deliver(req: _Request, item) -> None:
        """Hand an item to the request's reader; a reader that fails (a closed event loop) is not the
        engine's problem."""
        try:
            req.stream._put(item)
        except Exception:
            log.warning("request %s: could not deliver its output", req.id, exc_info=True)
