"""In-process LRU store with a byte budget."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

from kvplug.connectors.base import ChunkStore, Value


class MemoryStore(ChunkStore):
    """LRU over whole entries; an entry larger than the budget is refused (counted as ``too_large``)."""

    kind = "memory"

    def __init__(self, max_bytes: int = 1 << 30, name: str | None = None) -> None:
        super().__init__(name)
        if max_bytes <= 0:
            raise ValueError(f"memory store: max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def _exists_many(self, keys: list[str]) -> list[bool]:
        with self._lock:
            return [k in self._data for k in keys]

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        with self._lock:
            for k in keys:
                v = self._data.get(k)
                if v is not None:
                    self._data.move_to_end(k)
                out.append(v)
        return out

    def _put_many(self, items: list[tuple[str, Value]]) -> list[bool]:
        ok: list[bool] = []
        evicted = 0
        with self._lock:
            for k, v in items:
                b = bytes(v)
                if len(b) > self.max_bytes:
                    ok.append(False)
                    self.count_error("too_large")
                    continue
                old = self._data.pop(k, None)
                if old is not None:
                    self._used -= len(old)
                while self._used + len(b) > self.max_bytes:
                    _, victim = self._data.popitem(last=False)
                    self._used -= len(victim)
                    evicted += 1
                self._data[k] = b
                self._used += len(b)
                ok.append(True)
            used = self._used
        if evicted:
            self.count("evictions", evicted)
        self._m_used.set(used)
        return ok

    def _delete(self, keys: list[str]) -> int:
        n = 0
        with self._lock:
            for k in keys:
                v = self._data.pop(k, None)
                if v is not None:
                    self._used -= len(v)
                    n += 1
            used = self._used
        self._m_used.set(used)
        return n

    def _iter_keys(self) -> Iterator[str]:
        with self._lock:
            snapshot = list(self._data)
        return iter(snapshot)

    def _usage(self) -> tuple[int | None, int | None, int | None]:
        with self._lock:
            return len(self._data), self._used, self.max_bytes
