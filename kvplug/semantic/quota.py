"""Per-category quota accounting and eviction order (fifo, lru, lfu), in memory.

The quota is ``max_entries`` and/or ``max_bytes`` (stored document size). fifo evicts the oldest insertion, lru
the least recently hit (insertion counts as a use), lfu the fewest hits (ties: least recently used).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Entry:
    doc_id: int
    key: str
    scope: str
    created: float
    last_used: float
    hits: int
    nbytes: int


class CategoryEntries:
    def __init__(self, eviction: str) -> None:
        if eviction not in ("fifo", "lru", "lfu"):
            raise ValueError(f"unknown eviction {eviction!r}")
        self.eviction = eviction
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # fifo: insertion order; lru/lfu: use order
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, doc_id: int) -> bool:
        return doc_id in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))  # a snapshot: callers may remove while iterating

    def add(self, entry: Entry) -> None:
        old = self._entries.pop(entry.doc_id, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._entries[entry.doc_id] = entry
        self.nbytes += entry.nbytes

    def add_sorted(self, entries: list[Entry]) -> None:
        """Bulk load (start-up): in the order this policy evicts, oldest first."""
        key = (lambda e: e.created) if self.eviction == "fifo" else (lambda e: e.last_used)
        for e in sorted(entries, key=key):
            self.add(e)

    def touch(self, doc_id: int, now: float) -> None:
        e = self._entries.get(doc_id)
        if e is None:
            return
        e.hits += 1
        e.last_used = now
        if self.eviction != "fifo":
            self._entries.move_to_end(doc_id)

    def remove(self, doc_id: int) -> Entry | None:
        e = self._entries.pop(doc_id, None)
        if e is not None:
            self.nbytes -= e.nbytes
        return e

    def _victim(self) -> Entry:
        if self.eviction == "lfu":
            return min(self._entries.values(), key=lambda e: (e.hits, e.last_used))
        return next(iter(self._entries.values()))

    def over_quota(self, max_entries: int, max_bytes: int | None) -> list[Entry]:
        """Remove and return the entries to evict so that the category fits its quota."""
        out: list[Entry] = []
        while self._entries and (len(self._entries) > max_entries or (max_bytes and self.nbytes > max_bytes)):
            victim = self._victim()
            self.remove(victim.doc_id)
            out.append(victim)
        return out
