"""Prometheus metrics, registered once per process on the default registry (which vLLM's /metrics exports).

Label ``store`` is the backend kind (memory, disk, redis, redis-cluster, tiered) or a name given in config.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

HITS = Counter("kvplug_store_hits", "Keys found by get_many/contains", ["store"])
MISSES = Counter("kvplug_store_misses", "Keys not found (or unreadable) by get_many", ["store"])
READ_BYTES = Counter("kvplug_store_read_bytes", "Payload bytes returned by get_many", ["store"])
WRITTEN_BYTES = Counter("kvplug_store_written_bytes", "Payload bytes accepted by put_many", ["store"])
PUTS = Counter("kvplug_store_puts", "Entries written", ["store"])
LATENCY = Histogram("kvplug_store_op_seconds", "Store operation latency", ["store", "op"], buckets=_LATENCY_BUCKETS)
ERRORS = Counter("kvplug_store_errors", "Store errors turned into misses or dropped writes", ["store", "kind"])
EVICTIONS = Counter("kvplug_store_evictions", "Entries evicted to honour a byte cap", ["store"])
QUEUE_DROPS = Counter("kvplug_store_queue_drops", "Write-backs dropped because the queue was full", ["store"])
USED_BYTES = Gauge("kvplug_store_used_bytes", "Bytes held by a capped store", ["store"])
CONNECTOR_LOOKUP_TOKENS = Counter(
    "kvplug_connector_lookup_tokens", "Prompt tokens looked up by the engine connector", ["engine"]
)
CONNECTOR_HIT_TOKENS = Counter(
    "kvplug_connector_hit_tokens", "Prompt tokens the store could serve (lookup)", ["engine"]
)
CONNECTOR_LOADED_TOKENS = Counter("kvplug_connector_loaded_tokens", "Tokens of KV loaded into the engine", ["engine"])
CONNECTOR_SAVED_TOKENS = Counter("kvplug_connector_saved_tokens", "Tokens of KV saved from the engine", ["engine"])
CONNECTOR_LOAD_SECONDS = Histogram(
    "kvplug_connector_load_seconds", "Time to load one request's KV", ["engine"], buckets=_LATENCY_BUCKETS
)
CONNECTOR_LOAD_PHASE_SECONDS = Counter(
    "kvplug_connector_load_phase_seconds",
    "Seconds of the load pipeline by phase: fetch and decode (background thread), write (engine thread)",
    ["engine", "phase"],
)
CONNECTOR_SAVE_SECONDS = Histogram(
    "kvplug_connector_save_seconds",
    "Time to encode and store one batch of chunks",
    ["engine"],
    buckets=_LATENCY_BUCKETS,
)
CONNECTOR_ERRORS = Counter(
    "kvplug_connector_errors", "Connector failures (each one a recompute, never a wrong answer)", ["engine", "kind"]
)
BLEND_REQUESTS = Counter(
    "kvplug_blend_requests", "Requests with a blend plan, by outcome (blended, fallback, refused)", ["outcome"]
)
BLEND_SEGMENTS = Counter(
    "kvplug_blend_segments", "Reused segments looked up, by result (hit, miss, refused)", ["result"]
)
BLEND_TOKENS = Counter(
    "kvplug_blend_tokens", "Prompt tokens of blend requests: reused (loaded), recomputed (of those), fresh", ["kind"]
)
BLEND_FALLBACKS = Counter("kvplug_blend_fallbacks", "Blend requests run as full prefills, by reason", ["reason"])
PAYLOAD_ERRORS = Counter("kvplug_payload_errors", "Stored payloads refused on decode (treated as misses)", ["kind"])

__all__ = [
    "BLEND_FALLBACKS",
    "BLEND_REQUESTS",
    "BLEND_SEGMENTS",
    "BLEND_TOKENS",
    "CONNECTOR_ERRORS",
    "CONNECTOR_HIT_TOKENS",
    "CONNECTOR_LOADED_TOKENS",
    "CONNECTOR_LOAD_PHASE_SECONDS",
    "CONNECTOR_LOAD_SECONDS",
    "CONNECTOR_LOOKUP_TOKENS",
    "CONNECTOR_SAVED_TOKENS",
    "CONNECTOR_SAVE_SECONDS",
    "ERRORS",
    "EVICTIONS",
    "HITS",
    "LATENCY",
    "MISSES",
    "PAYLOAD_ERRORS",
    "PUTS",
    "QUEUE_DROPS",
    "READ_BYTES",
    "REGISTRY",
    "USED_BYTES",
    "WRITTEN_BYTES",
]
