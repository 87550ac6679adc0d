"""The store interface: opaque bytes by key, batched, thread-safe, metered.

Public methods validate their input (bad input raises ``ValueError`` naming the problem) and never let a
backend failure escape: a failed read is a counted miss, a failed write a counted error.
"""

from __future__ import annotations

import math
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from kvplug import metrics
from kvplug.errors import StoreError
from kvplug.guard import CircuitBreaker, DeadlineExceeded, run_with_deadline

#: 1-200 characters of ``[A-Za-z0-9._:=-]``, not starting with a dot (no ``.``, ``..`` or hidden names), and
#: nothing else: matched with ``fullmatch`` (``$`` would accept a trailing newline).
KEY_RE = re.compile(r"[A-Za-z0-9_:=-][A-Za-z0-9._:=-]{0,199}")
Value = bytes | bytearray | memoryview
R = TypeVar("R")


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
        if not isinstance(k, str) or not KEY_RE.fullmatch(k):
            raise ValueError(f"invalid key {k!r}: 1-200 chars of [A-Za-z0-9._:=-], not starting with '.'")
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
    :class:`StoreError` or ``OSError`` from them.

    Two guards keep a sick backend off the caller's path. A deadline: a public call given ``timeout`` (or the
    store's ``op_timeout``) returns its miss answer once that many seconds have passed, whatever the backend does
    (counted as error ``deadline``; ``timeout=math.inf`` runs without one, for callers that bound time
    themselves). A circuit breaker: a deadline or a :class:`StoreError` of kind ``connection`` or ``timeout``
    opens it; while open, every call answers a miss at once (counted as ``unavailable``) and a background probe
    (:meth:`_probe`) decides when the backend is back, with a back-off that doubles up to ``down_backoff_max``
    seconds.
    """

    kind: ClassVar[str] = "store"
    #: Exceptions from hooks that mean "the backend failed": turned into misses and counted.
    failures: ClassVar[tuple[type[BaseException], ...]] = (StoreError, OSError)
    #: StoreError kinds that mean "the backend is unreachable or hung": they open the circuit breaker.
    down_kinds: ClassVar[frozenset[str]] = frozenset({"connection", "timeout"})

    def __init__(
        self,
        name: str | None = None,
        op_timeout: float | None = None,
        down_backoff_min: float = 0.25,
        down_backoff_max: float = 30.0,
    ) -> None:
        self.name = name or self.kind
        if op_timeout is not None and op_timeout <= 0:
            raise ValueError(f"{self.name}: op_timeout must be > 0 seconds")
        self.op_timeout = op_timeout
        self.breaker = CircuitBreaker(self.name, self._probe_ok, down_backoff_min, down_backoff_max)
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

    def _probe(self) -> None:
        """A cheap round trip to the backend (the breaker's background probe); raises when it is down."""
        self._exists_many(["kvplug-probe"])

    def _probe_ok(self) -> bool:
        """The breaker's probe: one round trip, bounded by ``op_timeout`` (5 s when the store has none)."""
        try:
            run_with_deadline(self._probe, self.op_timeout or 5.0)
            return True
        except (DeadlineExceeded, *self.failures):
            return False

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

    def _failed(self, e: BaseException) -> None:
        self.count_error(e.kind if isinstance(e, StoreError) else type(e).__name__)

    def _guarded(self, op: str, fn: Callable[[], R], miss: R, timeout: float | None) -> R:
        """Run one backend call under the breaker and the deadline; any failure answers ``miss``."""
        if not self.breaker.allow():
            self.count_error("unavailable")
            return miss
        timeout = self.op_timeout if timeout is None else timeout
        t0 = time.perf_counter()
        try:
            out = fn() if timeout is None or math.isinf(timeout) else run_with_deadline(fn, timeout)
        except DeadlineExceeded:
            self.count_error("deadline")
            self.breaker.failure()
            return miss
        except self.failures as e:
            self._failed(e)
            if isinstance(e, StoreError) and e.kind in self.down_kinds:
                self.breaker.failure()
            else:
                self.breaker.success()
            return miss
        finally:
            self._m_lat[op].observe(time.perf_counter() - t0)
        self.breaker.success()
        return out

    # ---- public API --------------------------------------------------------------------------------------
    def exists_many(self, keys: Sequence[str], timeout: float | None = None) -> list[bool]:
        """Which keys are present. A backend failure answers all False."""
        ks = check_keys(keys)
        if not ks:
            return []
        return self._guarded("contains", lambda: self._exists_many(ks), [False] * len(ks), timeout)

    def contains(self, keys: Sequence[str], timeout: float | None = None) -> int:
        """Number of leading keys present (the prefix hit count), in one batched round trip."""
        ks = check_keys(keys)
        if not ks:
            return 0
        return self._guarded("contains", lambda: self._contains(ks), 0, timeout)

    def get_many(self, keys: Sequence[str], timeout: float | None = None) -> list[bytes | None]:
        """Values for ``keys`` (None for a miss). A backend failure answers all misses."""
        ks = check_keys(keys)
        if not ks:
            return []
        vals = self._guarded("get", lambda: self._get_many(ks), [None] * len(ks), timeout)
        hits = [v for v in vals if v is not None]
        if hits:
            self.count("hits", len(hits))
            self.count("bytes_read", sum(len(v) for v in hits))
        if len(hits) < len(ks):
            self.count("misses", len(ks) - len(hits))
        return vals

    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def put_many(self, items: Sequence[tuple[str, Value]], timeout: float | None = None) -> int:
        """Store entries; returns how many were stored. A backend failure stores none and is counted."""
        its = check_items(items)
        if not its:
            return 0
        ok = self._guarded("put", lambda: self._put_many(its), [False] * len(its), timeout)
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
        return self._guarded("delete", lambda: self._delete(ks), 0, None)

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
        entries, used, cap = self._guarded("contains", self._usage, (None, None, None), None)
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
