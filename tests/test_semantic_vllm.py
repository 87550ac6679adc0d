"""The semantic cache in front of vLLM CPU's real OpenAI server (SmolLM2-135M): misses reach vLLM, paraphrases are
answered from the cache with vLLM's own earlier answer, streams pass through and stream back from the cache, and
vLLM's queue gauge is scraped."""

from __future__ import annotations

import json
import time

import pytest

from kvplug.semantic.config import SemanticCacheConfig
from kvplug.semantic.policy import DEFAULT_POLICY, parse_policy
from kvplug.semantic.proxy import PROXY_KEY, build_app
from kvplug.semantic.testing import AppThread, shared_embedder
from kvplug.semantic.testing import http_request as http
from kvplug.semantic.testing import parse_sse as sse
from kvplug.testing import RedisServer, free_port
from tests.vllm_helpers import openai_server, require_vllm

require_vllm()

pytestmark = pytest.mark.slow


@pytest.fixture
def vllm_server(tmp_path):
    from kvplug.models import smollm2_dir

    port = free_port()
    args = [
        "--model",
        str(smollm2_dir()),
        "--served-model-name",
        "smollm2",
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--enforce-eager",
    ]
    with openai_server(args, port, tmp_path / "vllm.log"):
        yield f"http://127.0.0.1:{port}"


def test_semantic_cache_in_front_of_vllm(vllm_server):
    pol = json.loads(json.dumps(DEFAULT_POLICY))
    pol["adaptive"]["scrape_interval_s"] = 0.5
    th = AppThread()
    try:
        with RedisServer() as rs:
            # look up, then forward: under load vLLM's first event can beat a lookup that races it (auto)
            cfg = SemanticCacheConfig(upstream=vllm_server, redis_url=rs.url, speculative="off")
            app = build_app(cfg, embedder=shared_embedder("minilm"), policy=parse_policy(pol, "e2e"))
            url = th.start(app)
            proxy = app[PROXY_KEY]

            status, _, raw = http("GET", url + "/v1/models")
            assert status == 200 and json.loads(raw)["data"][0]["id"] == "smollm2"

            def chat(q: str, **kw: object) -> tuple[dict[str, str], bytes]:
                body = {"model": "smollm2", "messages": [{"role": "user", "content": q}], "temperature": 0}
                status, hdrs, raw = http(
                    "POST", url + "/v1/chat/completions", {"max_tokens": 16, **body, **kw}, timeout=120
                )
                th.call(proxy.cache.drain())
                assert status == 200, raw
                return hdrs, raw

            hdrs, raw = chat("What is the capital of France?")
            first = json.loads(raw)
            assert hdrs["x-kvplug-cache"] == "miss" and first["id"].startswith("chatcmpl-")
            assert "kvplug" not in first["id"]  # vLLM's own answer
            text = first["choices"][0]["message"]["content"]
            assert text.strip() and first["choices"][0]["finish_reason"] in ("stop", "length")

            hdrs, raw = chat("Which city is the capital of France?")
            hit = json.loads(raw)
            assert hdrs["x-kvplug-cache"] == "hit" and hdrs["x-kvplug-category"] == "factual"
            assert hit["choices"][0]["message"]["content"] == text and hit["model"] == "smollm2"

            hdrs, raw = chat("How do I reverse a string in Python?")  # a different question: vLLM answers
            assert hdrs["x-kvplug-cache"] == "miss" and json.loads(raw)["choices"][0]["message"]["content"] != text

            hdrs, raw = chat("Tell me a joke about cats.", stream=True)
            events = sse(raw)
            assert hdrs["x-kvplug-cache"] == "miss" and events[-1] == "[DONE]"
            streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
            assert streamed.strip()
            hdrs, raw = chat("Do you know a funny joke about cats?", stream=True)
            events = sse(raw)
            assert hdrs["x-kvplug-cache"] == "hit" and events[-1] == "[DONE]"
            assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == streamed

            hdrs, raw = chat("What is the capital of France?", temperature=0.8)
            assert hdrs["x-kvplug-cache"] == "bypass" and json.loads(raw)["choices"][0]["message"]["content"]

            # vLLM's queue gauge is scraped (0 waiting: no pressure), and its errors pass through unchanged
            deadline = time.monotonic() + 10
            while True:
                _, _, metrics = http("GET", url + "/metrics")
                line = [x for x in metrics.decode().splitlines() if x.startswith("kvplug_semantic_upstream_queue")]
                if line and float(line[0].split()[-1]) == 0.0:
                    break
                assert time.monotonic() < deadline, line
                time.sleep(0.2)
            bad = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
            status, hdrs, raw = http("POST", url + "/v1/chat/completions", bad)
            direct = http("POST", vllm_server + "/v1/chat/completions", bad)
            assert status == direct[0] == 404 and json.loads(raw) == json.loads(direct[2])
            th.stop(url)
    finally:
        th.close()
