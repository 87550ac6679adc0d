"""Redis, Redis Sentinel and Redis Cluster stores (redis-py with hiredis).

Keys are ``<prefix>{<key>}``; a value larger than ``max_value_bytes`` is split into parts
``<prefix>{<key>}:p<i>`` under a small manifest at the main key. The hash tag ``{<key>}`` puts every part of one
chunk on one cluster slot. Reads and writes are pipelined in batches. Failures (refused connection, timeout,
cluster down) become counted misses. A circuit breaker (see :class:`kvplug.connectors.base.ChunkStore`) answers
misses at once while Redis is down or hung, and a background ping decides when it is back; with ``op_timeout``
(default 1 s) no call waits longer than that for a Redis that stopped answering, so a dead or stopped Redis
never stalls the engine.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import redis
import xxhash
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from kvplug.connectors.base import ChunkStore, Value
from kvplug.errors import StoreError
from kvplug.redact import redact

_MANIFEST_MAGIC = b"KVPLUG-SPLIT-V1\x00"
_MANIFEST = struct.Struct("<16sIQ8s")  # magic, parts, total length, xxh3_64 of the whole value


def retry_policy(retries: int) -> Retry:
    """redis-py's own retry: jittered exponential back-off from 10 ms up to 200 ms."""
    return Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), retries)


class RedisStore(ChunkStore):
    """A store on one Redis (or a Sentinel-managed master), or on a Redis Cluster (``kind`` tells)."""

    kind = "redis"
    failures = (StoreError, OSError, redis.RedisError)

    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster,
        prefix: str = "kvplug:",
        ttl: float | None = None,
        max_value_bytes: int = 64 << 20,
        batch_size: int = 32,
        pipeline_bytes: int = 4 << 20,
        down_backoff_max: float = 30.0,
        op_timeout: float | None = 1.0,
        name: str | None = None,
    ) -> None:
        self.kind = "redis-cluster" if isinstance(client, redis.RedisCluster) else "redis"
        super().__init__(name, op_timeout=op_timeout, down_backoff_min=min(0.25, down_backoff_max),
                         down_backoff_max=down_backoff_max)
        if max_value_bytes < 1024:
            raise ValueError("redis store: max_value_bytes must be >= 1024")
        if batch_size < 1:
            raise ValueError("redis store: batch_size must be >= 1")
        if ttl is not None and ttl <= 0:
            raise ValueError("redis store: ttl must be > 0 seconds (or omitted for no expiry)")
        self.client = client
        self.prefix = prefix
        self.ttl_ms = int(ttl * 1000) if ttl else None
        self.max_value_bytes = int(max_value_bytes)
        self.batch_size = int(batch_size)
        self.pipeline_bytes = int(pipeline_bytes)
        self._avg_value = 0.0  # running mean of value sizes read, to size read pipelines by bytes

    # ---- keys and errors ---------------------------------------------------------------------------------
    def rkey(self, key: str) -> str:
        return f"{self.prefix}{{{key}}}"

    def _part(self, key: str, i: int) -> str:
        return f"{self.prefix}{{{key}}}:p{i}"

    def _call(self, fn: Any, *args: Any) -> Any:
        """Run one backend exchange; an unreachable or hung Redis becomes a StoreError that opens the breaker."""
        try:
            return fn(*args)
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError, OSError) as e:
            kind = "timeout" if isinstance(e, redis.TimeoutError | TimeoutError) else "connection"
            raise StoreError(kind, redact(str(e))) from None

    def _probe(self) -> None:
        self._call(self.client.ping)

    def _pipe(self, build: Any) -> list[Any]:
        """Execute a non-transactional pipeline built by ``build(pipe)``."""

        def run() -> list[Any]:
            p = self.client.pipeline(transaction=False)
            build(p)
            return p.execute()

        return self._call(run)

    def _batches(self, items: list[Any]) -> Iterator[list[Any]]:
        for i in range(0, len(items), self.batch_size):
            yield items[i : i + self.batch_size]

    # ---- hooks -------------------------------------------------------------------------------------------
    def _exists_many(self, keys: list[str]) -> list[bool]:
        out: list[bool] = []
        for batch in self._batches(keys):
            res = self._pipe(lambda p, b=batch: [p.exists(self.rkey(k)) for k in b])
            out.extend(bool(r) for r in res)
        return out

    def _contains(self, keys: list[str]) -> int:
        n = 0
        for batch in self._batches(keys):
            res = self._pipe(lambda p, b=batch: [p.exists(self.rkey(k)) for k in b])
            for r in res:
                if not r:
                    return n
                n += 1
        return n

    def _read_batch(self) -> int:
        """Keys per read pipeline: pipelining helps small values, but several multi-MB replies in one pipeline
        are slower than one GET at a time (measured on loopback), so batches hold ~``pipeline_bytes``."""
        if self._avg_value <= 0:
            return self.batch_size
        return max(1, min(self.batch_size, int(self.pipeline_bytes // self._avg_value)))

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        i = 0
        while i < len(keys):
            batch = keys[i : i + self._read_batch()]
            i += len(batch)
            if len(batch) == 1:
                got = [self._call(self.client.get, self.rkey(batch[0]))]
            else:
                got = self._pipe(lambda p, b=batch: [p.get(self.rkey(k)) for k in b])
            sizes = [len(v) for v in got if v is not None]
            if sizes:
                self._avg_value = (
                    0.8 * self._avg_value + 0.2 * (sum(sizes) / len(sizes))
                    if self._avg_value
                    else sum(sizes) / len(sizes)
                )
            out.extend(got)
        for i, v in enumerate(out):
            if v is not None and len(v) == _MANIFEST.size and v.startswith(_MANIFEST_MAGIC):
                out[i] = self._join(keys[i], v)
        return out

    def _join(self, key: str, manifest: bytes) -> bytes | None:
        _, nparts, total, digest = _MANIFEST.unpack(manifest)
        parts = self._pipe(lambda p: [p.get(self._part(key, i)) for i in range(nparts)])
        if any(x is None for x in parts):
            self.count_error("split_part_missing")
            return None
        value = b"".join(parts)
        if len(value) != total or xxhash.xxh3_64_digest(value) != digest:
            self.count_error("split_mismatch")
            return None
        return value

    def _put_many(self, items: list[tuple[str, Value]]) -> list[bool]:
        small = [(k, v) for k, v in items if memoryview(v).nbytes <= self.max_value_bytes]
        for batch in self._batches(small):
            self._pipe(lambda p, b=batch: [p.set(self.rkey(k), v, px=self.ttl_ms) for k, v in b])
        for k, v in items:
            mv = memoryview(v).cast("B")
            if mv.nbytes > self.max_value_bytes:
                self._put_split(k, mv)
        return [True] * len(items)

    def _put_split(self, key: str, mv: memoryview) -> None:
        step = self.max_value_bytes
        parts = [mv[i : i + step] for i in range(0, mv.nbytes, step)]
        manifest = _MANIFEST.pack(_MANIFEST_MAGIC, len(parts), mv.nbytes, xxhash.xxh3_64_digest(mv))

        def build(p: Any) -> None:
            for i, part in enumerate(parts):
                p.set(self._part(key, i), part, px=self.ttl_ms)
            p.set(self.rkey(key), manifest, px=self.ttl_ms)  # last: the value is visible only when whole

        self._pipe(build)

    def _delete(self, keys: list[str]) -> int:
        n = 0
        for batch in self._batches(keys):
            heads = self._pipe(lambda p, b=batch: [p.getrange(self.rkey(k), 0, _MANIFEST.size - 1) for k in b])
            extra: list[str] = []
            for k, h in zip(batch, heads, strict=True):
                if h and len(h) == _MANIFEST.size and h.startswith(_MANIFEST_MAGIC):
                    extra += [self._part(k, i) for i in range(_MANIFEST.unpack(h)[1])]
            res = self._pipe(lambda p, b=batch: [p.delete(self.rkey(k)) for k in b])
            if extra:
                self._pipe(lambda p, xs=extra: [p.delete(x) for x in xs])
            n += sum(int(r) for r in res)
        return n

    def _iter_keys(self) -> Iterator[str]:
        pat = f"{self.prefix}{{*}}"
        start = len(self.prefix) + 1
        for raw in self._call(lambda: list(self.client.scan_iter(match=pat, count=1000))):
            k = raw.decode() if isinstance(raw, bytes) else raw
            if k.endswith("}"):
                yield k[start:-1]

    def _usage(self) -> tuple[int | None, int | None, int | None]:
        info = self._call(lambda: self.client.info("memory"))
        nodes = [info] if "used_memory" in info else list(info.values())  # cluster: one dict per node
        used = sum(int(n.get("used_memory", 0)) for n in nodes if isinstance(n, dict))
        caps = [int(n.get("maxmemory", 0)) for n in nodes if isinstance(n, dict)]
        return None, used, (sum(caps) if caps and all(caps) else None)

    def ping(self) -> bool:
        return self._probe_ok()

    def _close(self) -> None:
        self.client.close()
