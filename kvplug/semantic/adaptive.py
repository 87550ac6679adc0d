"""Load-adaptive policy: loosen thresholds and lengthen TTLs while the upstream is loaded, tighten back after.

Signals: an EWMA of the upstream latency of misses (decaying with ``half_life_s`` while no miss arrives, so an
all-hit period counts as unloaded) and, when scraped, vLLM's ``vllm:num_requests_waiting`` (ignored once older
than three scrape intervals). Pressure is the larger of the two, mapped linearly from the ``*_low`` to the
``*_high`` bound onto 0..1. A category's effective values are

    threshold = threshold - pressure * (threshold - min_threshold)
    ttl       = ttl + pressure * (max_ttl - ttl)

so a category without ``min_threshold``/``max_ttl`` never changes (the policy's safety bound).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kvplug.semantic.policy import AdaptiveParams, CategoryPolicy


@dataclass(frozen=True)
class Effective:
    threshold: float
    ttl: float


def _ramp(value: float, lo: float, hi: float) -> float:
    return min(1.0, max(0.0, (value - lo) / (hi - lo)))


class LoadController:
    def __init__(self, params: AdaptiveParams, clock: Callable[[], float] = time.monotonic) -> None:
        self.params = params
        self.clock = clock
        self._ewma: float | None = None
        self._ewma_at = 0.0
        self._waiting: float | None = None
        self._waiting_at = 0.0

    def observe_latency(self, seconds: float) -> None:
        now = self.clock()
        current = self.latency_ewma(now)
        a = self.params.ewma_alpha
        self._ewma = seconds if current is None else (1 - a) * current + a * seconds
        self._ewma_at = now

    def observe_queue(self, waiting: float) -> None:
        self._waiting = float(waiting)
        self._waiting_at = self.clock()

    def latency_ewma(self, now: float | None = None) -> float | None:
        if self._ewma is None:
            return None
        age = (self.clock() if now is None else now) - self._ewma_at
        return self._ewma * 0.5 ** (max(0.0, age) / self.params.half_life_s)

    def queue_waiting(self, now: float | None = None) -> float | None:
        if self._waiting is None:
            return None
        stale = 3 * max(self.params.scrape_interval_s, 1.0)
        return self._waiting if (self.clock() if now is None else now) - self._waiting_at <= stale else None

    def pressure(self) -> float:
        p = self.params
        if not p.enabled:
            return 0.0
        now = self.clock()
        lat = self.latency_ewma(now)
        q = self.queue_waiting(now)
        return max(
            0.0 if lat is None else _ramp(lat, p.latency_low_s, p.latency_high_s),
            0.0 if q is None else _ramp(q, p.queue_low, p.queue_high),
        )

    def effective(self, cat: CategoryPolicy, pressure: float | None = None) -> Effective:
        p = self.pressure() if pressure is None else pressure
        return Effective(
            threshold=cat.threshold - p * (cat.threshold - cat.threshold_floor),
            ttl=cat.ttl + p * (cat.ttl_ceiling - cat.ttl),
        )


def parse_waiting(metrics_text: str, name: str = "vllm:num_requests_waiting") -> float | None:
    """Sum of a gauge over its label sets in Prometheus text format (None when absent)."""
    total, seen = 0.0, False
    for line in metrics_text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in "{ "):
            rest = line[len(name) :]
            if rest.startswith("{"):
                rest = rest[rest.find("}") + 1 :]
            try:
                total += float(rest.split()[0])  # value [timestamp]
                seen = True
            except (IndexError, ValueError):
                continue
    return total if seen else None
