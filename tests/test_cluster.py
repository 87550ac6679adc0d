"""Redis Cluster of 3 masters started locally."""

import redis

from kvplug.connectors import open_store


def test_keys_spread_over_masters_and_hit_after_client_restart(redis_cluster):
    for node in redis_cluster.nodes:
        redis.Redis(port=node.port).flushall()
    s = open_store(redis_cluster.url + "?max_value_bytes=2048")
    items = [(f"chunk{i:03d}", bytes([i]) * 5000) for i in range(60)]  # each split into 3 parts
    assert s.put_many(items) == 60
    s.close()

    sizes = [redis.Redis(port=n.port).dbsize() for n in redis_cluster.nodes]
    assert all(n > 0 for n in sizes), f"keys not spread: {sizes}"
    assert sum(sizes) == 60 * 4  # manifest + 3 parts per chunk, each chunk's parts on its own slot
    for n in redis_cluster.nodes:  # all parts of a chunk live on the node that holds its manifest
        c = redis.Redis(port=n.port)
        for k in c.scan_iter(match="kvplug:{*}"):
            base = k.decode()
            assert all(c.exists(f"{base}:p{i}") for i in range(3))

    fresh = open_store(redis_cluster.url + "?max_value_bytes=2048")  # a new client: hits survive the restart
    assert fresh.contains([k for k, _ in items]) == 60
    assert fresh.get_many([k for k, _ in items]) == [v for _, v in items]
    assert sorted(fresh.keys()) == sorted(k for k, _ in items)
    fresh.close()
