"""Store throughput next to the raw baseline, measured side by side in one run.

Baselines: plain redis-py SET/GET of the same bytes (one connection, no pipeline, no prefixing) for Redis
stores; plain ``open().write()`` / ``read()`` in a temp directory for disk stores; a Python dict for memory.
Each round runs kvplug and the baseline back to back, alternating which goes first, so machine noise hits
both alike; the best round of each is reported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kvplug.bench.shapes import synthetic_kv
from kvplug.codec import get_codec
from kvplug.connectors import ChunkStore, DiskStore, MemoryStore, RedisStore, TieredStore, open_store


@dataclass
class StoreBenchResult:
    store: str
    shape: str
    chunk_mb: float
    chunks: int
    put_gbps: float
    get_gbps: float
    raw_put_gbps: float
    raw_get_gbps: float

    @property
    def put_ratio(self) -> float:
        return self.put_gbps / self.raw_put_gbps if self.raw_put_gbps else 0.0

    @property
    def get_ratio(self) -> float:
        return self.get_gbps / self.raw_get_gbps if self.raw_get_gbps else 0.0

    def overhead_us(self, op: str) -> float:
        """kvplug's extra time per chunk over the raw baseline, in microseconds (negative: faster)."""
        gb = self.chunk_mb * self.chunks / 1e3
        ours, raw = getattr(self, f"{op}_gbps"), getattr(self, f"raw_{op}_gbps")
        return (gb / ours - gb / raw) / self.chunks * 1e6

    def row(self) -> dict[str, object]:
        return {
            **asdict(self),
            "put_ratio": round(self.put_ratio, 3),
            "get_ratio": round(self.get_ratio, 3),
            "put_overhead_us": round(self.overhead_us("put"), 1),
            "get_overhead_us": round(self.overhead_us("get"), 1),
        }


class _Baseline:
    def put(self, items: list[tuple[str, bytes]]) -> None: ...
    def get(self, keys: list[str]) -> list[bytes]:
        """Read and keep every value, as a consumer of get_many does."""
        raise NotImplementedError

    def delete(self, keys: list[str]) -> None: ...
    def close(self) -> None: ...


class _DictBaseline(_Baseline):
    def __init__(self) -> None:
        self.d: dict[str, bytes] = {}

    def put(self, items: list[tuple[str, bytes]]) -> None:
        for k, v in items:
            self.d[k] = v

    def get(self, keys: list[str]) -> list[bytes]:
        return [self.d[k] for k in keys]

    def delete(self, keys: list[str]) -> None:
        for k in keys:
            del self.d[k]


class _FileBaseline(_Baseline):
    def __init__(self, near: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kvplug-raw-", dir=near.parent))

    def put(self, items: list[tuple[str, bytes]]) -> None:
        for k, v in items:
            with open(self.dir / k, "wb") as f:
                f.write(v)

    def get(self, keys: list[str]) -> list[bytes]:
        out = []
        for k in keys:
            with open(self.dir / k, "rb") as f:
                out.append(f.read())
        return out

    def delete(self, keys: list[str]) -> None:
        for k in keys:
            (self.dir / k).unlink()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _RedisBaseline(_Baseline):
    def __init__(self, store: RedisStore) -> None:
        self.client = store.client
        self.prefix = f"kvplug-raw-bench:{uuid.uuid4().hex[:8]}:"

    def put(self, items: list[tuple[str, bytes]]) -> None:
        for k, v in items:
            self.client.set(self.prefix + k, v)

    def get(self, keys: list[str]) -> list[bytes]:
        return [self.client.get(self.prefix + k) for k in keys]

    def delete(self, keys: list[str]) -> None:
        self.client.delete(*[self.prefix + k for k in keys])

    def close(self) -> None:
        pass


def _baseline_for(store: ChunkStore) -> _Baseline:
    if isinstance(store, TieredStore):
        return _baseline_for(store.tiers[-1])
    if isinstance(store, RedisStore):
        return _RedisBaseline(store)
    if isinstance(store, DiskStore):
        return _FileBaseline(store.root)
    if isinstance(store, MemoryStore):
        return _DictBaseline()
    raise ValueError(f"no raw baseline for {type(store).__name__}")


def _timed(fn: Callable[..., object], *args: object) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def bench_store(
    url: str,
    shape: str = "smollm2-135m",
    chunks: int = 16,
    rounds: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> StoreBenchResult:
    """Put then get ``chunks`` 256-token chunks, alternating with the raw baseline, ``rounds`` times."""
    kv = synthetic_kv(shape)
    payload = get_codec("raw").encode(kv)
    total = len(payload) * chunks
    store = open_store(url)
    if isinstance(store, RedisStore) and not store.ping():
        store.close()
        raise RuntimeError(f"cannot reach Redis at {url}")
    base = _baseline_for(store)
    best = {"put": float("inf"), "get": float("inf"), "raw_put": float("inf"), "raw_get": float("inf")}
    try:
        for r in range(rounds):
            keys = [f"bench-{uuid.uuid4().hex}" for _ in range(chunks)]
            items = [(k, payload) for k in keys]
            # alternate who goes first, so page-cache write-back and warm-up do not favour one side
            if r % 2 == 0:
                t_put, stored = _timed(store.put_many, items)
                t_raw_put, _ = _timed(base.put, items)
            else:
                t_raw_put, _ = _timed(base.put, items)
                t_put, stored = _timed(store.put_many, items)
            if isinstance(store, TieredStore):
                store.flush()
            if r % 2 == 0:
                t_get, got = _timed(store.get_many, keys)
                t_raw_get, raw_got = _timed(base.get, keys)
            else:
                t_raw_get, raw_got = _timed(base.get, keys)
                t_get, got = _timed(store.get_many, keys)
            for name, t in (("put", t_put), ("raw_put", t_raw_put), ("get", t_get), ("raw_get", t_raw_get)):
                best[name] = min(best[name], t)
            if stored != len(keys) or got != raw_got:
                raise RuntimeError(f"store {url} lost entries during the benchmark (cap too small?)")
            store.delete(keys)
            base.delete(keys)
            if progress:
                progress(r + 1, rounds)
    finally:
        base.close()
        store.close()
    gb = total / 1e9
    return StoreBenchResult(
        store=url.split("?")[0].split("://")[0],
        shape=shape,
        chunk_mb=round(len(payload) / 1e6, 2),
        chunks=chunks,
        put_gbps=gb / best["put"],
        get_gbps=gb / best["get"],
        raw_put_gbps=gb / best["raw_put"],
        raw_get_gbps=gb / best["raw_get"],
    )


def default_disk_url() -> str:
    return f"file://{tempfile.mkdtemp(prefix='kvplug-bench-')}?max_bytes=8GiB"


def cleanup_disk_url(url: str) -> None:
    path = url.split("://", 1)[1].split("?")[0]
    if os.path.basename(path).startswith("kvplug-bench-"):
        shutil.rmtree(path, ignore_errors=True)
