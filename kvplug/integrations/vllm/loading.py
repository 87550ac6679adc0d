"""The engine-side KV load path, free of vLLM imports (tested and profiled without an engine).

:class:`PagedKV` is the engine's paged KV cache: one tensor per layer and the layout adapter that reads and writes
whole blocks in it. :class:`ChunkLoader` loads stored chunks into it as a pipeline: a background thread fetches
each chunk's payload from the store and verifies and decodes it (zero-copy for the raw codec), while the calling
thread writes the previous chunk into its blocks, all layers of a chunk at once. The first chunk that is missing,
refused or late ends the load: everything before it is in place, and the caller has vLLM recompute the rest.
Nothing here raises on a store or payload problem; a deadline bounds the whole load.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import torch

from kvplug.cache import KVCache
from kvplug.chunks import Chunk
from kvplug.integrations.vllm.layouts import LayoutAdapter, stacked_layers

log = logging.getLogger("kvplug.vllm")


NULL_BLOCK = 0  # vLLM's null block (never holds a request's KV; out-of-window slots of sliding-window groups)


class PagedKV:
    """The engine's paged KV cache: per KV cache group, its layer tensors ``[blocks, heads, block_size, C]``, and
    the layout adapter. Layers are addressed in canonical (model) order: ``positions[g][j]`` is the model index of
    the ``j``-th layer of group ``g``, so payloads stay ``[layers in model order, 2, T, H, D]`` whatever grouping
    vLLM's hybrid KV manager chose. One group for uniform models; with sliding-window layers, several groups whose
    block ids differ, and whose out-of-window slots hold the null block (skipped on writes)."""

    def __init__(
        self,
        groups: Sequence[Sequence[torch.Tensor]],
        adapter: LayoutAdapter,
        block_size: int,
        positions: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if not groups or not all(groups):
            raise ValueError("paged KV: no layers")
        self.groups = [list(g) for g in groups]
        self.adapter = adapter
        self.block_size = block_size
        self.device = self.groups[0][0].device
        if positions is None:
            if len(groups) != 1:
                raise ValueError("paged KV: several groups need their layers' model positions")
            positions = [range(len(groups[0]))]
        self.positions = [torch.tensor(list(p), dtype=torch.long) for p in positions]
        self.num_layers = sum(len(g) for g in self.groups)
        if sorted(i for p in self.positions for i in p.tolist()) != list(range(self.num_layers)):
            raise ValueError("paged KV: layer positions must cover every layer exactly once")
        #: per group, every layer as one strided view where vLLM's allocation allows it (one copy per block)
        self.stacked = [stacked_layers(g) if adapter.stackable else None for g in self.groups]

    @property
    def layers(self) -> list[torch.Tensor]:
        """All layers in model order."""
        out: list[torch.Tensor | None] = [None] * self.num_layers
        for g, pos in zip(self.groups, self.positions, strict=True):
            for t, i in zip(g, pos.tolist(), strict=True):
                out[i] = t
        return out  # type: ignore[return-value]

    def write(self, kv: torch.Tensor, block_ids: Sequence[torch.Tensor]) -> None:
        """Write ``kv`` ``[layers, 2, nb * block_size, H, D]`` into whole blocks: ``block_ids[g]`` holds the ``nb``
        block ids of group ``g`` for these tokens (null blocks are skipped: those tokens are out of the window)."""
        kv = kv.to(self.device, non_blocking=True)
        bs = self.block_size
        for layers, pos, stacked, ids in zip(self.groups, self.positions, self.stacked, block_ids, strict=True):
            part = kv if len(self.groups) == 1 else kv.index_select(0, pos)
            keep = ids != NULL_BLOCK
            if not bool(keep.all()):
                if not bool(keep.any()):
                    continue
                rows = keep.repeat_interleave(bs)
                part, ids = part[:, :, rows], ids[keep]
            ids = ids.to(self.device)
            if stacked is not None:
                self.adapter.scatter_blocks(stacked, ids, part)
            else:
                for layer, t in zip(layers, part, strict=True):
                    self.adapter.scatter_blocks(layer, ids, t)

    def _layer(self, layer: int) -> torch.Tensor:
        for g, pos in zip(self.groups, self.positions, strict=True):
            hit = (pos == layer).nonzero()
            if hit.numel():
                return g[int(hit[0])]
        raise IndexError(f"no KV layer {layer}")

    def read_slots(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """``[2, T, H, D]``: the KV at token slots (``block * block_size + offset``) of one model layer."""
        t = self._layer(layer)
        slots = slots.to(t.device).long()
        return self.adapter.gather(t, slots // self.block_size, slots % self.block_size)

    def write_slots(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Write ``kv`` ``[2, T, H, D]`` at token slots of one model layer."""
        t = self._layer(layer)
        slots = slots.to(t.device).long()
        self.adapter.scatter(t, slots // self.block_size, slots % self.block_size, kv.to(t.device))

    def read(self, block_ids: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """A new host tensor ``[layers, 2, nb * block_size, H, D]`` (model order) with whole blocks of every layer;
        None when a group has a null block there (its KV for those tokens is gone)."""
        parts: list[torch.Tensor] = []
        for layers, stacked, ids in zip(self.groups, self.stacked, block_ids, strict=True):
            if bool((ids == NULL_BLOCK).any()):
                return None
            ids = ids.to(self.device)
            if stacked is not None:
                parts.append(self.adapter.gather_blocks(stacked, ids).cpu())
            else:
                parts.append(torch.stack([self.adapter.gather_blocks(layer, ids).cpu() for layer in layers]))
        if len(parts) == 1:
            return parts[0]
        out = torch.empty((self.num_layers, *parts[0].shape[1:]), dtype=parts[0].dtype)
        for part, pos in zip(parts, self.positions, strict=True):
            out[pos] = part
        return out


@dataclass
class LoadProfile:
    """Where one load's time went (seconds) and what it moved."""

    tokens: int = 0
    bytes: int = 0  # payload bytes fetched
    fetch_s: float = 0.0  # store round trips (background thread)
    decode_s: float = 0.0  # verify + decode (background thread)
    write_s: float = 0.0  # writes into the paged cache (caller's thread)
    wait_s: float = 0.0  # caller waiting for the next decoded chunk
    total_s: float = 0.0

    def add(self, other: LoadProfile) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def gbps(self) -> float:
        return self.bytes / self.total_s / 1e9 if self.total_s else 0.0


@dataclass
class LoadResult:
    loaded_to: int  # tokens [start, loaded_to) are in the cache
    reason: str  # "ok", "miss", "refused", "deadline", "error"
    profile: LoadProfile


_END = object()


class _Done:
    @staticmethod
    def done() -> bool:
        return True


_DONE = _Done()


class ChunkLoader:
    """Loads stored chunks into a :class:`PagedKV` (see the module docstring)."""

    def __init__(self, paged: PagedKV, prefetch: int = 2, pipelined: bool = True) -> None:
        self.paged = paged
        self.prefetch = max(1, prefetch)
        self.pipelined = pipelined
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvplug-fetch")

    def load(
        self,
        cache: KVCache,
        chunks: Sequence[Chunk],
        start: int,
        end: int,
        block_ids: Sequence[Sequence[int]],
        timeout: float,
    ) -> LoadResult:
        """Load tokens ``[start, end)`` (block-aligned) of a request whose blocks are ``block_ids`` (one list per KV
        cache group), from ``chunks`` (in order, covering the range); stops at the first miss, refusal, error or
        ``timeout``."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        bs = self.paged.block_size
        if start % bs or (end % bs and end != chunks[-1].end):
            raise ValueError(f"load range [{start}, {end}) is not block-aligned (block size {bs})")
        prof = LoadProfile()
        blocks = [torch.tensor(list(ids), dtype=torch.long) for ids in block_ids]
        q: queue.Queue[object] = queue.Queue(maxsize=self.prefetch if self.pipelined else len(chunks) + 1)
        cancel = threading.Event()
        if self.pipelined:
            fut = self._pool.submit(self._fetch, cache, chunks, q, cancel, prof)
        else:
            self._fetch(cache, chunks, q, cancel, prof)
            fut = _DONE
        loaded_to, reason = start, "ok"
        try:
            for c in chunks:
                w0 = time.perf_counter()
                try:
                    item = q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    reason = "deadline"
                    cache.store.breaker.failure()  # the store is too slow: answer misses at once for a while
                    break
                prof.wait_s += time.perf_counter() - w0
                if item is _END or item is None:
                    reason = "miss" if item is None else "error"
                    break
                if isinstance(item, str):
                    reason = item
                    break
                kv = item  # [L, 2, c.num_tokens, H, D], possibly a read-only view of the payload
                lo, hi = max(start, c.start), min(end, c.end)
                w1 = time.perf_counter()
                self.paged.write(kv[:, :, lo - c.start : hi - c.start], [b[lo // bs : -(-hi // bs)] for b in blocks])
                prof.write_s += time.perf_counter() - w1
                loaded_to = hi
        except Exception as e:  # noqa: BLE001 - a failed write is a recompute, never an engine crash
            log.error("kvplug: writing loaded KV failed (%s: %s); recomputing", type(e).__name__, e)
            reason = "error"
        finally:
            cancel.set()
            while not fut.done():  # unblock a fetcher waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    time.sleep(0.0005)
        prof.tokens = loaded_to - start
        prof.total_s = time.perf_counter() - t0
        return LoadResult(loaded_to, reason if loaded_to < end else "ok", prof)

    def _fetch(
        self,
        cache: KVCache,
        chunks: Sequence[Chunk],
        q: queue.Queue[object],
        cancel: threading.Event,
        prof: LoadProfile,
    ) -> None:
        """Background: fetch, verify and decode each chunk in order; ``None`` for a miss, a reason string for a
        refusal, ``_END`` after an unexpected error."""
        try:
            for c in chunks:
                if cancel.is_set():
                    return
                f0 = time.perf_counter()
                # no deadline of the store's own: the caller bounds the whole load
                payload = cache.store.get_many([c.prefix_key], timeout=math.inf)[0]
                f1 = time.perf_counter()
                prof.fetch_s += f1 - f0
                if payload is None:
                    self._put(q, None, cancel)
                    return
                prof.bytes += len(payload)
                kv = cache.decode_chunk(c, payload, owned=False)
                prof.decode_s += time.perf_counter() - f1
                if kv is None:
                    self._put(q, "refused", cancel)
                    return
                if not self._put(q, kv, cancel):
                    return
        except Exception as e:  # noqa: BLE001 - reported to the caller as the end of the load
            log.error("kvplug: fetching stored KV failed (%s: %s)", type(e).__name__, e)
            self._put(q, _END, cancel)

    @staticmethod
    def _put(q: queue.Queue[object], item: object, cancel: threading.Event) -> bool:
        while not cancel.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
