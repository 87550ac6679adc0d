"""The document store: Redis through redis-py's asyncio client (hiredis parser), behind a circuit breaker.

Every operation on the request path has a deadline: the larger of ``timeout_s`` and 8x the EWMA of recent
operation latencies, at most ``timeout_max_s`` (so a loaded machine whose Redis answers in 50 ms is not taken for
a dead Redis); background scans, batches and the recovery ping get ``bulk_timeout_s`` (at least 5 s). A refused
connection, a timeout or any socket error raises
:class:`kvplug.errors.StoreError` and opens the breaker, which answers "unavailable" at once for an exponential
back-off (50 ms doubling up to ``backoff_max_s``) before trying Redis again. The proxy turns all of it into a
pass-through to the upstream. redis-py's own retries are off: one failure is enough to stop waiting on Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from kvplug.errors import StoreError
from kvplug.semantic.document import CacheDocument, doc_key, parse_doc_key

T = TypeVar("T")

# Fetch a document and count the hit in one round trip, without re-creating a key that just expired.
_FETCH_AND_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
if ARGV[1] == '1' then
  redis.call('HINCRBY', KEYS[1], 'hits', 1)
  redis.call('HSET', KEYS[1], 'last', ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
"""


class DocStore:
    def __init__(
        self,
        url: str,
        prefix: str,
        timeout_s: float = 0.25,
        backoff_max_s: float = 5.0,
        on_error: Callable[[str, str], None] | None = None,
        timeout_max_s: float | None = None,
    ) -> None:
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.timeout_max_s = max(timeout_s, timeout_max_s if timeout_max_s is not None else timeout_s)
        self._latency = 0.0  # EWMA of request-path operation latencies (seconds)
        self.bulk_timeout_s = max(5.0, timeout_s)  # background scans and batches (start-up rebuild, sweep)
        self.backoff_max_s = backoff_max_s
        self.on_error = on_error or (lambda op, kind: None)
        self.client = aredis.Redis.from_url(
            url,
            socket_timeout=self.bulk_timeout_s,  # request-path deadlines are enforced by asyncio.wait_for
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._fetch = self.client.register_script(_FETCH_AND_TOUCH)
        self._down_until = 0.0
        self._backoff = 0.0

    # ---- circuit breaker ---------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False while the breaker is open (the next call after the back-off probes Redis again)."""
        return time.monotonic() >= self._down_until

    @property
    def up(self) -> bool:
        return self._backoff == 0.0

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        now = time.monotonic()
        if now < self._down_until:
            self.on_error(op, "unavailable")
            raise StoreError("unavailable", f"redis marked down for {self._down_until - now:.2f}s more")
        t0 = time.perf_counter()
        try:
            out = await asyncio.wait_for(fn(), timeout or self.deadline)
        except (redis.ConnectionError, redis.TimeoutError, OSError, asyncio.TimeoutError) as e:
            self._backoff = min(self.backoff_max_s, max(0.05, self._backoff * 2))
            self._down_until = time.monotonic() + self._backoff
            kind = "timeout" if isinstance(e, redis.TimeoutError | asyncio.TimeoutError) else "connection"
            self.on_error(op, kind)
            raise StoreError(kind, f"redis {op}: {e or type(e).__name__}") from None
        except redis.RedisError as e:
            self.on_error(op, type(e).__name__)
            raise StoreError(type(e).__name__, f"redis {op}: {e}") from None
        self._backoff = 0.0
        if timeout is None:
            dt = time.perf_counter() - t0
            self._latency = dt if self._latency == 0.0 else 0.8 * self._latency + 0.2 * dt
        return out

    @property
    def deadline(self) -> float:
        """The request-path deadline in force (adaptive, see the module docstring)."""
        return min(self.timeout_max_s, max(self.timeout_s, 8.0 * self._latency))

    # ---- documents ---------------------------------------------------------------------------------------
    def key(self, category: str, doc_id: int) -> str:
        return doc_key(self.prefix, category, doc_id)

    async def put(self, doc: CacheDocument, expire_s: float) -> None:
        key = self.key(doc.category, doc.doc_id)
        fields = doc.to_fields()

        async def run() -> Any:
            async with self.client.pipeline(transaction=True) as p:
                p.hset(key, mapping=fields)
                p.pexpire(key, max(1, int(expire_s * 1000)))
                return await p.execute()

        await self._call("put", run)

    async def fetch(self, category: str, doc_id: int, touch: bool = True) -> dict[bytes, bytes] | None:
        """The raw fields of a document (None: gone), counting a hit when ``touch``."""
        key = self.key(category, doc_id)
        args = ["1" if touch else "0", repr(time.time())]
        flat = await self._call("get", lambda: self._fetch(keys=[key], args=args))
        if not flat:
            return None
        return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}

    async def delete(self, keys: list[str]) -> int:
        if not keys:
            return 0
        return int(await self._call("delete", lambda: self.client.delete(*keys)))

    async def scan_keys(self) -> list[str]:
        """Every document key under the prefix (SCAN, not KEYS)."""

        async def run() -> list[str]:
            out = []
            async for raw in self.client.scan_iter(match=f"{self.prefix}doc:*", count=1000):
                out.append(raw.decode() if isinstance(raw, bytes) else raw)
            return out

        return await self._call("scan", run, self.bulk_timeout_s)

    async def fetch_many(self, keys: list[str], batch: int = 200) -> AsyncIterator[tuple[str, dict[bytes, bytes]]]:
        """``(key, fields)`` for each key still present, fetched in pipelined batches."""
        for i in range(0, len(keys), batch):
            part = keys[i : i + batch]

            async def run(part: list[str] = part) -> list[Any]:
                async with self.client.pipeline(transaction=False) as p:
                    for k in part:
                        p.hgetall(k)
                    return await p.execute()

            for k, fields in zip(part, await self._call("scan", run, self.bulk_timeout_s), strict=True):
                if fields:
                    yield k, fields

    def parse_key(self, key: str) -> tuple[str, int] | None:
        return parse_doc_key(self.prefix, key)

    async def ping(self) -> bool:
        try:
            return bool(await self._call("ping", self.client.ping, self.bulk_timeout_s))
        except StoreError:
            return False

    async def close(self) -> None:
        await self.client.aclose()
