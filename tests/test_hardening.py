"""A store that stops answering, credentials that must never be shown, bounded queues and caches."""

from __future__ import annotations

import logging
import time

import pytest
from typer.testing import CliRunner

from kvplug.cli import app
from kvplug.config import KVPlugConfig
from kvplug.connectors import open_store
from kvplug.errors import ConfigError
from kvplug.guard import CircuitBreaker
from kvplug.redact import redact
from kvplug.testing import RedisServer
from kvplug.worker import BoundedWorker

PASSWORD = "pw-Zq81-never-shown"


def test_a_hung_redis_costs_one_deadline_then_nothing_and_recovers(own_redis):
    s = open_store(own_redis.url + "?op_timeout=0.2&down_backoff_max=0.4")
    assert s.put_many([(f"k{i}", b"v" * 1000) for i in range(4)]) == 4
    own_redis.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        t0 = time.monotonic()
        assert s.get_many([f"k{i}" for i in range(4)]) == [None] * 4
        first = time.monotonic() - t0
        assert first < 0.5  # one deadline (0.2 s), not socket timeout x retries (the old 6 s)
        t1 = time.monotonic()
        for _ in range(50):  # the breaker is open: misses at once, nothing touches the socket
            assert s.contains(["k0"]) == 0
        assert time.monotonic() - t1 < 0.25
        errors = s.stats().errors
        assert errors.get("deadline") == 1 and errors.get("unavailable", 0) >= 50
        t2 = time.monotonic()
        while time.monotonic() - t2 < 1.2:  # background probes keep failing: the back-off grows,
            c0 = time.monotonic()  # and callers never wait for them
            assert s.get("k0") is None and time.monotonic() - c0 < 0.05
            time.sleep(0.01)
        assert s.breaker.is_open and s.breaker.backoff >= 0.4
    finally:
        own_redis.resume()
    deadline = time.monotonic() + 5
    while s.get("k0") != b"v" * 1000:  # a probe closes the breaker once Redis answers again
        assert time.monotonic() < deadline, "store did not recover"
        time.sleep(0.05)
    assert not s.breaker.is_open
    s.close()


def test_breaker_backoff_doubles_and_a_probe_closes_it():
    calls = []
    b = CircuitBreaker("t", probe=lambda: calls.append(1) or len(calls) >= 3, backoff_min=0.02, backoff_max=0.05)
    b.failure()
    assert not b.allow() and b.backoff == 0.02
    deadline = time.monotonic() + 3
    while b.is_open:
        assert time.monotonic() < deadline
        b.allow()  # after each back-off this starts one background probe and still answers False
        time.sleep(0.005)
    assert len(calls) == 3 and b.allow()  # two failed probes, the third closed it
    assert b.opened == 1
    with pytest.raises(ValueError):
        CircuitBreaker("bad", backoff_min=1.0, backoff_max=0.5)


@pytest.mark.parametrize(
    "text",
    [
        f"redis://:{PASSWORD}@127.0.0.1:6379/0",
        f"redis://default:{PASSWORD}@h:1/0?ttl=5",
        f"rediss://{PASSWORD}@h:1/0",
        f"redis+sentinel://h:1/m/0?sentinel_password={PASSWORD}",
        f"error for store URL 'redis://u:{PASSWORD}@h/0': unknown option 'x'",
        f'{{"secret": "{PASSWORD}", "store": "memory://"}}',
    ],
)
def test_redact_masks_credentials(text):
    out = redact(text)
    assert PASSWORD not in out and "***" in out


def test_no_password_in_cli_output_errors_or_logs(caplog):
    runner = CliRunner()
    with RedisServer(password=PASSWORD) as server:
        ok = runner.invoke(app, ["doctor", "--store", server.url])
        assert ok.exit_code == 0, ok.output
        assert PASSWORD not in ok.output and "***" in ok.output
        bad_opt = runner.invoke(app, ["store", "stats", server.url + "?nonsense=1"])
        assert bad_opt.exit_code == 2 and "nonsense" in bad_opt.output and PASSWORD not in bad_opt.output
        wrong = f"redis://:{PASSWORD}x@127.0.0.1:{server.port}/0?retries=0"
        failed = runner.invoke(app, ["doctor", "--store", wrong])
        assert failed.exit_code == 1 and PASSWORD not in failed.output
    with pytest.raises(ConfigError) as e:
        open_store(f"redis://:{PASSWORD}@h:1/0?ttl=abc")
    assert PASSWORD not in str(e.value)
    cfg = KVPlugConfig.load({"store": f"redis://:{PASSWORD}@h:1/0", "secret": PASSWORD * 2}, environ={})
    assert PASSWORD not in repr(cfg) and PASSWORD not in str(cfg)
    with caplog.at_level(logging.DEBUG):
        s = open_store(f"redis://:{PASSWORD}@127.0.0.1:1/0?retries=0&socket_connect_timeout=0.2")
        assert s.get("a") is None  # refused connection: a counted miss whose message is logged nowhere with it
        s.close()
    assert PASSWORD not in caplog.text


def test_store_url_and_secret_from_the_environment():
    env = {"REDIS_PW": PASSWORD, "KVPLUG_SECRET": "s" * 20}
    cfg = KVPlugConfig.load({"store": "redis://:${REDIS_PW}@h:1/0"}, environ=env)
    assert cfg.store == f"redis://:{PASSWORD}@h:1/0" and cfg.payload_secret == "s" * 20
    with pytest.raises(ConfigError, match="MISSING_VAR is not set"):
        KVPlugConfig.load({"store": "redis://:${MISSING_VAR}@h/0"}, environ={})
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        KVPlugConfig.load({"secret": "short"}, environ={})
    with pytest.raises(ConfigError, match="lookup_timeout"):
        KVPlugConfig.load({"lookup_timeout": 0}, environ={})


def test_save_queue_is_bounded_in_bytes():
    done = []
    w = BoundedWorker("t", lambda job: (time.sleep(0.05), done.append(job)), maxsize=100, max_bytes=1000)
    assert w.submit("a", 600)
    assert not w.submit("b", 600)  # would hold 1200 bytes: refused, never blocks
    assert w.flush(5) and done == ["a"] and w.pending_bytes == 0
    assert w.submit("c", 900)
    w.close()


def test_tenant_caches_are_bounded_and_an_evicted_tenant_comes_back_with_its_keys():
    """The connector's per-tenant table alone: building a KVPlugConnector needs a running vLLM config, and the table
    reads only the fields set here (the engine-level tenant tests are in test_vllm_e2e.py)."""
    import threading
    from collections import OrderedDict

    pytest.importorskip("vllm")
    from kvplug.chunks import Namespace
    from kvplug.integrations.vllm.connector import KVPlugConnector

    conn = KVPlugConnector.__new__(KVPlugConnector)
    conn.config = KVPlugConfig.load({"max_tenants": 3}, environ={})
    conn.base_namespace = Namespace(model="m", dtype="bfloat16", num_layers=2, num_kv_heads=1, head_dim=8)
    conn.store = open_store("memory://")
    conn.mac_key = None
    conn._caches, conn._caches_lock = OrderedDict(), threading.Lock()
    first = {s: conn._cache(s).namespace.digest for s in ("a", "b", "c")}
    assert len(set(first.values())) == 3  # tenants never share keys
    conn._cache("a")  # a is now the most recently used
    for i in range(50):
        conn._cache(f"t{i}")
        assert len(conn._caches) <= 3
    assert list(conn._caches) == ["t47", "t48", "t49"]
    assert conn._cache("a").namespace.digest == first["a"]  # rebuilt after eviction: same keys, entries still hit
