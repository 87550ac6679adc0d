"""The semantic-cache proxy against issue 17 (wrong answers on near-misses, a dead upstream hiding the cache, huge
prompts) and issue 10 (hostile input): real Redis (private server), real MiniLM, a real HTTP upstream."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import aiohttp
import pytest
import redis

from kvplug.semantic.testing import FakeUpstream, default_answer, http_request
from tests import test_semantic_proxy as base

CAPITAL, PYLIST, PYLIST_PARA, policy_with = base.CAPITAL, base.PYLIST, base.PYLIST_PARA, base.policy_with
apps, minilm, make_proxy = base.apps, base.minilm, base.make_proxy  # the proxy tests' fixtures

# (original, near-miss, paraphrase of the original, the check that refuses the near-miss)
KINDS = [
    (
        "How do I convert an integer to a string in Python?",
        "How do I convert a string to an integer in Python?",
        "Python: how do I convert an integer into a string?",
        "direction",
    ),
    ("What was the Nasdaq close today?", "What was the Nasdaq close yesterday?", "Where did the Nasdaq close today?",
     "time"),
    ("Is flight LH400 on time today?", "Is flight LH401 on time today?", "Is the flight LH400 on time today?",
     "numbers"),
    ("What is the capital of Nigeria?", "What is the capital of Niger?", "Which city is the capital of Nigeria?",
     "entities"),
    (
        "How do I list all running Docker containers?",
        "How do I list all Docker containers that are not running?",
        "How can I list all the running Docker containers?",
        "negation",
    ),
    ("What foods are high in iron?", "What foods are low in iron?", "Which foods are high in iron?", "opposites"),
]  # fmt: skip


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- verification before a hit ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("original", "near", "para", "check"), KINDS, ids=[k[3] for k in KINDS])
def test_each_near_miss_kind_is_refused_and_its_paraphrase_hits(make_proxy, original, near, para, check):
    p = make_proxy()
    assert p.answer(original) == ("miss", default_answer(original))
    assert p.answer(near) == ("miss", default_answer(near))  # never the original's answer
    assert p.answer(para) == ("hit", default_answer(original))
    assert p.metric("kvplug_semantic_verify_refused_total", check=check) >= 1


def test_verification_off_in_a_category_serves_the_near_miss(make_proxy):
    # the negative: the same pair with code verification off is a wrong answer, so the check is what refuses it
    a, b = "How do I convert an integer to a string in Python?", "How do I convert a string to an integer in Python?"
    off = make_proxy(policy_with(code={"verify": False}), key_prefix="t:off:")
    assert off.answer(a)[0] == "miss"
    assert off.answer(b) == ("hit", default_answer(a))
    numbers_only = make_proxy(policy_with(code={"verify": ["numbers"]}), key_prefix="t:num:")
    assert numbers_only.answer(a)[0] == "miss"
    assert numbers_only.answer(b) == ("hit", default_answer(a))
    assert numbers_only.answer("How do I convert an integer to a string in Python 3.11?")[0] == "miss"


def test_a_paraphrase_classified_elsewhere_hits_at_the_stricter_threshold(make_proxy, minilm):
    a, b = "How do I reverse a list in Python?", "How can I invert a Python list?"
    sim = float(minilm.embed([a])[0] @ minilm.embed([b])[0])
    assert 0.75 < sim < 0.97, sim

    def policy(rev: float, other: float) -> dict[str, Any]:
        return {
            "adaptive": {"enabled": False, "scrape_interval_s": 0},
            "categories": {"rev": {"threshold": rev, "keywords": ["reverse"]}, "default": {"threshold": other}},
        }

    p = make_proxy(policy(0.7, 0.7), key_prefix="t:n1:")
    assert p.answer(a)[0] == "miss" and p.last["x-kvplug-category"] == "rev"
    assert p.answer(b) == ("hit", default_answer(a)) and p.last["x-kvplug-category"] == "default"
    strict = make_proxy(policy(0.99, 0.7), key_prefix="t:n2:")  # the entry's own category is stricter: it wins
    assert strict.answer(a)[0] == "miss"
    assert strict.answer(b)[0] == "miss"


def test_global_threshold_in_one_setting(make_proxy):
    p = make_proxy(threshold=0.55)
    for cat in ("code", "health", "finance", "chat", "default", "factual", "time_sensitive"):
        assert p.metric("kvplug_semantic_effective_threshold", category=cat) == pytest.approx(0.55)


# ---- upstream down: a hit is still served -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_hit_served_when_the_upstream_refuses_fails_or_times_out(make_proxy, mode):
    up = FakeUpstream()
    p = make_proxy(upstream=up, speculative=mode, upstream_timeout_s=0.5)
    assert p.answer(PYLIST)[0] == "miss"
    assert len(p.docs()) == 1
    real = p.proxy.upstream
    p.proxy.upstream = "http://127.0.0.1:9"  # refused
    assert p.answer(PYLIST_PARA) == ("hit", default_answer(PYLIST))
    status, _, out = p.chat(CAPITAL)  # nothing cached: the failure is relayed, without naming the upstream
    assert status == 502 and out["error"]["type"] == "upstream_unavailable"
    assert "127.0.0.1" not in json.dumps(out) and ":9" not in out["error"]["message"]
    p.proxy.upstream = real
    up.errors[""] = (503, b'{"error": {"message": "overloaded"}}')  # every call fails at once
    assert p.answer("What's the way to reverse a list in Python?") == ("hit", default_answer(PYLIST))
    assert p.chat("Who wrote Hamlet?")[0] == 503
    del up.errors[""]
    up.delay_s = 2.0  # slower than upstream_timeout_s
    assert p.answer("How can I reverse a list in Python?") == ("hit", default_answer(PYLIST))
    status, _, out = p.chat("Who painted the Mona Lisa?")
    assert status == 504 and "127.0.0.1" not in json.dumps(out)
    if mode != "off":
        assert p.metric("kvplug_semantic_speculative_total", outcome="cache_won_upstream_failed") >= 1


def test_a_hit_found_after_the_first_stream_event_still_wins_within_the_grace(make_proxy):
    up = FakeUpstream()
    r = None

    def slow_redis_lookup(p: Any, text: str) -> tuple[int, dict[str, str], Any]:
        r.execute_command("CLIENT", "PAUSE", 150, "ALL")  # the lookup's fetch waits; the upstream's stream does not
        return p.chat(text, stream=True)

    late = make_proxy(upstream=up, speculative="on", speculative_grace_s=2.0, redis_timeout_s=1.0)
    r = redis.Redis.from_url(late.redis_url)
    assert late.answer(PYLIST)[0] == "miss"
    status, hdrs, events = slow_redis_lookup(late, PYLIST_PARA)
    assert hdrs["x-kvplug-cache"] == "hit" and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == default_answer(PYLIST)
    assert late.metric("kvplug_semantic_speculative_total", outcome="cache_won_late") == 1
    # the negative: without the grace the upstream's stream is relayed and the hit is only counted
    eager = make_proxy(upstream=up, speculative="on", speculative_grace_s=0.0, redis_timeout_s=1.0, key_prefix="t:e:")
    assert eager.answer(PYLIST)[0] == "miss"
    status, hdrs, events = slow_redis_lookup(eager, PYLIST_PARA)
    assert hdrs["x-kvplug-cache"] == "miss"
    deadline = time.monotonic() + 5
    while eager.metric("kvplug_semantic_speculative_total", outcome="upstream_won_over_hit") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r.close()


# ---- hostile input ------------------------------------------------------------------------------------------------


def test_unparsable_and_deeply_nested_bodies_pass_through_never_a_500(make_proxy):
    p = make_proxy()
    url = p.url + "/v1/chat/completions"
    deep = b'{"model": "m", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    msgs = json.dumps([{"role": "user", "content": PYLIST}]).encode()
    nested = b'{"model": "m", "temperature": 0, "messages": ' + msgs + b', "response_format": '
    nested += b"[" * 985 + b"1" + b"]" * 985 + b"}"  # at the edge of what the parser or the scope hash can take
    for body in (deep, b"{not json", b"[1, 2]", nested):
        status, hdrs, out = http_request("POST", url, body)
        assert status != 500, out[:200]
        assert hdrs["x-kvplug-cache"] == "bypass" and hdrs["x-kvplug-cache-reason"] == "bad_request"
    assert p.docs() == [] and p.metric("kvplug_semantic_bypass_total", reason="bad_request") == 4
    # the same request without the hostile field is cached as usual
    assert p.answer(PYLIST)[0] == "miss" and p.answer(PYLIST_PARA)[0] == "hit"


def test_request_size_bounds(make_proxy):
    p = make_proxy(max_request_bytes=100_000, max_parse_bytes=20_000, max_query_chars=2000)
    url = p.url + "/v1/chat/completions"

    def ask(content: str) -> tuple[int, dict[str, str]]:
        body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": content}]}
        status, hdrs, _ = http_request("POST", url, body)
        p.drain()
        return status, hdrs

    status, _ = ask("x" * 150_000)
    assert status == 413  # over max_request_bytes: refused, never forwarded
    assert p.upstream.calls == 0
    status, hdrs = ask("How do I sort this? " + "y " * 15_000)  # over max_parse_bytes: forwarded unparsed
    assert status == 200 and hdrs["x-kvplug-cache-reason"] == "too_large"
    status, hdrs = ask("How do I sort this? " + "z " * 2000)  # a question over max_query_chars
    assert status == 200 and hdrs["x-kvplug-cache-reason"] == "too_long"
    status, hdrs = ask("What does this mean: " + "a+b " * 400)  # 1.6 kB but past MiniLM's 256-token window
    assert status == 200 and hdrs["x-kvplug-cache-reason"] == "too_long"
    assert p.upstream.calls == 3 and p.docs() == []  # none of them stored
    assert p.proxy.cache.embedder.cache_nbytes <= 4 * 2048  # and only the last (short) one was ever embedded


def test_ten_megabyte_prompts_neither_block_other_tenants_nor_grow_memory(make_proxy, apps):
    up = FakeUpstream()
    up.keep_bodies_up_to = 1000
    p = make_proxy(upstream=up)
    assert p.answer(PYLIST)[0] == "miss"
    p.answer(PYLIST_PARA)
    big = "Please summarise this document: " + "lorem ipsum dolor " * (10_000_000 // 18)
    rss0 = _rss()

    async def go() -> tuple[list[int], list[float]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:

            async def one(text: str, tenant: str) -> tuple[int, float]:
                body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": text}]}
                t0 = time.perf_counter()
                async with s.post(p.url + "/v1/chat/completions", json=body, headers={"x-kvplug-tenant": tenant}) as r:
                    await r.read()
                    return r.status, time.perf_counter() - t0

            async def small_ones() -> list[float]:
                await asyncio.sleep(0.05)  # while the big bodies are in flight
                out = []
                for q in (PYLIST_PARA, CAPITAL, "What's the way to reverse a list in Python?"):
                    out.append((await one(q, ""))[1])
                return out

            big_tasks = [one(big, f"t{i}") for i in range(5)]
            *bigs, smalls = await asyncio.gather(*big_tasks, small_ones())
            return [status for status, _ in bigs], smalls

    statuses, small_latencies = apps.call(go(), timeout=300)
    p.drain()
    first = _rss() - rss0
    assert statuses == [200] * 5
    assert max(small_latencies) < 3.0, small_latencies  # was 26.8 s behind one 10 MB embedding
    # was +7.3 GB, never released. Measured here: +200 MB after the first round (the five bodies in the proxy, the
    # client and the upstream of this one process, kept by the allocator for reuse), nothing after the second
    assert first < 400 << 20, first / 2**20
    statuses, small_latencies = apps.call(go(), timeout=300)
    second = _rss() - rss0 - first
    assert statuses == [200] * 5 and max(small_latencies) < 3.0
    assert second < 64 << 20, second / 2**20
    assert max(up.sizes) > 10_000_000  # forwarded whole
    assert p.metric("kvplug_semantic_bypass_total", reason="too_large") == 10
    assert all(len(json.loads(r)["prompt"]) < 5000 for r in _metas(p))  # never stored in Redis


def _metas(p: Any) -> list[bytes]:
    r = redis.Redis.from_url(p.redis_url)
    return [r.hget(k, "meta") for k in p.docs()]


def test_a_failure_inside_the_proxy_forwards_the_request(make_proxy, monkeypatch):
    # fault injection: request analysis raises something unexpected; the client still gets the upstream's answer
    p = make_proxy()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr("kvplug.semantic.proxy.analyze", broken)
    status, hdrs, out = p.chat(PYLIST)
    assert status == 200 and hdrs["x-kvplug-cache-reason"] == "proxy_error"
    assert out["choices"][0]["message"]["content"] == default_answer(PYLIST) and p.docs() == []
