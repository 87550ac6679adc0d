"""Prometheus metrics of one proxy, on its own registry (served at the proxy's ``/metrics``).

A registry per proxy keeps several proxies in one process (tests, benchmarks) apart and keeps the proxy's
``/metrics`` free of unrelated collectors. Names are listed in docs/semantic-cache.md.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SIMILARITY = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0)
NS = "kvplug_semantic"


class SemanticMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(f"{NS}_requests", "Requests by endpoint and outcome", ["endpoint", "cache"], registry=r)
        self.hits = Counter(f"{NS}_hits", "Requests answered from the cache", ["category"], registry=r)
        self.misses = Counter(f"{NS}_misses", "Cacheable requests forwarded upstream", ["category"], registry=r)
        self.bypass = Counter(f"{NS}_bypass", "Requests forwarded without the cache", ["reason"], registry=r)
        self.inserts = Counter(f"{NS}_inserts", "Answers stored", ["category"], registry=r)
        self.not_stored = Counter(
            f"{NS}_not_stored",
            "Miss answers not stored (not_cacheable, too_large, duplicate, redis)",
            ["reason"],
            registry=r,
        )
        self.evictions = Counter(
            f"{NS}_evictions", "Entries dropped (quota, expired, missing, corrupt)", ["category", "reason"], registry=r
        )
        self.redis_errors = Counter(
            f"{NS}_redis_errors", "Redis failures (each one a pass-through)", ["op", "kind"], registry=r
        )
        self.payload_errors = Counter(f"{NS}_payload_errors", "Stored documents refused", ["kind"], registry=r)
        self.verify_refused = Counter(
            f"{NS}_verify_refused",
            "Candidates above the threshold refused by verification (numbers, time, entities, negation, direction)",
            ["category", "check"],
            registry=r,
        )
        self.upstream = Counter(
            f"{NS}_upstream_responses", "Upstream answers by status (or connect_error/timeout)", ["status"], registry=r
        )
        self.speculative = Counter(
            f"{NS}_speculative",
            "Speculative races: cache_won, cache_won_late, cache_won_upstream_failed, upstream_won, lookup_miss, "
            "upstream_won_over_hit",
            ["outcome"],
            registry=r,
        )
        self.saved_tokens = Counter(
            f"{NS}_saved_completion_tokens",
            "Upstream completion tokens not recomputed thanks to hits",
            ["category"],
            registry=r,
        )
        self.entries = Gauge(f"{NS}_entries", "Entries in the index", ["category"], registry=r)
        self.entry_bytes = Gauge(f"{NS}_entry_bytes", "Stored bytes of the entries", ["category"], registry=r)
        self.threshold = Gauge(
            f"{NS}_effective_threshold", "Similarity threshold in force (load-adaptive)", ["category"], registry=r
        )
        self.ttl = Gauge(f"{NS}_effective_ttl_seconds", "TTL in force (load-adaptive)", ["category"], registry=r)
        self.pressure = Gauge(f"{NS}_load_pressure", "Upstream load pressure 0..1", registry=r)
        self.latency_ewma = Gauge(
            f"{NS}_upstream_latency_ewma_seconds", "Decayed EWMA of upstream latency on misses", registry=r
        )
        self.queue = Gauge(
            f"{NS}_upstream_queue_waiting", "Upstream waiting requests (scraped; -1 unknown)", registry=r
        )
        self.redis_up = Gauge(f"{NS}_redis_up", "1 while Redis answers, 0 while the breaker is open", registry=r)
        self.lookup_seconds = Histogram(
            f"{NS}_lookup_seconds", "Embed + classify + search + fetch", ["result"], buckets=_LATENCY, registry=r
        )
        self.upstream_seconds = Histogram(
            f"{NS}_upstream_seconds", "Upstream call duration", ["endpoint"], buckets=_LATENCY, registry=r
        )
        self.similarity = Histogram(
            f"{NS}_best_similarity",
            "Best same-scope similarity per lookup",
            ["category"],
            buckets=_SIMILARITY,
            registry=r,
        )
