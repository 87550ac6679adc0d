"""Namespace isolation at the cache level, and the Prometheus metrics."""

import dataclasses

import pytest
import torch
from prometheus_client import REGISTRY, generate_latest

from kvplug.cache import KVCache
from kvplug.chunks import Namespace
from kvplug.connectors import open_store

NS = Namespace(model="org/model-a", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_dim=32, chunk_size=16)
TOKENS = list(range(48))
KV = torch.randn(2, 2, 48, 2, 32).to(torch.bfloat16)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "org/model-b"},
        {"revision": "v2"},
        {"dtype": "float16"},
        {"tp_rank": 1, "tp_size": 2},
        {"codec": "int8"},
        {"tenant_salt": "tenant-b"},
        {"rope": Namespace.items({"theta": 500000.0})},
    ],
)
def test_another_namespace_never_hits(tmp_path, change):
    store = open_store(f"file://{tmp_path}")
    KVCache(store, NS).put(TOKENS, KV)
    other = KVCache(store, dataclasses.replace(NS, **change))
    assert other.lookup(TOKENS) == 0
    assert other.prefix(TOKENS) == (0, None)
    assert all(t is None for t in other.get(TOKENS))
    assert KVCache(store, NS).lookup(TOKENS) == 48  # the owner still hits
    store.close()


def test_codec_param_change_never_hits(tmp_path):
    store = open_store(f"file://{tmp_path}")
    a = dataclasses.replace(NS, codec="kivi", codec_params=Namespace.items({"bits": 4}))
    b = dataclasses.replace(NS, codec="kivi", codec_params=Namespace.items({"bits": 2}))
    KVCache(store, a).put(TOKENS, KV)
    assert KVCache(store, b).lookup(TOKENS) == 0
    # keys come from the codec's canonical name and effective parameters: "int4" and "kivi?bits=4" are one
    # codec and share entries (they used to derive different keys), and a default is part of the key
    int4 = KVCache(store, dataclasses.replace(NS, codec="int4"))
    assert int4.namespace == KVCache(store, a).namespace
    assert int4.chunks(TOKENS) == KVCache(store, a).chunks(TOKENS)
    assert int4.lookup(TOKENS) == 48 and torch.equal(int4.get(TOKENS)[0], KVCache(store, a).get(TOKENS)[0])
    wider = KVCache(store, dataclasses.replace(a, codec_params=Namespace.items({"bits": 4, "group_size": 64})))
    assert wider.lookup(TOKENS) == 0
    store.close()


def _metric(name: str, **labels: str) -> float:
    v = REGISTRY.get_sample_value(name, labels)
    return v or 0.0


def test_metrics_count_hits_misses_bytes_errors_and_payload_refusals():
    store = open_store("memory://?name=metrics-test")
    cache = KVCache(store, dataclasses.replace(NS, codec="int8"))
    cache.put(TOKENS, KV)
    cache.get(TOKENS + [1])
    store.get("absent")
    key = cache.chunks(TOKENS)[0].prefix_key
    store.put(key, b"garbage" * 10)
    before = _metric("kvplug_payload_errors_total", kind="foreign")
    cache.get(TOKENS)
    assert _metric("kvplug_payload_errors_total", kind="foreign") == before + 1
    assert _metric("kvplug_store_hits_total", store="metrics-test") == 6
    assert _metric("kvplug_store_misses_total", store="metrics-test") == 1
    assert _metric("kvplug_store_written_bytes_total", store="metrics-test") > 0
    assert _metric("kvplug_store_op_seconds_count", store="metrics-test", op="get") == 3
    text = generate_latest().decode()
    for family in (
        "kvplug_store_hits_total",
        "kvplug_store_errors_total",
        "kvplug_store_evictions_total",
        "kvplug_store_queue_drops_total",
        "kvplug_store_used_bytes",
        "kvplug_store_op_seconds_bucket",
    ):
        assert family in text or family.replace("_total", "") in text
    store.close()
