"""vLLM's OpenAI server with the kvplug flag (multiprocess engine): the second identical request loads from Redis."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import redis

from kvplug.testing import RedisServer, free_port
from tests.vllm_helpers import openai_server, require_vllm

require_vllm()

pytestmark = pytest.mark.slow


def post(port: int, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.fixture
def server(tmp_path):
    from kvplug.models import smollm2_dir

    with RedisServer() as rs:
        port = free_port()
        cfg = {
            "kv_connector": "KVPlugConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"store": rs.url, "codec": "int8"},
        }
        args = [
            "--model",
            str(smollm2_dir()),
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            "--block-size",
            "32",
            "--enforce-eager",
            "--enable-prompt-tokens-details",
            "--no-enable-prefix-caching",  # so a hit can only come from kvplug
            "--kv-transfer-config",
            json.dumps(cfg),
        ]
        with openai_server(args, port, tmp_path / "server.log"):
            yield port, rs


def test_second_identical_request_loads_from_redis(server):
    port, rs = server
    client = redis.Redis.from_url(rs.url)
    prompt = list(range(3000, 3300))  # 300 tokens: one full 256-token chunk
    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10).read())
    body = {"model": models["data"][0]["id"], "prompt": prompt, "max_tokens": 8, "temperature": 0}

    first = post(port, body)
    assert (first["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
    deadline = time.monotonic() + 30
    while client.dbsize() == 0:  # saved off the forward path, on the worker's background thread
        assert time.monotonic() < deadline, "nothing was saved to Redis"
        time.sleep(0.2)
    assert client.dbsize() == 1

    second = post(port, body)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 256
    assert second["choices"][0]["text"] == first["choices"][0]["text"]

    other = post(port, {**body, "kv_transfer_params": {"tenant_salt": "someone-else"}})
    assert (other["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0

    # kvplug's counters reach the API server's /metrics (the engine runs in another process)
    deadline = time.monotonic() + 30
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        loaded = [line for line in text.splitlines() if line.startswith("vllm:kvplug_loaded_tokens_total{")]
        if loaded and float(loaded[0].rsplit(" ", 1)[1]) == 256:
            break
        assert time.monotonic() < deadline, f"no kvplug metrics on /metrics: {loaded}"
        time.sleep(1)
    saved = [line for line in text.splitlines() if line.startswith("vllm:kvplug_saved_tokens_total{")]
    assert saved and float(saved[0].rsplit(" ", 1)[1]) >= 256
