"""The store interface: opaque bytes by key, batched, thread-safe, metered.

Public methods validate their input (bad input raises ``ValueError`` naming the problem) and never let a
backend failure escape: a failed read is a counted miss, a failed write a counted error.
"""

from __future__ import annotations

import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvplug import metrics
from kvplug.errors import StoreError

KEY_RE = re.compile(r"^[A-Za-z0-9._:=-]{1,200}$")
Value = bytes | bytearray | memoryview


@dataclass
class StoreStats:
    """A snapshot of one store's counters (also exported as Prometheus metrics)."""

    kind: str
    name: str
    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    queue_drops: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    entries: int | None = None
    used_bytes: int | None = None
    capacity_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


def check_keys(keys: Sequence[str]) -> list[str]:
    if isinstance(keys, str):
        raise ValueError("expected a sequence of keys, got a single string")
    out = list(keys)
    for k in out:
        if not isinstance(k, str) or not KEY_RE.match(k):
            raise ValueError(f"invalid key {k!r}: 1-200 chars of [A-Za-z0-9._:=-]")
    return out


def check_items(items: Sequence[tuple[str, Value]]) -> list[tuple[str, Value]]:
    out = list(items)
    check_keys([k for k, _ in out])
    for k, v in out:
        if not isinstance(v, bytes | bytearray | memoryview):
            raise ValueError(f"value for key {k!r} must be bytes-like, got {type(v).__name__}")
    return out


class ChunkStore(ABC):
    """Base class of all stores. Subclasses implement the ``_``-prefixed hooks and may raise
    :class:`StoreError` or ``OSError`` from them."""

    kind: ClassVar[str] = "store"
    #: Exceptions from hooks that mean "the backend failed": turned into misses and counted.
    failures: ClassVar[tuple[type[BaseException], ...]] = (StoreError, OSError)

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.kind
        self._stats_lock = threading.Lock()
        self._counts: dict[str, int] = {
            "hits": 0,
            "misses": 0,
            "puts": 0,
            "bytes_read": 0,
            "bytes_written": 0,
            "evictions": 0,
            "queue_drops": 0,
        }
        self._errors: dict[str, int] = {}
        lbl = self.name
        self._m_hits = metrics.HITS.labels(lbl)
        self._m_misses = metrics.MISSES.labels(lbl)
        self._m_read = metrics.READ_BYTES.labels(lbl)
        self._m_written = metrics.WRITTEN_BYTES.labels(lbl)
        self._m_puts = metrics.PUTS.labels(lbl)
        self._m_evict = metrics.EVICTIONS.labels(lbl)
        self._m_drops = metrics.QUEUE_DROPS.labels(lbl)
        self._m_used = metrics.USED_BYTES.labels(lbl)
        self._m_lat = {op: metrics.LATENCY.labels(lbl, op) for op in ("get", "put", "contains", "delete")}
        self.closed = False

    # ---- hooks -------------------------------------------------------------------------------------------
    @abstractmethod
    def _exists_many(self, keys: list[str]) -> list[bool]: ...

    @abstractmethod
    def _get_many(self, keys: list[str]) -> list[bytes | None]: ...

    @abstractmethod
    def _put_many(self, items: list[tuple[str, Value]]) -> list[bool]:
        """Store items; return per item whether it was stored."""

    @abstractmethod
    def _delete(self, keys: list[str]) -> int: ...

    @abstractmethod
    def _iter_keys(self) -> Iterator[str]: ...

    def _contains(self, keys: list[str]) -> int:
        n = 0
        for hit in self._exists_many(keys):
            if not hit:
                break
            n += 1
        return n

    def _usage(self) -> tuple[int | None, int | None, int | None]:
        """(entries, used bytes, capacity bytes), where the backend knows them."""
        return None, None, None

    def _close(self) -> None:
        return None

    # ---- counters ----------------------------------------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._counts[name] += n
        {
            "hits": self._m_hits,
            "misses": self._m_misses,
            "puts": self._m_puts,
            "bytes_read": self._m_read,
            "bytes_written": self._m_written,
            "evictions": self._m_evict,
            "queue_drops": self._m_drops,
        }[name].inc(n)

    def count_error(self, kind: str) -> None:
        with self._stats_lock:
            self._errors[kind] = self._errors.get(kind, 0) + 1
        metrics.ERRORS.labels(self.name, kind).inc()

    @contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._m_lat[op].observe(time.perf_counter() - t0)

    def _failed(self, e: BaseException) -> None:
        self.count_error(e.kind if isinstance(e, StoreError) else type(e).__name__)

    # ---- public API --------------------------------------------------------------------------------------
    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Which keys are present. A backend failure answers all False."""
        ks = check_keys(keys)
        if not ks:
            return []
        with self._guard("contains"):
            try:
                return self._exists_many(ks)
            except self.failures as e:
                self._failed(e)
                return [False] * len(ks)

    def contains(self, keys: Sequence[str]) -> int:
        """Number of leading keys present (the prefix hit count), in one batched round trip."""
        ks = check_keys(keys)
        if not ks:
            return 0
        with self._guard("contains"):
            try:
                return self._contains(ks)
            except self.failures as e:
                self._failed(e)
                return 0

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values for ``keys`` (None for a miss). A backend failure answers all misses."""
        ks = check_keys(keys)
        if not ks:
            return []
        with self._guard("get"):
            try:
                vals = self._get_many(ks)
            except self.failures as e:
                self._failed(e)
                vals = [None] * len(ks)
        hits = [v for v in vals if v is not None]
        if hits:
            self.count("hits", len(hits))
            self.count("bytes_read", sum(len(v) for v in hits))
        if len(hits) < len(ks):
            self.count("misses", len(ks) - len(hits))
        return vals

    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def put_many(self, items: Sequence[tuple[str, Value]]) -> int:
        """Store entries; returns how many were stored. A backend failure stores none and is counted."""
        its = check_items(items)
        if not its:
            return 0
        with self._guard("put"):
            try:
                ok = self._put_many(its)
            except self.failures as e:
                self._failed(e)
                return 0
        n = sum(ok)
        if n:
            self.count("puts", n)
            self.count("bytes_written", sum(memoryview(v).nbytes for (_, v), s in zip(its, ok, strict=True) if s))
        return n

    def put(self, key: str, value: Value) -> bool:
        return self.put_many([(key, value)]) == 1

    def delete(self, keys: Sequence[str]) -> int:
        """Delete keys; returns how many existed. Failures are counted and answer 0."""
        ks = check_keys(keys)
        if not ks:
            return 0
        with self._guard("delete"):
            try:
                return self._delete(ks)
            except self.failures as e:
                self._failed(e)
                return 0

    def keys(self, limit: int | None = None) -> list[str]:
        """Up to ``limit`` stored keys (for inspection; may be slow on large stores)."""
        out: list[str] = []
        try:
            for k in self._iter_keys():
                if limit is not None and len(out) >= limit:
                    break
                out.append(k)
        except self.failures as e:
            self._failed(e)
        return out

    def purge(self) -> int:
        """Delete every entry this store owns; returns how many."""
        n = 0
        batch: list[str] = []
        for k in self.keys():
            batch.append(k)
            if len(batch) >= 512:
                n += self.delete(batch)
                batch = []
        return n + (self.delete(batch) if batch else 0)

    def stats(self) -> StoreStats:
        try:
            entries, used, cap = self._usage()
        except self.failures as e:
            self._failed(e)
            entries = used = cap = None
        with self._stats_lock:
            return StoreStats(
                self.kind,
                self.name,
                **self._counts,
                errors=dict(self._errors),
                entries=entries,
                used_bytes=used,
                capacity_bytes=cap,
            )

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
