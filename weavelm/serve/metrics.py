"""The server's Prometheus metrics (`GET /metrics`), each server with its own registry.

Gauges (set after every engine step): requests running and waiting, KV blocks used, in all and
cached (prefix caching), the prefix cache's queries, hits and hit rate (in blocks).
Counters: prompt and generated tokens, finished requests by reason (`stop`, `length`, `abort`,
`error`). Histograms: time to first token (from arrival) and time per output token.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
REASONS = ("stop", "length", "abort", "error")


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("weavelm_requests_running", "Requests holding KV blocks.",
                             registry=r)
        self.waiting = Gauge("weavelm_requests_waiting", "Requests queued for admission.",
                             registry=r)
        self.kv_used = Gauge("weavelm_kv_blocks_used", "KV-cache blocks in use.", registry=r)
        self.kv_total = Gauge("weavelm_kv_blocks_total", "KV-cache blocks in all.", registry=r)
        self.kv_cached = Gauge("weavelm_kv_blocks_cached", "KV-cache blocks whose prompt "
                               "prefix is cached (held or free).", registry=r)
        self.prefix_queries = Gauge("weavelm_prefix_cache_queries",
                                    "Prompt blocks looked up in the prefix cache.", registry=r)
        self.prefix_hits = Gauge("weavelm_prefix_cache_hits",
                                 "Prompt blocks found in the prefix cache.", registry=r)
        self.prefix_hit_rate = Gauge("weavelm_prefix_cache_hit_rate",
                                     "Hits / queries of the prefix cache so far.", registry=r)
        self.prompt_tokens = Counter("weavelm_prompt_tokens", "Prompt tokens prefilled.",
                                     registry=r)
        self.generation_tokens = Counter("weavelm_generation_tokens", "Tokens generated.",
                                         registry=r)
        self.finished_requests = Counter("weavelm_requests_finished",
                                         "Requests finished, by reason.", ["reason"], registry=r)
        for reason in REASONS:
            self.finished_requests.labels(reason)
        self.ttft = Histogram("weavelm_time_to_first_token_seconds",
                              "From arrival to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("weavelm_time_per_output_token_seconds",
                              "Mean time per token after the first, per request.",
                              buckets=TPOT_BUCKETS, registry=r)

    def set_capacity(self, blocks: int) -> None:
        self.kv_total.set(blocks)

    def update(self, engine) -> None:
        sched, blocks = engine.scheduler, engine.runner.blocks
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.kv_used.set(blocks.capacity - blocks.num_free)
        self.kv_cached.set(blocks.num_cached)
        self.prefix_queries.set(blocks.queries)
        self.prefix_hits.set(blocks.hits)
        self.prefix_hit_rate.set(blocks.hits / blocks.queries if blocks.queries else 0.0)

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        self.ttft.observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)

    def tokens(self, n: int) -> None:
        if n:
            self.generation_tokens.inc(n)

    def finished(self, reason: str | None, tpot: float | None) -> None:
        key = "error" if reason is None or reason.startswith("error") else reason
        self.finished_requests.labels(key if key in REASONS else "error").inc()
        if tpot is not None:
            self.tpot.observe(tpot)

    def render(self) -> bytes:
        return generate_latest(self.registry)
