"""The OpenAI-compatible proxy (aiohttp server, one pooled aiohttp client session towards the upstream).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` go through the cache; ``GET /health`` and
``GET /metrics`` are the proxy's own; every other path (``/v1/models``, ``/tokenize``, ...) is passed through,
streamed. Each answer carries ``x-kvplug-cache: hit|miss|bypass`` and, when known, ``x-kvplug-category``,
``x-kvplug-similarity`` and ``x-kvplug-cache-reason`` (why a request bypassed the cache).

Failure rules: Redis down or slow means pass-through (counted, never an error to the client); an upstream error is
passed through unchanged (status code and body) and never cached, unless the cache holds a hit for the request
(a hit is served whenever the upstream fails: refused, timed out, 5xx or 429); only a refused or timed-out
upstream connection gets the proxy's own 502/504 in OpenAI's error format (which never names the upstream).
Hostile input: a body over ``max_request_bytes`` gets 413; one over ``max_parse_bytes``, one that is not JSON (or
nested too deeply to parse) and one the proxy fails to analyse for any reason are forwarded unchanged (bypass);
the proxy never answers 500 itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kvplug.errors import StoreError
from kvplug.redact import redact
from kvplug.semantic.adaptive import LoadController, parse_waiting
from kvplug.semantic.cache import Lookup, SemanticCache
from kvplug.semantic.config import SemanticCacheConfig
from kvplug.semantic.embedder import AsyncEmbedder, Embedder, make_embedder
from kvplug.semantic.metrics import SemanticMetrics
from kvplug.semantic.openai_io import StreamAccumulator, cacheable_choices, hit_body, hit_events
from kvplug.semantic.policy import Policy, load_policy, with_threshold
from kvplug.semantic.scope import RequestInfo, analyze
from kvplug.semantic.store import DocStore
from kvplug.semantic.verify import Verifier

log = logging.getLogger("kvplug.semantic")

CACHE_HEADER = "x-kvplug-cache"
CATEGORY_HEADER = "x-kvplug-category"
REASON_HEADER = "x-kvplug-cache-reason"
SIMILARITY_HEADER = "x-kvplug-similarity"
_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "content-encoding",
}
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
STARTED_KEY = web.RequestKey("kvplug_response_started", bool)  # set once a streamed answer has begun


@dataclass
class Upstream:
    """An upstream answer: read in full (``body``) or, for a 200 event stream, still open (``resp``) with its
    first chunk already read (``head``): a stream counts as answered at its first event, not at its headers."""

    status: int
    headers: CIMultiDict[str]
    t0: float
    body: bytes | None = None
    resp: aiohttp.ClientResponse | None = None
    head: bytes = b""


def _error_body(status: int, kind: str, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


def _failed(up: Upstream) -> bool:
    """The upstream could not answer: refused, timed out, a server error or overloaded."""
    return up.status >= 500 or up.status == 429


class SemanticCacheProxy:
    """Build with a config (and optionally an already loaded embedder / policy / registry); ``app()`` is the
    aiohttp application. The embedder is shared, not closed: tests load MiniLM once for many proxies."""

    def __init__(
        self,
        config: SemanticCacheConfig,
        embedder: Embedder | None = None,
        policy: Policy | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.policy = with_threshold(policy or load_policy(config.policy), config.threshold)
        self._embedder = embedder
        self.metrics = SemanticMetrics(registry)
        self.load = LoadController(self.policy.adaptive)
        self.upstream = config.upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None
        self.store: DocStore | None = None
        self.cache: SemanticCache | None = None
        self._bg: list[asyncio.Task[Any]] = []
        self._probing = False

    # ---- application ---------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_request_bytes)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/chat/completions", self._completion)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_route("*", "/{tail:.*}", self._passthrough)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        cfg = self.config
        if self._embedder is None:
            loop = asyncio.get_running_loop()
            self._embedder = await loop.run_in_executor(None, make_embedder, cfg.embedder, cfg.embed_threads)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=cfg.upstream_timeout_s),
        )
        self.store = DocStore(
            cfg.redis_url,
            cfg.key_prefix,
            cfg.redis_timeout_s,
            cfg.redis_backoff_max_s,
            on_error=lambda op, kind: self.metrics.redis_errors.labels(op, kind).inc(),
            timeout_max_s=cfg.redis_timeout_max_s,
        )
        embedder = AsyncEmbedder(
            self._embedder, cfg.embed_max_batch, cache_size=cfg.embed_cache_size, cache_bytes=cfg.embed_cache_bytes
        )
        self.cache = SemanticCache(
            self.policy,
            embedder,
            self.store,
            self.metrics,
            self.load,
            candidates=cfg.candidates,
            verifier=Verifier(
                vocabulary=getattr(self._embedder, "vocabulary", None) or None, max_chars=cfg.max_query_chars
            ),
        )
        await self.cache.start()
        self.cache.update_gauges()
        if cfg.sweep_interval_s > 0:
            self._bg.append(asyncio.create_task(self._every(cfg.sweep_interval_s, self._sweep)))
        ad = self.policy.adaptive
        if ad.enabled and ad.scrape_interval_s > 0:
            self._bg.append(asyncio.create_task(self._every(ad.scrape_interval_s, self._scrape)))
        log.info(
            "semantic cache: %d entries loaded from Redis, upstream %s, policy: %s",
            self.cache.size(),
            redact(self.upstream),
            self.policy.source,
        )

    async def _cleanup(self, app: web.Application) -> None:
        for t in self._bg:
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        if self.cache is not None:
            await self.cache.drain()
            self.cache.embedder.close()
        if self.session is not None:
            await self.session.close()
        if self.store is not None:
            await self.store.close()

    @staticmethod
    async def _every(interval: float, job: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a background job must not die
                log.debug("semantic cache background job: %r", e)

    async def _sweep(self) -> None:
        assert self.cache is not None
        try:
            await self.cache.sync()
        except StoreError:
            pass  # counted by the store; tried again next interval
        self.cache.update_gauges()

    async def _probe(self) -> None:
        """Redis failed earlier: ping it off the request path; rebuild the index if it never was."""
        assert self.store is not None and self.cache is not None
        try:
            if await self.store.ping() and not self.cache.synced:
                await self._sweep()
        finally:
            self._probing = False

    async def _scrape(self) -> None:
        assert self.session is not None and self.cache is not None
        url = self.policy.adaptive.metrics_url or f"{self.upstream}/metrics"
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=2.0)) as r:
            if r.status == 200:
                waiting = parse_waiting(await r.text())
                if waiting is not None:
                    self.load.observe_queue(waiting)
        self.cache.update_gauges()

    # ---- proxy's own endpoints -------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        assert self.store is not None and self.cache is not None
        return web.json_response(
            {
                "status": "ok",
                "redis": "up" if self.store.up else "down",
                "index_synced": self.cache.synced,
                "entries": self.cache.size(),
                "load_pressure": round(self.load.pressure(), 4),
            }
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        assert self.cache is not None
        self.cache.update_gauges()
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- upstream calls ------------------------------------------------------------------------------------
    @staticmethod
    def _request_headers(request: web.Request) -> dict[str, str]:
        return {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in _HOP and not k.lower().startswith("x-kvplug-") and k.lower() != "accept-encoding"
        }

    @staticmethod
    def _response_headers(up: Upstream, tags: dict[str, str]) -> CIMultiDict[str]:
        out: CIMultiDict[str] = CIMultiDict((k, v) for k, v in up.headers.items() if k.lower() not in _HOP)
        for k, v in tags.items():
            out[k] = v
        return out

    async def _call(self, request: web.Request, data: bytes, stream: bool) -> Upstream:
        """Send the request upstream. A 200 event stream is returned open; anything else is read in full."""
        assert self.session is not None
        t0 = time.perf_counter()
        url = self.upstream + request.rel_url.path_qs
        try:
            resp = await self.session.request(
                request.method, url, data=data or None, headers=self._request_headers(request)
            )
        except asyncio.TimeoutError:
            self.metrics.upstream.labels("timeout").inc()
            hdr = CIMultiDict({"Content-Type": "application/json"})
            return Upstream(504, hdr, t0, _error_body(504, "upstream_timeout", "the upstream server timed out"))
        except aiohttp.ClientError as e:
            self.metrics.upstream.labels("connect_error").inc()
            log.debug("upstream %s unreachable: %s", redact(self.upstream), type(e).__name__)
            hdr = CIMultiDict({"Content-Type": "application/json"})
            msg = "the upstream server is unreachable"
            return Upstream(502, hdr, t0, _error_body(502, "upstream_unavailable", msg))
        self.metrics.upstream.labels(str(resp.status)).inc()
        if stream and resp.status == 200 and "text/event-stream" in resp.headers.get("Content-Type", ""):
            try:
                head = b""
                while b"data:" not in head:  # comments and keep-alives before the first event do not count
                    chunk = await resp.content.readany()
                    if not chunk:
                        break
                    head += chunk
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                resp.close()
                log.debug("upstream stream failed: %s", type(e).__name__)
                hdr = CIMultiDict({"Content-Type": "application/json"})
                msg = "the upstream stream failed"
                return Upstream(502, hdr, t0, _error_body(502, "upstream_unavailable", msg))
            except BaseException:
                resp.close()  # cancelled by a speculative hit: abort the upstream request
                raise
            return Upstream(resp.status, CIMultiDict(resp.headers), t0, resp=resp, head=head)
        try:
            body = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            log.debug("upstream read failed: %s", type(e).__name__)
            hdr = CIMultiDict({"Content-Type": "application/json"})
            msg = "reading the upstream answer failed"
            return Upstream(502, hdr, t0, _error_body(502, "upstream_unavailable", msg))
        finally:
            resp.release()
        return Upstream(resp.status, CIMultiDict(resp.headers), t0, body=body)

    async def _relay(
        self,
        request: web.Request,
        info: RequestInfo | None,
        up: Upstream,
        tags: dict[str, str],
        on_choices: Callable[[dict[str, Any]], None] | None = None,
    ) -> web.StreamResponse:
        """Answer the client with an upstream answer; hand a cacheable one to ``on_choices``."""
        if up.resp is None:
            self._observe(info, up)
            if on_choices is not None and up.status == 200 and info is not None:
                try:
                    payload = json.loads(up.body or b"")
                except (ValueError, RecursionError):
                    payload = None
                choices = cacheable_choices(info.endpoint, up.status, payload, self.config.cache_tools)
                if choices is not None:
                    on_choices({"choices": choices, "model": payload.get("model"), "usage": payload.get("usage")})
                else:
                    self.metrics.not_stored.labels("not_cacheable").inc()
            return web.Response(status=up.status, body=up.body, headers=self._response_headers(up, tags))
        # a 200 event stream: forward chunks as they come, rebuilding the answer on the side
        acc = StreamAccumulator(info.endpoint) if (on_choices is not None and info is not None) else None
        out = web.StreamResponse(status=up.status, headers=self._response_headers(up, tags))
        try:
            request[STARTED_KEY] = True
            await out.prepare(request)
            if up.head:
                if acc is not None:
                    acc.feed(up.head)
                await out.write(up.head)
            async for chunk in up.resp.content.iter_any():
                if acc is not None:
                    acc.feed(chunk)
                await out.write(chunk)
            await out.write_eof()
        except (ConnectionResetError, aiohttp.ClientError, asyncio.TimeoutError) as e:
            log.debug("stream relay ended early: %r", e)
            acc = None
            up.resp.close()  # the client left or the upstream failed: abort the upstream request
        finally:
            up.resp.release()
        self._observe(info, up)
        if acc is not None and on_choices is not None:
            choices = acc.choices()
            if choices is not None:
                on_choices({"choices": choices, "model": acc.model, "usage": acc.usage})
            else:
                self.metrics.not_stored.labels("not_cacheable").inc()
        return out

    def _observe(self, info: RequestInfo | None, up: Upstream) -> None:
        if info is None:
            return
        dt = time.perf_counter() - up.t0
        self.metrics.upstream_seconds.labels(info.endpoint).observe(dt)
        if up.status == 200:
            self.load.observe_latency(dt)

    @staticmethod
    async def _abort(task: asyncio.Task[Upstream]) -> None:
        task.cancel()
        try:
            up = await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - whatever it was, it is dropped
            return
        if up.resp is not None:
            up.resp.close()

    # ---- handlers ------------------------------------------------------------------------------------------
    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        data = await request.read()
        up = await self._call(request, data, stream=True)
        return await self._relay(request, None, up, {})

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        endpoint = ENDPOINTS[request.path]
        raw = await request.read()  # over max_request_bytes: aiohttp answers 413
        if len(raw) > self.config.max_parse_bytes:
            return await self._bypass(request, raw, None, endpoint, "too_large")
        try:
            return await self._cached_completion(request, raw, endpoint)
        except (asyncio.CancelledError, web.HTTPException):
            raise
        except Exception as e:  # noqa: BLE001 - whatever failed in the proxy, the client gets the upstream's answer
            if request.get(STARTED_KEY):
                raise  # an answer is already on its way: nothing else can be sent
            log.warning("semantic cache: request handling failed, forwarding it unchanged: %r", e)
            return await self._bypass(request, raw, None, endpoint, "proxy_error")

    async def _cached_completion(self, request: web.Request, raw: bytes, endpoint: str) -> web.StreamResponse:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse: the upstream decides
            body = None
        if not isinstance(body, dict):
            return await self._bypass(request, raw, None, endpoint, "bad_request")
        try:
            info = analyze(body, request.headers, endpoint, self.config)
            data = json.dumps(info.body).encode() if info.body_changed else raw
        except (ValueError, TypeError, RecursionError):
            return await self._bypass(request, raw, None, endpoint, "bad_request")
        if info.bypass:
            return await self._bypass(request, data, info, endpoint, info.bypass)
        if len(info.query) > self.config.max_query_chars:
            return await self._bypass(request, data, info, endpoint, "too_long")
        assert self.cache is not None and self.store is not None
        if not self.cache.synced or not self.store.up:
            # Redis failed (or was down at start-up): pass through without embedding, and probe it in the
            # background once the breaker's back-off has passed
            if self.store.available and not self._probing:
                self._probing = True
                self.cache.spawn(self._probe())
            return await self._bypass(request, data, info, endpoint, "redis_unavailable")
        mode = self.config.speculative
        if mode == "on" or (mode == "auto" and self.load.pressure() == 0.0):
            return await self._speculative(request, data, info)
        lk = await self._lookup(info)
        if lk.status == "hit":
            return await self._serve_hit(request, info, lk)
        if lk.status == "bypass":
            return await self._bypass(request, data, info, endpoint, lk.reason, lk)
        self.metrics.misses.labels(lk.category).inc()
        self.metrics.requests.labels(endpoint, "miss").inc()
        up = await self._call(request, data, info.stream)
        return await self._relay(request, info, up, self._tags("miss", lk), self._inserter(info, lk))

    async def _lookup(self, info: RequestInfo) -> Lookup:
        assert self.cache is not None
        try:
            return await self.cache.lookup(info)
        except StoreError:
            return Lookup("bypass", reason="redis_unavailable")
        except Exception as e:  # noqa: BLE001 - an embedder failure must not fail the request
            log.warning("semantic cache lookup failed: %r", e)
            return Lookup("bypass", reason="lookup_error")

    def _inserter(self, info: RequestInfo, lk: Lookup) -> Callable[[dict[str, Any]], None]:
        def insert(response: dict[str, Any]) -> None:
            assert self.cache is not None
            self.cache.spawn(self.cache.insert(info, lk, response))

        return insert

    @staticmethod
    def _tags(status: str, lk: Lookup | None = None, reason: str = "") -> dict[str, str]:
        tags = {CACHE_HEADER: status}
        if lk is not None and lk.category:
            tags[CATEGORY_HEADER] = lk.category
        if lk is not None and lk.similarity >= 0:
            tags[SIMILARITY_HEADER] = f"{lk.similarity:.4f}"
        if reason:
            tags[REASON_HEADER] = reason
        return tags

    async def _bypass(
        self,
        request: web.Request,
        data: bytes,
        info: RequestInfo | None,
        endpoint: str,
        reason: str,
        lk: Lookup | None = None,
    ) -> web.StreamResponse:
        self.metrics.bypass.labels(reason).inc()
        self.metrics.requests.labels(endpoint, "bypass").inc()
        stream = info.stream if info is not None else False
        up = await self._call(request, data, stream)
        return await self._relay(request, info, up, self._tags("bypass", lk, reason))

    async def _serve_hit(self, request: web.Request, info: RequestInfo, lk: Lookup) -> web.StreamResponse:
        doc = lk.doc
        assert doc is not None
        self.metrics.hits.labels(lk.category).inc()
        self.metrics.requests.labels(info.endpoint, "hit").inc()
        usage = doc.response.get("usage") or {}
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.metrics.saved_tokens.labels(lk.category).inc(usage["completion_tokens"])
        model = doc.response.get("model") or info.model
        choices = doc.response["choices"]
        tags = self._tags("hit", lk)
        if not info.stream:
            return web.json_response(hit_body(info.endpoint, choices, model), headers=tags)
        out = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **tags}
        )
        try:
            request[STARTED_KEY] = True
            await out.prepare(request)
            for event in hit_events(info.endpoint, choices, model, info.include_usage):
                await out.write(event)
            await out.write_eof()
        except ConnectionResetError:
            log.debug("client left during a streamed hit")
        return out

    async def _speculative(self, request: web.Request, data: bytes, info: RequestInfo) -> web.StreamResponse:
        """Forward at once and look up meanwhile: a hit that arrives before the upstream's answer wins (and the
        upstream request is cancelled); otherwise the upstream answer is relayed and stored if the lookup missed."""
        lookup_task = asyncio.create_task(self._lookup(info))
        up_task = asyncio.create_task(self._call(request, data, info.stream))
        done, _ = await asyncio.wait({lookup_task, up_task}, return_when=asyncio.FIRST_COMPLETED)
        if lookup_task in done:
            lk = lookup_task.result()
            if lk.status == "hit":
                self.metrics.speculative.labels("cache_won").inc()
                await self._abort(up_task)
                return await self._serve_hit(request, info, lk)
            up = await up_task
            if lk.status == "bypass":
                self.metrics.bypass.labels(lk.reason).inc()
                self.metrics.requests.labels(info.endpoint, "bypass").inc()
                return await self._relay(request, info, up, self._tags("bypass", lk, lk.reason))
            self.metrics.speculative.labels("lookup_miss").inc()
            self.metrics.misses.labels(lk.category).inc()
            self.metrics.requests.labels(info.endpoint, "miss").inc()
            return await self._relay(request, info, up, self._tags("miss", lk), self._inserter(info, lk))
        up = up_task.result()
        if _failed(up):
            # the upstream failed first: a hit is still served (and the failure relayed only on a miss)
            lk = await lookup_task
            if lk.status == "hit":
                self.metrics.speculative.labels("cache_won_upstream_failed").inc()
                return await self._serve_hit(request, info, lk)
            outcome = "bypass" if lk.status == "bypass" else "miss"
            if outcome == "miss":
                self.metrics.misses.labels(lk.category).inc()
            else:
                self.metrics.bypass.labels(lk.reason).inc()
            self.metrics.requests.labels(info.endpoint, outcome).inc()
            return await self._relay(request, info, up, self._tags(outcome, lk, lk.reason))
        if up.resp is not None and self.config.speculative_grace_s > 0:
            # a stream's first event came first: a hit found within the grace still saves the rest of the generation
            done, _ = await asyncio.wait({lookup_task}, timeout=self.config.speculative_grace_s)
            if done and lookup_task.result().status == "hit":
                self.metrics.speculative.labels("cache_won_late").inc()
                up.resp.close()
                return await self._serve_hit(request, info, lookup_task.result())
        # the upstream answered first: relay it now; the lookup's outcome decides later whether to store it
        self.metrics.speculative.labels("upstream_won").inc()
        self.metrics.requests.labels(info.endpoint, "miss").inc()
        answer: dict[str, Any] = {}
        out = await self._relay(request, info, up, self._tags("miss"), answer.update)
        assert self.cache is not None
        self.cache.spawn(self._after_race(info, lookup_task, answer or None))
        return out

    async def _after_race(self, info: RequestInfo, lookup_task: asyncio.Task[Lookup], answer: dict | None) -> None:
        """Count the lookup the upstream outran, and store the answer if it was a miss."""
        assert self.cache is not None
        lk = await lookup_task
        if lk.status == "miss":
            self.metrics.misses.labels(lk.category).inc()
            if answer:
                await self.cache.insert(info, lk, answer)
        elif lk.status == "hit":
            self.metrics.speculative.labels("upstream_won_over_hit").inc()


PROXY_KEY: web.AppKey[SemanticCacheProxy] = web.AppKey("proxy", SemanticCacheProxy)


def build_app(
    config: SemanticCacheConfig,
    embedder: Embedder | None = None,
    policy: Policy | None = None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """The aiohttp application of a proxy; the :class:`SemanticCacheProxy` is at ``app["proxy"]``."""
    proxy = SemanticCacheProxy(config, embedder, policy, registry)
    app = proxy.app()
    app[PROXY_KEY] = proxy
    return app


def serve(config: SemanticCacheConfig) -> None:
    """Run the proxy until interrupted (what ``kvplug semantic-cache serve`` calls)."""
    policy = load_policy(config.policy)  # a bad policy fails here, before any socket is opened
    web.run_app(build_app(config, policy=policy), host=config.host, port=config.port, access_log=None)
