"""Faults inside kvplug never reach the real vLLM engine, and a hung store never stalls it.

Each engine runs in a new process. Faults are injected by the runner (``kvplug.integrations.vllm.runner``'s
``faults``: a method replaced by one that raises, standing in for a bug or an unexpected library error): the
engine must finish every request with the same greedy output as without kvplug, and count the failure.
"""

from __future__ import annotations

import pytest

from kvplug.testing import RedisServer
from tests.vllm_helpers import cached, engine, load_failures, metric, require_vllm, tokens

require_vllm()

pytestmark = pytest.mark.slow
CHUNK = 256


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    from kvplug.models import smollm2_dir

    model = str(smollm2_dir())
    ids = AutoTokenizer.from_pretrained(model)("\n\n".join(topics[k] for k in sorted(topics))).input_ids
    prompts = [ids[:600], ids[3000:3400]]
    base = engine({"model": model, "prompts": prompts, "connector": False})
    disk = tmp_path_factory.mktemp("kv") / "disk"
    stored = engine({"model": model, "prompts": prompts, "extra": {"store": f"file://{disk}"}})
    assert tokens(stored) == tokens(base)
    return model, prompts, base, disk


@pytest.mark.parametrize(
    "fault, counted",
    [
        # the scheduler's lookup raises: no reuse for the request, nothing else changes
        ("kvplug.connectors.base:ChunkStore.contains", "lookup"),
        # planning the loads raises after vLLM was promised the tokens: the fallback reports those blocks failed
        ("kvplug.integrations.vllm.connector:KVPlugConnector._plan_load", "build_meta"),
        # the worker's load raises mid-way: vLLM recomputes
        ("kvplug.integrations.vllm.loading:PagedKV.write", "load_error"),
    ],
)
def test_a_fault_inside_kvplug_is_a_recompute(setup, fault, counted):
    model, prompts, base, disk = setup
    r = engine({"model": model, "prompts": prompts, "extra": {"store": f"file://{disk}"}, "faults": [fault]})
    assert tokens(r) == tokens(base)
    assert metric(r, "kvplug_connector_errors_total", engine="vllm", kind=counted) >= 1
    assert metric(r, "kvplug_connector_loaded_tokens_total", engine="vllm") == 0
    if counted != "lookup":
        assert load_failures(r) >= 1


def test_async_loads_give_the_same_answers(setup):
    model, prompts, base, disk = setup
    r = engine({"model": model, "prompts": prompts, "extra": {"store": f"file://{disk}", "async_load": True}})
    assert tokens(r) == tokens(base)
    assert cached(r) == [2 * CHUNK, CHUNK]
    assert metric(r, "kvplug_connector_loaded_tokens_total", engine="vllm") == 3 * CHUNK
    # and an async load that fails is still reported finished (no request waits forever) and recomputed
    r = engine(
        {
            "model": model,
            "prompts": prompts,
            "extra": {"store": f"file://{disk}", "async_load": True},
            "faults": ["kvplug.integrations.vllm.loading:PagedKV.write"],
        }
    )
    assert tokens(r) == tokens(base) and load_failures(r) == 2


def test_a_hung_redis_adds_at_most_the_lookup_deadline(setup):
    model, prompts, base, _ = setup
    prompts = prompts * 2
    with RedisServer() as server:
        server.pause()  # SIGSTOP: connects, never answers
        try:
            hung = engine({"model": model, "prompts": prompts, "extra": {"store": server.url, "lookup_timeout": 0.1}})
            plain = engine({"model": model, "prompts": prompts, "connector": False})
        finally:
            server.resume()
    assert tokens(hung) == tokens(plain)
    t_hung = [o["seconds"] for o in hung["outputs"]]
    t_plain = [o["seconds"] for o in plain["outputs"]]
    print(f"hung Redis: per-request seconds {t_hung} vs no kvplug {t_plain}")  # the figures in docs/reliability.md
    # The first lookup waits one deadline (0.1 s) and opens the breaker; later requests pay nothing. Before the
    # deadline and breaker, each request waited for socket timeouts and retries (about 6 s with the defaults).
    assert sum(t_hung) < 1.3 * sum(t_plain) + 0.5, (t_hung, t_plain)
    assert metric(hung, "kvplug_store_errors_total", store="redis", kind="deadline") >= 1
    assert metric(hung, "kvplug_store_errors_total", store="redis", kind="unavailable") >= len(prompts) - 1
