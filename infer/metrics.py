"""Prometheus metrics for the server (prometheus_client): engine gauges and counters read from the engine
at scrape time, and latency histograms observed per request.

    qwen_jax_num_requests_running / _waiting        requests on the engine / queued for it
    qwen_jax_kv_cache_usage_perc                    share of KV blocks held by live requests (0..1)
    qwen_jax_prompt_tokens_total, _generation_tokens_total
    qwen_jax_num_preemptions_total
    qwen_jax_prefix_cache_queries_total, _hits_total   (in blocks; hit rate = hits / queries)
    qwen_jax_programs_built_total, qwen_jax_program_build_seconds_total   (compiled or loaded from the cache)
    qwen_jax_request_success_total{finish_reason}
    qwen_jax_time_to_first_token_seconds, _inter_token_latency_seconds, _e2e_request_latency_seconds
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from infer.engine import StreamDelta

P = "qwen_jax_"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        yield GaugeMetricFamily(P + "num_requests_running", "Requests on the engine.", value=s["running"])
        yield GaugeMetricFamily(P + "num_requests_waiting", "Requests waiting for the engine.", value=s["waiting"])
        yield GaugeMetricFamily(P + "kv_cache_usage_perc", "Share of KV-cache blocks in use (0..1).",
                                value=s["kv_usage"])
        for key, name, doc in (("prompt_tokens", "prompt_tokens", "Prompt tokens received."),
                               ("generation_tokens", "generation_tokens", "Tokens generated."),
                               ("preemptions", "num_preemptions", "Requests preempted (recomputed later)."),
                               ("prefix_cache_queries", "prefix_cache_queries", "Prompt blocks looked up."),
                               ("prefix_cache_hits", "prefix_cache_hits", "Prompt blocks found in the cache."),
                               ("programs_built", "programs_built", "Step programs built (compiled or loaded)."),
                               ("program_build_seconds", "program_build_seconds",
                                "Seconds the engine stopped to build step programs.")):
            yield CounterMetricFamily(P + name, doc, value=s[key])


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.success = Counter(P + "request_success", "Finished samples by finish reason.", ["finish_reason"],
                               registry=self.registry)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to the first generated token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between generated tokens of a sample.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Request arrival to its last token.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Latencies of one HTTP request (one or more engine requests, each with n samples)."""

    def __init__(self, m: ServerMetrics):
        self.m, self.t0 = m, time.perf_counter()
        self.first: set[int] = set()
        self.last: dict[tuple[int, int], float] = {}

    def saw(self, i: int, item) -> None:
        if not isinstance(item, StreamDelta) or not item.token_ids:
            return  # a final RequestOutput, or a delta without tokens
        now, key = time.perf_counter(), (i, item.index)
        if i not in self.first:
            self.first.add(i)
            self.m.ttft.observe(now - self.t0)
        elif key in self.last:
            self.m.itl.observe(now - self.last[key])
        self.last[key] = now

    def done(self, outs) -> None:
        now = time.perf_counter()
        for out in outs:
            self.m.e2e.observe(now - self.t0)
            for o in out.outputs:
                self.m.success.labels(finish_reason=o.finish_reason or "unknown").inc()
