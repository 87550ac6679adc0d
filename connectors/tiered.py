"""Tiered store: memory, then disk, then Redis. Writes land in the first tier at once and reach the lower
tiers through a bounded background queue (full queue: the write-back is dropped and counted, the engine never
blocks). A hit in a lower tier is promoted to the tiers above it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kvplug.connectors.base import ChunkStore, StoreStats, Value
from kvplug.worker import BoundedWorker

_Job = tuple[tuple[int, ...], list[tuple[str, Value]]]


class TieredStore(ChunkStore):
    kind = "tiered"

    def __init__(
        self, tiers: Sequence[ChunkStore], queue_size: int = 256, promote: bool = True, name: str | None = None
    ) -> None:
        super().__init__(name)
        if not tiers:
            raise ValueError("tiered store: needs at least one tier")
        self.tiers = list(tiers)
        self.promote = promote
        self._writeback: BoundedWorker[_Job] = BoundedWorker("kvplug-writeback", self._write_back, queue_size)

    def _write_back(self, job: _Job) -> None:
        tier_ids, items = job
        for i in tier_ids:
            self.tiers[i].put_many(items)  # never raises on backend failure (counted by the tier)

    def _enqueue(self, tier_ids: tuple[int, ...], items: list[tuple[str, Value]]) -> None:
        if tier_ids and items and not self._writeback.submit((tier_ids, items)):
            self.count("queue_drops", len(items))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued write-backs are done; returns False on timeout."""
        return self._writeback.flush(timeout)

    def _exists_many(self, keys: list[str]) -> list[bool]:
        found = [False] * len(keys)
        for tier in self.tiers:
            idx = [i for i, f in enumerate(found) if not f]
            if not idx:
                break
            for i, hit in zip(idx, tier.exists_many([keys[i] for i in idx]), strict=True):
                found[i] = hit
        return found

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        for t, tier in enumerate(self.tiers):
            idx = [i for i, v in enumerate(out) if v is None]
            if not idx:
                break
            got = tier.get_many([keys[i] for i in idx])
            hits: list[tuple[str, Value]] = []
            for i, v in zip(idx, got, strict=True):
                if v is not None:
                    out[i] = v
                    hits.append((keys[i], v))
            if hits and t > 0 and self.promote:
                self.tiers[0].put_many(hits)
                self._enqueue(tuple(range(1, t)), hits)
        return out

    def _put_many(self, items: list[tuple[str, Value]]) -> list[bool]:
        items = [(k, bytes(v)) for k, v in items]  # the queue must not hold views of caller buffers
        ok = self.tiers[0].put_many(items)
        self._enqueue(tuple(range(1, len(self.tiers))), items)
        return [True] * len(items) if len(self.tiers) > 1 else [ok == len(items)] * len(items)

    def _delete(self, keys: list[str]) -> int:
        return max(tier.delete(keys) for tier in self.tiers)

    def _iter_keys(self) -> Iterator[str]:
        seen: set[str] = set()
        for tier in self.tiers:
            for k in tier.keys():
                if k not in seen:
                    seen.add(k)
                    yield k

    def stats(self) -> StoreStats:
        s = super().stats()
        s.extra["tiers"] = [t.stats() for t in self.tiers]
        s.entries = s.extra["tiers"][0].entries
        return s

    def _close(self) -> None:
        self._writeback.close(timeout=10.0)
        for tier in self.tiers:
            tier.close()
