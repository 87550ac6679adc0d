"""Redis outages, authentication, TLS and Sentinel, against real servers started by the tests."""

import subprocess
import time

import pytest
import redis

from kvplug.connectors import open_store
from kvplug.testing import RedisServer, free_port


def test_redis_killed_mid_run_gives_counted_misses_then_reconnects(own_redis):
    s = open_store(own_redis.url + "?socket_timeout=0.5&socket_connect_timeout=0.5&down_backoff_max=0.3")
    assert s.put_many([(f"k{i}", b"v" * 1000) for i in range(8)]) == 8
    own_redis.stop()  # SIGKILL, as a crash
    t0 = time.monotonic()
    # nothing raises into the caller; every read is a miss, every write is refused
    assert s.get_many([f"k{i}" for i in range(8)]) == [None] * 8
    assert s.contains(["k0", "k1"]) == 0
    assert s.exists_many(["k0"]) == [False]
    assert s.put("new", b"x") is False
    assert s.delete(["k0"]) == 0
    for _ in range(20):  # the circuit breaker answers at once while Redis is down
        assert s.get("k0") is None
    assert time.monotonic() - t0 < 5.0
    errors = s.stats().errors
    assert errors.get("connection", 0) >= 1 and errors.get("unavailable", 0) >= 1
    assert s.stats().misses >= 28

    own_redis.start()  # same port, empty (nothing was persisted)
    deadline = time.monotonic() + 5
    while not s.put("back", b"ok"):
        assert time.monotonic() < deadline, "store did not reconnect"
        time.sleep(0.1)
    assert s.get("back") == b"ok"
    assert s.get("k0") is None  # data died with the server: a miss, not an error
    s.close()


def test_unreachable_redis_at_start_is_a_miss_not_an_exception():
    s = open_store(f"redis://127.0.0.1:{free_port()}/0?socket_connect_timeout=0.2&retries=0")
    assert s.get("a") is None and not s.put("a", b"1") and s.contains(["a"]) == 0
    assert s.stats().errors.get("connection") == 1
    s.close()


def test_auth():
    with RedisServer(password="s3cret") as server:
        good = open_store(server.url)
        assert good.put("a", b"1") and good.get("a") == b"1"
        bad = open_store(f"redis://:wrong@127.0.0.1:{server.port}/0?retries=0")
        assert bad.get("a") is None and not bad.put("b", b"2")
        assert sum(bad.stats().errors.values()) >= 2
        none = open_store(f"redis://127.0.0.1:{server.port}/0?retries=0")
        assert none.get("a") is None
        for s in (good, bad, none):
            s.close()


@pytest.fixture
def tls_files(tmp_path):
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=kvplug-test-ca",
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return tmp_path


def test_tls(tls_files):
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tls_files),
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(tls_files / "server.crt"),
            "--tls-key-file",
            str(tls_files / "server.key"),
            "--tls-ca-cert-file",
            str(tls_files / "ca.crt"),
            "--tls-auth-clients",
            "no",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        s = open_store(
            f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tls_files / 'ca.crt'}&retries=0&down_backoff_max=0.05"
        )
        deadline = time.monotonic() + 10
        while not s.put("secure", b"yes"):
            assert proc.poll() is None, proc.stdout.read().decode()[-500:]
            assert time.monotonic() < deadline, "TLS redis did not answer"
            time.sleep(0.1)
        assert s.get("secure") == b"yes"
        s.close()
        # a client that does not trust the CA is refused: a miss, not a wrong answer
        untrusted = open_store(f"rediss://127.0.0.1:{port}/0?retries=0")
        assert untrusted.get("secure") is None
        assert untrusted.stats().errors
        untrusted.close()
    finally:
        proc.kill()
        proc.wait()


def test_sentinel_finds_the_master(own_redis, tmp_path):
    sport = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sport}\nbind 127.0.0.1\nsentinel monitor kvmaster 127.0.0.1 {own_redis.port} 1\ndir {tmp_path}\n"
    )
    proc = subprocess.Popen(
        ["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=sport).sentinel_master("kvmaster"):
                    break
            except redis.RedisError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        s = open_store(f"redis+sentinel://127.0.0.1:{sport}/kvmaster/0")
        assert s.put("via-sentinel", b"1")
        assert redis.Redis(port=own_redis.port).get("kvplug:{via-sentinel}") == b"1"
        assert s.get("via-sentinel") == b"1"
        s.close()
    finally:
        proc.kill()
        proc.wait()
