"""Connector stats through vLLM's own path: the worker reports ``KVPlugStats`` each step, vLLM aggregates them
and the API server process exports them as ``vllm:kvplug_*`` next to vLLM's metrics (also when the engine runs in
another process, where kvplug's in-process ``kvplug_connector_*`` metrics cannot be scraped)."""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

FIELDS = (
    "loaded_tokens",
    "saved_tokens",
    "load_seconds",
    "save_seconds",
    "load_errors",
    "save_errors",
    "load_bytes",
    "load_fetch_seconds",
    "load_decode_seconds",
    "load_write_seconds",
    "blend_requests",
    "blend_reused_tokens",
    "blend_recomputed",
)
_DOCS = {
    "blend_requests": "Requests prefilled by kvplug blending (reused segment KV, selective recompute)",
    "blend_reused_tokens": "Prompt tokens whose KV blending loaded from stored segments",
    "blend_recomputed": "Loaded tokens blending recomputed (selected by its strategy)",
    "load_bytes": "Payload bytes fetched by kvplug loads",
    "load_fetch_seconds": "Seconds kvplug's load pipeline spent in store round trips (background thread)",
    "load_decode_seconds": "Seconds kvplug's load pipeline spent verifying and decoding payloads",
    "load_write_seconds": "Seconds kvplug's load pipeline spent writing KV into the paged cache",
    "loaded_tokens": "Tokens of KV loaded by kvplug",
    "saved_tokens": "Tokens of KV saved by kvplug",
    "load_seconds": "Seconds spent loading KV by kvplug",
    "save_seconds": "Seconds spent encoding and storing KV by kvplug (background thread)",
    "load_errors": "kvplug loads that fell back to recompute",
    "save_errors": "kvplug chunks not saved (queue full, store failure)",
}


class KVPlugStats(KVConnectorStats):
    """Sums over an interval; serialisable (a dict of numbers)."""

    def __post_init__(self) -> None:
        for k in FIELDS:
            self.data.setdefault(k, 0)

    def reset(self) -> None:
        self.data = dict.fromkeys(FIELDS, 0)

    def aggregate(self, other: KVConnectorStats) -> KVPlugStats:
        for k in FIELDS:
            self.data[k] = self.data.get(k, 0) + other.data.get(k, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.data.items()}

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in FIELDS)


class KVPlugPromMetrics(KVConnectorPromMetrics):
    """Counters ``vllm:kvplug_<field>_total`` with vLLM's per-engine labels."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._bound: dict[tuple[int, str], Any] = {}
        for name in FIELDS:
            counter = self._counter_cls(name=f"vllm:kvplug_{name}", documentation=_DOCS[name], labelnames=labelnames)
            for engine_idx, values in per_engine_labelvalues.items():
                self._bound[(engine_idx, name)] = counter.labels(*values)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name in FIELDS:
            value = transfer_stats_data.get(name, 0)
            if value and (engine_idx, name) in self._bound:
                self._bound[(engine_idx, name)].inc(value)
