"""The semantic-cache proxy end to end: real Redis (private servers), the real MiniLM embedder and a real HTTP
upstream (the tiny OpenAI server of kvplug.semantic.testing: counts calls, deterministic answers, optionally slow).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from kvplug.semantic.config import SemanticCacheConfig
from kvplug.semantic.policy import parse_policy
from kvplug.semantic.proxy import PROXY_KEY, SemanticCacheProxy, build_app
from kvplug.semantic.testing import (
    AppThread,
    FakeUpstream,
    default_answer,
    http_request,
    parse_sse,
    shared_embedder,
)

PYLIST = "How do I reverse a list in Python?"
PYLIST_PARA = "How can I reverse a Python list?"
PYSTRING = "How do I reverse a string in Python?"
CAPITAL = "What is the capital of France?"
CAPITAL_PARA = "Which city is the capital of France?"


@pytest.fixture(scope="session")
def minilm():
    return shared_embedder("minilm")


@pytest.fixture(scope="session")
def apps() -> Iterator[AppThread]:
    th = AppThread()
    yield th
    th.close()


http = http_request
sse = parse_sse


@dataclass
class Proxy:
    url: str
    proxy: SemanticCacheProxy
    upstream: FakeUpstream
    apps: AppThread
    redis_url: str
    stopped: bool = False
    last: dict[str, str] = field(default_factory=dict)

    def chat(
        self,
        content: str,
        headers: dict[str, str] | None = None,
        messages: list[dict[str, Any]] | None = None,
        **kw: Any,
    ) -> tuple[int, dict[str, str], Any]:
        body = {"model": "m", "messages": [*(messages or []), {"role": "user", "content": content}], "temperature": 0}
        body.update(kw)
        status, hdrs, raw = http("POST", self.url + "/v1/chat/completions", body, headers)
        self.drain()
        self.last = hdrs
        if body.get("stream") and status == 200:
            return status, hdrs, sse(raw)
        return status, hdrs, json.loads(raw) if raw else None

    def answer(self, content: str, **kw: Any) -> tuple[str, str]:
        """(x-kvplug-cache, answer text) of a chat request."""
        status, hdrs, out = self.chat(content, **kw)
        assert status == 200, out
        return hdrs["x-kvplug-cache"], out["choices"][0]["message"]["content"]

    def drain(self) -> None:
        self.apps.call(self.proxy.cache.drain())

    def metric(self, name: str, **labels: str) -> float:
        _, _, raw = http("GET", self.url + "/metrics")
        total = 0.0
        for fam in text_string_to_metric_families(raw.decode()):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def docs(self) -> list[bytes]:
        return redis.Redis.from_url(self.redis_url).keys(self.proxy.config.key_prefix + "doc:*")

    def stop(self) -> None:
        if not self.stopped:
            self.apps.stop(self.url)
            self.stopped = True


def policy_with(**categories: dict[str, Any]) -> dict[str, Any]:
    """A policy for tests: the built-in classifier examples, no adaptive scraping, given category overrides."""
    from kvplug.semantic.policy import DEFAULT_POLICY

    pol = json.loads(json.dumps(DEFAULT_POLICY))
    pol["adaptive"] = {"enabled": False, "scrape_interval_s": 0}
    for name, over in categories.items():
        pol["categories"].setdefault(name, {}).update(over)
    return pol


@pytest.fixture
def make_proxy(apps, minilm, redis_server) -> Iterator[Any]:
    made: list[Proxy] = []
    upstreams: dict[int, str] = {}
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()

    def make(
        policy: dict[str, Any] | None = None,
        upstream: FakeUpstream | None = None,
        redis_url: str | None = None,
        **cfg: Any,
    ) -> Proxy:
        up = upstream or FakeUpstream()
        if id(up) not in upstreams:
            upstreams[id(up)] = apps.start(up.app())
        settings = {"speculative": "off", "sweep_interval_s": 0, "key_prefix": "t:sc:", **cfg}
        config = SemanticCacheConfig(upstream=upstreams[id(up)], redis_url=redis_url or redis_server.url, **settings)
        app = build_app(config, embedder=minilm, policy=parse_policy(policy or policy_with(), "test policy"))
        url = apps.start(app)
        p = Proxy(url, app[PROXY_KEY], up, apps, config.redis_url)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()
    for url in upstreams.values():
        apps.stop(url)
    client.flushdb()
    client.close()


# ---- hits and misses --------------------------------------------------------------------------------------------


def test_paraphrase_hits_and_a_different_question_misses(make_proxy):
    p = make_proxy()
    assert p.answer(PYLIST) == ("miss", default_answer(PYLIST))
    assert p.last["x-kvplug-category"] == "code"
    assert p.upstream.calls == 1 and len(p.docs()) == 1
    status, hdrs, out = p.chat(PYLIST_PARA)
    assert hdrs["x-kvplug-cache"] == "hit" and float(hdrs["x-kvplug-similarity"]) >= 0.9
    assert out["choices"][0]["message"]["content"] == default_answer(PYLIST)  # the stored answer, not a new one
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-kvplug-")
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["total_tokens"] == 0
    assert p.upstream.calls == 1
    # same template, another object: a near-miss (similarity ~0.83) that must not hit in the strict code category
    assert p.answer(PYSTRING) == ("miss", default_answer(PYSTRING))
    assert p.upstream.calls == 2
    assert p.answer(CAPITAL) == ("miss", default_answer(CAPITAL))
    assert p.last["x-kvplug-category"] == "factual"
    assert p.answer(CAPITAL_PARA) == ("hit", default_answer(CAPITAL))
    assert p.upstream.calls == 3
    assert p.metric("kvplug_semantic_hits_total", category="code") == 1
    assert p.metric("kvplug_semantic_hits_total", category="factual") == 1
    assert p.metric("kvplug_semantic_misses_total") == 3
    assert p.metric("kvplug_semantic_inserts_total") == 3
    assert p.metric("kvplug_semantic_saved_completion_tokens_total", category="code") == 5
    assert p.metric("kvplug_semantic_entries", category="code") == 2


def test_completions_endpoint_hits_on_paraphrase(make_proxy):
    p = make_proxy()
    url = p.url + "/v1/completions"
    body = {"model": "m", "prompt": CAPITAL, "temperature": 0, "max_tokens": 8}
    status, hdrs, raw = http("POST", url, body)
    p.drain()
    assert status == 200 and hdrs["x-kvplug-cache"] == "miss"
    status, hdrs, raw = http("POST", url, {**body, "prompt": CAPITAL_PARA})
    out = json.loads(raw)
    assert hdrs["x-kvplug-cache"] == "hit" and out["object"] == "text_completion"
    assert out["choices"][0]["text"] == default_answer(CAPITAL) and p.upstream.calls == 1
    # the chat endpoint is another scope: the same question there misses
    assert p.answer(CAPITAL_PARA)[0] == "miss"
    # and so does the same prompt with other generation parameters
    status, hdrs, raw = http("POST", url, {**body, "prompt": CAPITAL_PARA, "max_tokens": 9})
    assert hdrs["x-kvplug-cache"] == "miss"


def test_category_thresholds_decide_for_the_same_pair(make_proxy, minilm):
    # two structurally identical paraphrase pairs routed to two categories by keyword rules
    py = ("How do I remove duplicates from a list in Python?", "What is the way to deduplicate a Python list?")
    js = (
        "How do I remove duplicates from an array in JavaScript?",
        "What is the way to deduplicate a JavaScript array?",
    )
    sims = [float(minilm.embed([a])[0] @ minilm.embed([b])[0]) for a, b in (py, js)]
    assert all(0.75 < s < 0.97 for s in sims), sims  # both pairs sit between the two thresholds

    def policy(py_thr: float, js_thr: float) -> dict[str, Any]:
        return {
            "adaptive": {"enabled": False, "scrape_interval_s": 0},
            "categories": {
                "pycat": {"threshold": py_thr, "patterns": ["python"]},
                "jscat": {"threshold": js_thr, "patterns": ["javascript"]},
            },
        }

    for py_thr, js_thr in ((0.98, 0.7), (0.7, 0.98)):
        p = make_proxy(policy(py_thr, js_thr), key_prefix=f"t:{py_thr}:")
        for (first, second), cat, thr in ((py, "pycat", py_thr), (js, "jscat", js_thr)):
            assert p.answer(first)[0] == "miss" and p.last["x-kvplug-category"] == cat
            outcome, text = p.answer(second)
            assert outcome == ("hit" if thr < 0.9 else "miss"), (cat, thr, p.last)
            assert text == default_answer(first if outcome == "hit" else second)
        assert p.metric("kvplug_semantic_effective_threshold", category="pycat") == pytest.approx(py_thr)
        p.stop()


# ---- TTL, quota, restart ------------------------------------------------------------------------------------------


def test_ttl_expiry(make_proxy):
    p = make_proxy(policy_with(code={"ttl": 1.0, "max_ttl": None}))
    assert p.answer(PYLIST)[0] == "miss"
    assert p.answer(PYLIST_PARA)[0] == "hit"
    key = p.docs()[0]
    pttl = redis.Redis.from_url(p.redis_url).pttl(key)
    assert 0 < pttl <= 1000  # Redis expires it with the category TTL
    time.sleep(1.3)
    assert p.docs() == []
    assert p.answer(PYLIST_PARA) == ("miss", default_answer(PYLIST_PARA))
    assert p.upstream.calls == 2
    assert p.metric("kvplug_semantic_evictions_total", category="code", reason="missing") == 1
    # the fresh answer is cached again
    assert p.answer(PYLIST) == ("hit", default_answer(PYLIST_PARA))


def test_ttl_is_checked_on_hit_even_before_redis_expires(make_proxy):
    pol = policy_with(code={"ttl": 1.0, "max_ttl": 60})
    pol["adaptive"] = {"enabled": True, "latency_low_s": 100, "latency_high_s": 200, "scrape_interval_s": 0}
    p = make_proxy(pol)
    assert p.answer(PYLIST)[0] == "miss"
    assert redis.Redis.from_url(p.redis_url).pttl(p.docs()[0]) > 50_000  # kept up to max_ttl for loaded times
    time.sleep(1.2)
    assert p.answer(PYLIST_PARA)[0] == "miss"  # older than the TTL in force (no load): not served
    assert p.metric("kvplug_semantic_evictions_total", category="code", reason="expired") == 1


@pytest.mark.parametrize("eviction", ["fifo", "lru"])
def test_quota_eviction(make_proxy, eviction):
    p = make_proxy(policy_with(factual={"max_entries": 2, "eviction": eviction}))
    qa = [
        ("What is the capital of France?", "Which city is the capital of France?"),
        ("Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?"),
        ("How tall is Mount Everest?", "What is the height of Mount Everest?"),
    ]
    assert p.answer(qa[0][0])[0] == "miss"
    assert p.answer(qa[1][0])[0] == "miss"
    assert p.answer(qa[0][1])[0] == "hit"  # entry 0 used: lru keeps it, fifo does not care
    assert p.answer(qa[2][0])[0] == "miss"  # third entry: one must go
    assert len(p.docs()) == 2 and p.metric("kvplug_semantic_entries", category="factual") == 2
    assert p.metric("kvplug_semantic_evictions_total", category="factual", reason="quota") == 1
    evicted, kept = (0, 1) if eviction == "fifo" else (1, 0)
    calls = p.upstream.calls
    assert p.answer(qa[kept][1])[0] == "hit"
    assert p.answer(qa[2][1])[0] == "hit"
    assert p.upstream.calls == calls
    assert p.answer(qa[evicted][1])[0] == "miss"


def test_byte_quota(make_proxy):
    p = make_proxy(policy_with(factual={"max_bytes": 3000}))  # one document is ~1.9 kB (mostly the embedding)
    assert p.answer(CAPITAL)[0] == "miss"
    assert p.answer("Who wrote Pride and Prejudice?")[0] == "miss"
    assert len(p.docs()) == 1 and p.answer(CAPITAL_PARA)[0] == "miss"
    tiny = make_proxy(policy_with(factual={"max_bytes": 100}), key_prefix="t:tiny:")
    assert tiny.answer(CAPITAL)[0] == "miss" and tiny.docs() == []
    assert tiny.metric("kvplug_semantic_not_stored_total", reason="too_large") == 1


def test_restart_rebuilds_the_index_from_redis(make_proxy):
    up = FakeUpstream()
    first = make_proxy(upstream=up)
    for q in (PYLIST, CAPITAL, "Tell me a joke about cats."):
        assert first.answer(q)[0] == "miss"
    first.stop()
    # corrupt one stored document: the new proxy must refuse (and delete) it, not serve it
    r = redis.Redis.from_url(first.redis_url)
    capital_key = next(k for k in first.docs() if b":factual:" in k)
    emb = bytearray(r.hget(capital_key, "emb"))
    emb[50] ^= 0xFF
    r.hset(capital_key, "emb", bytes(emb))
    second = make_proxy(upstream=up)
    _, _, health = http("GET", second.url + "/health")
    assert json.loads(health)["entries"] == 2 and json.loads(health)["index_synced"] is True
    assert second.metric("kvplug_semantic_payload_errors_total", kind="checksum") == 1
    assert not r.exists(capital_key)
    calls = up.calls
    assert second.answer(PYLIST_PARA) == ("hit", default_answer(PYLIST))
    assert second.answer("Do you know a funny joke about cats?")[0] == "hit"
    assert up.calls == calls
    assert second.answer(CAPITAL_PARA)[0] == "miss"
    # another key prefix is another cache
    other = make_proxy(upstream=up, key_prefix="t:other:")
    assert other.answer(PYLIST_PARA)[0] == "miss"


def test_deleted_documents_leave_the_index(make_proxy):
    p = make_proxy()
    p.answer(PYLIST)
    p.answer(CAPITAL)
    r = redis.Redis.from_url(p.redis_url)
    for k in p.docs():
        r.delete(k)
    # on a hit: the document is gone, the label is dropped, the request is a miss
    assert p.answer(PYLIST_PARA)[0] == "miss"
    assert p.metric("kvplug_semantic_evictions_total", reason="missing") == 1
    # the sweep drops the others
    assert p.metric("kvplug_semantic_entries", category="factual") == 1
    p.apps.call(p.proxy.cache.sync())
    assert p.metric("kvplug_semantic_entries", category="factual") == 0
    # and picks up documents written by another proxy sharing the Redis
    peer = make_proxy(upstream=p.upstream)
    peer.answer(CAPITAL)
    p.apps.call(p.proxy.cache.sync())
    assert p.answer(CAPITAL_PARA)[0] == "hit"


# ---- Redis outages ------------------------------------------------------------------------------------------------


def test_redis_down_means_pass_through(make_proxy, own_redis):
    p = make_proxy(redis_url=own_redis.url, redis_backoff_max_s=0.2)
    assert p.answer(PYLIST)[0] == "miss"
    own_redis.stop()
    for q in (PYLIST_PARA, CAPITAL, CAPITAL_PARA):
        status, hdrs, out = p.chat(q)
        assert status == 200 and hdrs["x-kvplug-cache"] == "bypass", out
        assert hdrs["x-kvplug-cache-reason"] == "redis_unavailable"
        assert out["choices"][0]["message"]["content"] == default_answer(q)
    assert p.metric("kvplug_semantic_bypass_total", reason="redis_unavailable") >= 2
    assert p.metric("kvplug_semantic_redis_errors_total") >= 1
    assert p.metric("kvplug_semantic_redis_up") == 0
    _, _, health = http("GET", p.url + "/health")
    assert json.loads(health)["redis"] == "down"
    # Redis back (empty): the proxy recovers by itself and caches again
    own_redis.start()
    time.sleep(0.3)
    deadline = time.monotonic() + 10
    while p.answer(CAPITAL)[0] == "bypass":
        assert time.monotonic() < deadline, "the proxy did not use Redis again"
        time.sleep(0.2)
    assert p.answer(CAPITAL_PARA)[0] == "hit"
    # the old entry's document was lost with the restart: its label is dropped on the way
    assert p.answer(PYLIST_PARA)[0] == "miss"


def test_hung_redis_times_out_into_pass_through(make_proxy, own_redis):
    p = make_proxy(redis_url=own_redis.url, redis_timeout_s=0.2, redis_backoff_max_s=0.5)
    assert p.answer(PYLIST)[0] == "miss"
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        status, hdrs, out = p.chat(PYLIST_PARA)
        assert status == 200 and hdrs["x-kvplug-cache"] == "bypass"
        assert time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        status, hdrs, out = p.chat(CAPITAL)
        assert hdrs["x-kvplug-cache"] == "bypass"  # Redis failed: no lookup until a probe answers
        assert out["choices"][0]["message"]["content"] == default_answer(CAPITAL)
        assert time.monotonic() - t0 < 1.0
        assert p.metric("kvplug_semantic_redis_errors_total", kind="timeout") >= 1
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)


def test_redis_down_at_start_up(make_proxy, own_redis):
    url = own_redis.url
    own_redis.stop()
    p = make_proxy(redis_url=url, redis_backoff_max_s=0.2)
    assert p.chat(PYLIST)[1]["x-kvplug-cache-reason"] == "redis_unavailable"
    own_redis.start()
    deadline = time.monotonic() + 10
    while p.answer(PYLIST)[0] == "bypass":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert p.answer(PYLIST_PARA)[0] == "hit"


# ---- scope and safety ---------------------------------------------------------------------------------------------


def test_tenants_never_share_entries(make_proxy):
    p = make_proxy()
    a, b = {"x-kvplug-tenant": "acme"}, {"x-kvplug-tenant": "globex"}
    assert p.answer(PYLIST, headers=a)[0] == "miss"
    assert p.answer(PYLIST_PARA, headers=b)[0] == "miss"
    assert p.answer(PYLIST_PARA)[0] == "miss"  # no tenant is a tenant of its own
    assert p.answer(PYLIST_PARA, headers=a) == ("hit", default_answer(PYLIST))
    assert p.answer(PYLIST, headers=b) == ("hit", default_answer(PYLIST_PARA))
    assert p.upstream.calls == 3
    # API keys separate too, and the tenant header is not forwarded upstream
    k1, k2 = {"Authorization": "Bearer key-1"}, {"Authorization": "Bearer key-2"}
    assert p.answer(CAPITAL, headers=k1)[0] == "miss"
    assert p.answer(CAPITAL_PARA, headers=k2)[0] == "miss"
    assert p.answer(CAPITAL_PARA, headers=k1)[0] == "hit"
    assert p.upstream.headers[-1]["Authorization"] == "Bearer key-2"
    assert not any(k.lower().startswith("x-kvplug") for h in p.upstream.headers for k in h)
    # the stored scope is checked again on every hit: a forged index entry cannot cross tenants
    r = redis.Redis.from_url(p.redis_url)
    assert all(len(json.loads(r.hget(k, "meta"))["scope"]) == 64 for k in p.docs())


def test_model_system_prompt_and_history_scope_entries(make_proxy):
    p = make_proxy()
    sys_a = [{"role": "system", "content": "You are a terse assistant."}]
    sys_b = [{"role": "system", "content": "Answer like a pirate."}]
    assert p.answer(PYLIST, messages=sys_a)[0] == "miss"
    assert p.answer(PYLIST_PARA, messages=sys_b)[0] == "miss"
    assert p.answer(PYLIST_PARA)[0] == "miss"
    assert p.answer(PYLIST_PARA, model="other-model")[0] == "miss"
    assert p.answer(PYLIST_PARA, messages=sys_a)[0] == "hit"
    # multi-turn: the last user message is embedded, the earlier turns scope the entry
    conv_1 = [{"role": "user", "content": "I am learning Rust."}, {"role": "assistant", "content": "Great."}]
    conv_2 = [{"role": "user", "content": "I am learning Go."}, {"role": "assistant", "content": "Great."}]
    assert p.answer("How do I read a file?", messages=conv_1)[0] == "miss"
    assert p.answer("How do I read a file?", messages=conv_2)[0] == "miss"
    assert p.answer("How can I read a file?", messages=conv_1)[0] == "hit"
    assert p.answer("How do I read a file?")[0] == "miss"


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"temperature": 0.7}, "temperature"),
        ({"temperature": None}, "temperature"),  # absent: the OpenAI default 1.0
        ({"cache": False}, "client_opt_out"),
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_bypass_rules_forward_and_store_nothing(make_proxy, extra, reason):
    p = make_proxy()
    for q in (PYLIST, PYLIST):  # even the exact same request
        body = {"model": "m", "messages": [{"role": "user", "content": q}], "temperature": 0, **extra}
        if body["temperature"] is None:
            del body["temperature"]
        status, hdrs, raw = http("POST", p.url + "/v1/chat/completions", body)
        p.drain()
        assert status == 200 and hdrs["x-kvplug-cache"] == "bypass" and hdrs["x-kvplug-cache-reason"] == reason
    assert p.upstream.calls == 2 and p.docs() == []
    assert "cache" not in p.upstream.bodies[-1]  # the proxy's own field never reaches the upstream
    assert p.metric("kvplug_semantic_bypass_total", reason=reason) == 2


def test_cache_true_is_stripped_and_cached(make_proxy):
    p = make_proxy()
    assert p.answer(PYLIST, cache=True)[0] == "miss"
    assert "cache" not in p.upstream.bodies[-1] and p.upstream.bodies[-1]["messages"][0]["content"] == PYLIST
    assert p.answer(PYLIST_PARA)[0] == "hit"


def test_only_successful_answers_are_cached(make_proxy):
    up = FakeUpstream()
    up.errors["BAD-REQUEST"] = (400, b'{"error": {"message": "nope", "type": "BadRequestError", "code": 400}}')
    up.errors["SERVER-ERROR"] = (500, b'{"error": {"message": "boom"}}')
    p = make_proxy(upstream=up)
    for needle, code in (("BAD-REQUEST", 400), ("SERVER-ERROR", 500)):
        for _ in range(2):
            status, hdrs, out = p.chat(f"{PYLIST} {needle}")
            assert status == code and hdrs["x-kvplug-cache"] == "miss"
            assert json.dumps(out).encode() == json.dumps(json.loads(up.errors[needle][1])).encode()
    assert p.docs() == [] and up.calls == 4
    up.finish_reason = "content_filter"
    assert p.answer(CAPITAL)[0] == "miss" and p.docs() == []
    assert p.metric("kvplug_semantic_not_stored_total", reason="not_cacheable") >= 1
    up.finish_reason = "length"
    assert p.answer(CAPITAL)[0] == "miss" and len(p.docs()) == 1


def test_upstream_down_is_a_502_and_models_pass_through(make_proxy, apps):
    p = make_proxy()
    status, _, raw = http("GET", p.url + "/v1/models")
    assert status == 200 and json.loads(raw)["data"][0]["id"] == "fake-model"
    dead = make_proxy(upstream=FakeUpstream(), key_prefix="t:dead:")
    dead.proxy.upstream = "http://127.0.0.1:9"  # nothing listens there
    status, hdrs, out = dead.chat(PYLIST)
    assert status == 502 and out["error"]["type"] == "upstream_unavailable"
    assert dead.docs() == []
    status, _, raw = http("GET", dead.url + "/v1/models")
    assert status == 502
    status, _, raw = http("GET", p.url + "/health")
    assert status == 200 and json.loads(raw)["status"] == "ok"


# ---- streaming ----------------------------------------------------------------------------------------------------


def test_streaming_pass_through_and_streamed_hits(make_proxy):
    p = make_proxy()
    status, hdrs, events = p.chat(PYLIST, stream=True)
    assert status == 200 and hdrs["x-kvplug-cache"] == "miss" and "text/event-stream" in hdrs["content-type"]
    assert events[-1] == "[DONE]"
    assert events[0]["id"] == "chatcmpl-up1"  # the upstream's own events, passed through
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == default_answer(PYLIST)
    assert len(p.docs()) == 1  # rebuilt from the stream and stored
    status, hdrs, events = p.chat(PYLIST_PARA, stream=True, stream_options={"include_usage": True})
    assert hdrs["x-kvplug-cache"] == "hit" and "text/event-stream" in hdrs["content-type"]
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and "usage" in events[-2]
    chunks = events[:-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == default_answer(PYLIST)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # a streamed miss serves a later non-streamed request too
    assert p.answer("What's the way to reverse a list in Python?") == ("hit", default_answer(PYLIST))
    assert p.upstream.calls == 1
    # completions stream
    body = {"model": "m", "prompt": CAPITAL, "temperature": 0, "stream": True}
    status, hdrs, raw = http("POST", p.url + "/v1/completions", body)
    p.drain()
    assert hdrs["x-kvplug-cache"] == "miss" and sse(raw)[-1] == "[DONE]"
    status, hdrs, raw = http("POST", p.url + "/v1/completions", {**body, "prompt": CAPITAL_PARA})
    events = sse(raw)
    assert hdrs["x-kvplug-cache"] == "hit" and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == default_answer(CAPITAL)


def test_streamed_bypass_passes_the_stream_through(make_proxy):
    p = make_proxy()
    status, hdrs, events = p.chat(PYLIST, stream=True, temperature=0.9)
    assert hdrs["x-kvplug-cache"] == "bypass" and events[-1] == "[DONE]" and events[0]["id"] == "chatcmpl-up1"
    assert p.docs() == []


# ---- load-adaptive policy and speculation -------------------------------------------------------------------------


def test_load_adaptive_thresholds_loosen_under_load_and_tighten_back(make_proxy, minilm):
    a, b = "How do I sort a dictionary by value in Python?", "Python: order a dict by its values"
    sim = float(minilm.embed([a])[0] @ minilm.embed([b])[0])
    assert 0.72 < sim < 0.93, sim
    pol = policy_with(code={"threshold": 0.95, "min_threshold": 0.7, "ttl": 60, "max_ttl": 600})
    pol["adaptive"] = {
        "enabled": True,
        "latency_low_s": 0.05,
        "latency_high_s": 0.15,
        "queue_low": 2,
        "queue_high": 10,
        "ewma_alpha": 1.0,
        "half_life_s": 0.3,
        "scrape_interval_s": 0,
    }
    up = FakeUpstream()
    p = make_proxy(pol, upstream=up, speculative="off")
    assert p.answer(a)[0] == "miss"  # fast upstream: no pressure
    up.finish_reason = "content_filter"  # so that b's own answer is not stored
    assert p.answer(b)[0] == "miss"
    up.finish_reason = "stop"
    assert p.metric("kvplug_semantic_effective_threshold", category="code") == pytest.approx(0.95, abs=0.01)
    up.delay_s = 0.3  # the upstream slows down
    assert p.answer("How do I merge two lists in Python?")[0] == "miss"
    assert p.metric("kvplug_semantic_load_pressure") > 0.9
    assert p.metric("kvplug_semantic_effective_threshold", category="code") < sim
    assert p.metric("kvplug_semantic_effective_ttl_seconds", category="code") > 500
    assert p.answer(b) == ("hit", default_answer(a))  # the same pair hits under load
    up.delay_s = 0.0
    time.sleep(1.5)  # five half-lives without a slow miss: tightened back
    assert p.metric("kvplug_semantic_load_pressure") < 0.05
    assert p.metric("kvplug_semantic_effective_threshold", category="code") > 0.94
    assert p.answer(b)[0] == "miss"


def test_queue_scrape_drives_the_pressure(make_proxy):
    pol = policy_with(code={"threshold": 0.95, "min_threshold": 0.8})
    pol["adaptive"] = {"enabled": True, "queue_low": 0, "queue_high": 10, "scrape_interval_s": 0.1}
    up = FakeUpstream()
    up.waiting = 10
    p = make_proxy(pol, upstream=up)
    deadline = time.monotonic() + 5
    while p.metric("kvplug_semantic_upstream_queue_waiting") != 10:
        assert time.monotonic() < deadline, "the upstream's /metrics was not scraped"
        time.sleep(0.1)
    assert p.metric("kvplug_semantic_effective_threshold", category="code") == pytest.approx(0.8)
    up.waiting = 0
    deadline = time.monotonic() + 5
    while p.metric("kvplug_semantic_effective_threshold", category="code") != pytest.approx(0.95):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_speculative_hit_beats_a_slow_upstream(make_proxy):
    up = FakeUpstream(delay_s=1.0)
    p = make_proxy(upstream=up, speculative="on")
    t0 = time.monotonic()
    assert p.answer(PYLIST)[0] == "miss"
    assert time.monotonic() - t0 >= 1.0
    t0 = time.monotonic()
    assert p.answer(PYLIST_PARA) == ("hit", default_answer(PYLIST))
    assert time.monotonic() - t0 < 0.8  # not waiting for the upstream
    assert p.metric("kvplug_semantic_speculative_total", outcome="cache_won") == 1
    # a fast upstream outruns the lookup: its answer is served, and still stored when the lookup missed
    up.delay_s = 0.0
    assert p.answer(CAPITAL) == ("miss", default_answer(CAPITAL))
    deadline = time.monotonic() + 5
    while len(p.docs()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        p.drain()
    up.delay_s = 1.0
    assert p.answer(CAPITAL_PARA) == ("hit", default_answer(CAPITAL))
    # a stream counts as answered at its first event, not at its headers (which vLLM sends at once)
    up.delay_s, up.first_event_delay_s = 0.0, 1.0
    t0 = time.monotonic()
    status, hdrs, events = p.chat("What's the way to reverse a list in Python?", stream=True)  # not embedded yet
    assert hdrs["x-kvplug-cache"] == "hit" and events[-1] == "[DONE]" and time.monotonic() - t0 < 0.8
    assert p.metric("kvplug_semantic_speculative_total", outcome="cache_won") == 3


def test_concurrent_requests_all_succeed(make_proxy, apps):
    import asyncio

    import aiohttp

    p = make_proxy(upstream=FakeUpstream(delay_s=0.05))
    questions = [
        PYLIST,
        PYSTRING,
        CAPITAL,
        "Who wrote Pride and Prejudice?",
        "Tell me a joke about cats.",
        "What is the weather in Paris today?",
        "How tall is Mount Everest?",
        "What are the symptoms of the flu?",
        "How do I make an HTTP request in Go?",
        "Can you recommend a good horror movie?",
    ] * 3

    async def go() -> list[tuple[int, str]]:
        async with aiohttp.ClientSession() as s:

            async def one(q: str) -> tuple[int, str]:
                body = {"model": "m", "messages": [{"role": "user", "content": q}], "temperature": 0}
                async with s.post(p.url + "/v1/chat/completions", json=body) as r:
                    return r.status, (await r.json())["choices"][0]["message"]["content"]

            return await asyncio.gather(*(one(q) for q in questions))

    results = apps.call(go())
    assert all(status == 200 for status, _ in results)
    # whatever was served, nobody got another question's answer (hits are same-question or near-paraphrase only)
    assert all(text == default_answer(q) for (_, text), q in zip(results, questions, strict=True))
