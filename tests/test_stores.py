"""One contract, every store: memory, disk, Redis, Redis Cluster, tiered (memory + disk + Redis)."""

import threading

import pytest
import redis

from kvplug.connectors import RedisStore, TieredStore, open_store


@pytest.fixture(params=["memory", "disk", "redis", "redis-cluster", "tiered"])
def store(request, tmp_path):
    kind = request.param
    if kind == "memory":
        url = "memory://?max_bytes=64MiB"
    elif kind == "disk":
        url = f"file://{tmp_path}/store?max_bytes=64MiB"
    elif kind == "redis":
        url = request.getfixturevalue("redis_url")
    elif kind == "redis-cluster":
        cluster = request.getfixturevalue("redis_cluster")
        for node in cluster.nodes:
            redis.Redis(port=node.port).flushall()
        url = cluster.url
    else:
        url = f"memory://?max_bytes=64MiB|file://{tmp_path}/t?max_bytes=64MiB|{request.getfixturevalue('redis_url')}"
    s = open_store(url)
    yield s
    s.close()


def settle(s):
    if isinstance(s, TieredStore):
        assert s.flush(10)


def test_put_get_contains_delete(store):
    items = [(f"k{i}", bytes([i]) * (100 + i)) for i in range(10)]
    assert store.put_many(items) == 10
    settle(store)
    assert store.get_many([k for k, _ in items]) == [v for _, v in items]
    assert store.get("missing") is None
    assert store.contains(["k0", "k1", "k2", "nope", "k4"]) == 3
    assert store.contains(["nope", "k0"]) == 0
    assert store.exists_many(["k9", "zz"]) == [True, False]
    assert sorted(store.keys()) == sorted(k for k, _ in items)
    assert store.delete(["k0", "zz"]) == 1
    assert store.get("k0") is None
    st = store.stats()
    assert st.hits >= 10 and st.misses >= 2 and st.puts == 10
    assert st.bytes_written == sum(len(v) for _, v in items)
    assert store.purge() == 9
    assert store.keys() == []


def test_overwrite_and_empty_batches(store):
    assert store.put_many([]) == 0 and store.get_many([]) == [] and store.contains([]) == 0
    store.put("a", b"one")
    store.put("a", b"two")
    settle(store)
    assert store.get("a") == b"two"


def test_bad_input_is_named_and_nothing_is_written(store):
    with pytest.raises(ValueError, match="invalid key"):
        store.put_many([("ok", b"1"), ("has space", b"2")])
    with pytest.raises(ValueError, match="bytes-like"):
        store.put_many([("ok", "text")])
    with pytest.raises(ValueError, match="single string"):
        store.get_many("abc")
    settle(store)
    assert store.get("ok") is None


def test_thread_safety(store):
    errors = []

    def worker(t):
        try:
            for i in range(30):
                key = f"t{t}-{i % 5}"
                value = f"{t}-{i % 5}".encode() * 50
                store.put(key, value)
                got = store.get(key)
                assert got is None or got == value
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    settle(store)
    assert store.get("t3-4") == b"3-4" * 50


def test_redis_splits_large_values_and_refuses_incomplete_ones(redis_url):
    s = open_store(redis_url + "&max_value_bytes=4096")
    big = bytes(range(256)) * 80  # 20480 bytes -> 5 parts
    assert s.put("big", big)
    assert s.get("big") == big
    client = s.client
    parts = sorted(k.decode() for k in client.keys("kvplug:{big}:p*"))
    assert len(parts) == 5
    client.delete(parts[2])
    assert s.get("big") is None
    assert s.stats().errors == {"split_part_missing": 1}
    assert s.put("big", big) and s.delete(["big"]) == 1
    assert client.keys("kvplug:{big}*") == []  # parts go with the entry
    s.close()


def test_redis_ttl(redis_url):
    s = open_store(redis_url + "&ttl=30")
    s.put("x", b"1")
    assert 0 < s.client.pttl("kvplug:{x}") <= 30000
    s.close()


def test_redis_prefix_keeps_tenants_apart(redis_url):
    a = open_store(redis_url + "&prefix=a:")
    b = open_store(redis_url + "&prefix=b:")
    a.put("k", b"A")
    assert b.get("k") is None and b.keys() == []
    assert isinstance(a, RedisStore)
    a.close()
    b.close()
