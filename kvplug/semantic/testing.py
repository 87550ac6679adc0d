"""Test and benchmark helpers: a tiny OpenAI-compatible upstream, a thread that runs aiohttp apps, one shared
embedder per process, and small blocking HTTP/SSE helpers.

:class:`FakeUpstream` counts calls, records the bodies and headers it got, answers deterministically
(``answer_for``), can be slow (``delay_s``; ``first_event_delay_s`` for streams), can fail on purpose
(``errors``: a substring of the query -> (status, body)), can finish otherwise than ``stop`` (``finish_reason``)
and exposes ``vllm:num_requests_waiting`` on ``/metrics`` (``waiting``) like vLLM does.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from kvplug.semantic.embedder import Embedder, make_embedder
from kvplug.testing import free_port


@functools.cache
def shared_embedder(spec: str = "minilm") -> Embedder:
    """One embedder per process (tests load MiniLM once and share it between proxies)."""
    return make_embedder(spec)


def http_request(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    """A blocking HTTP call: (status, lower-cased headers, body); HTTP errors are returned, not raised."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def parse_sse(raw: bytes) -> list[Any]:
    """The ``data:`` payloads of an SSE body (JSON objects, and the string ``[DONE]``); comments skipped."""
    out: list[Any] = []
    for ev in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in ev.splitlines():
            if line.startswith(b"data: "):
                data = line[6:]
                out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
            elif line and not line.startswith(b":"):
                raise ValueError(f"not an SSE line: {line!r}")
    return out


def default_answer(query: str) -> str:
    return f"answer-{hashlib.sha256(query.encode()).hexdigest()[:12]}"


class FakeUpstream:
    def __init__(
        self,
        delay_s: float = 0.0,
        answer_for: Callable[[str], str] = default_answer,
        model: str = "fake-model",
    ) -> None:
        self.delay_s = delay_s
        self.answer_for = answer_for
        self.model = model
        self.calls = 0
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.errors: dict[str, tuple[int, bytes]] = {}
        self.waiting: float | None = None
        self.finish_reason = "stop"
        self.first_event_delay_s = 0.0  # streams: headers at once, the first event after this delay
        self.sizes: list[int] = []  # body size of every request received
        self.keep_bodies_up_to = 1 << 20  # larger bodies are recorded without their messages/prompt

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)  # vLLM takes large prompts too
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _metrics(self, request: web.Request) -> web.Response:
        lines = ["# TYPE vllm:num_requests_waiting gauge"]
        if self.waiting is not None:
            lines.append(f'vllm:num_requests_waiting{{model_name="{self.model}"}} {self.waiting}')
        return web.Response(text="\n".join(lines) + "\n")

    async def _common(self, request: web.Request) -> tuple[dict[str, Any], str, web.Response | None]:
        self.calls += 1
        raw = await request.read()
        self.sizes.append(len(raw))
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # as vLLM does: a 400, never a 500
            err = b'{"error": {"message": "invalid JSON body", "type": "BadRequestError", "code": 400}}'
            return {}, "", web.Response(status=400, body=err, content_type="application/json")
        if not isinstance(body, dict):
            return {}, "", web.Response(status=400, body=b'{"error": {"message": "not an object"}}')
        big = len(raw) > self.keep_bodies_up_to
        self.bodies.append({k: v for k, v in body.items() if k not in ("messages", "prompt")} if big else body)
        self.headers.append(dict(request.headers))
        msgs = body.get("messages")
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict):
            query = str(msgs[-1].get("content", ""))
        else:
            query = str(body.get("prompt", ""))
        del raw
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        for needle, (status, err) in self.errors.items():
            if needle in query:
                return body, query, web.Response(status=status, body=err, content_type="application/json")
        return body, query, None

    async def _stream(self, request: web.Request, chunks: list[dict[str, Any]]) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        if self.first_event_delay_s:
            await out.write(b": waiting\n\n")  # headers (and an SSE comment) go out at once, as vLLM's do
            await asyncio.sleep(self.first_event_delay_s)
        for c in chunks:
            await out.write(b"data: " + json.dumps(c).encode() + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, query, err = await self._common(request)
        if err is not None:
            return err
        text = self.answer_for(query)
        base = {"id": f"chatcmpl-up{self.calls}", "created": int(time.time()), "model": body.get("model", self.model)}
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        if body.get("stream"):
            half = len(text) // 2
            mk = lambda delta, fin=None: {  # noqa: E731
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": fin}],
            }
            chunks = [
                mk({"role": "assistant", "content": ""}),
                mk({"content": text[:half]}),
                mk({"content": text[half:]}),
            ]
            chunks.append(mk({}, self.finish_reason))
            return await self._stream(request, chunks)
        return web.json_response(
            {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "tool_calls": []},
                        "logprobs": None,
                        "finish_reason": self.finish_reason,
                    }
                ],
                "usage": usage,
            }
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body, query, err = await self._common(request)
        if err is not None:
            return err
        text = self.answer_for(query)
        base = {"id": f"cmpl-up{self.calls}", "created": int(time.time()), "model": body.get("model", self.model)}
        if body.get("stream"):
            mk = lambda t, fin=None: {  # noqa: E731
                **base,
                "object": "text_completion",
                "choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": fin}],
            }
            return await self._stream(request, [mk(text), mk("", self.finish_reason)])
        return web.json_response(
            {
                **base,
                "object": "text_completion",
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish_reason}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )


class AppThread:
    """An event loop on a daemon thread serving aiohttp apps on loopback ports (sync tests, benchmarks)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvplug-apps", daemon=True)
        self._thread.start()
        self._runners: dict[int, web.AppRunner] = {}

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, app: web.Application, port: int | None = None) -> str:
        """Serve ``app`` (start-up hooks run here); returns its base URL."""
        port = port or free_port()

        async def run() -> web.AppRunner:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            return runner

        self._runners[port] = self.call(run(), timeout=120.0)
        return f"http://127.0.0.1:{port}"

    def stop(self, url: str) -> None:
        """Stop one app (its clean-up hooks run)."""
        runner = self._runners.pop(int(url.rsplit(":", 1)[1]))
        self.call(runner.cleanup())

    def close(self) -> None:
        for port in list(self._runners):
            self.stop(f"http://127.0.0.1:{port}")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
