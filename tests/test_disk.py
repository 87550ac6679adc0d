"""Disk store: byte cap, LRU, index rebuild, several processes writing at once."""

import multiprocessing as mp
import os
import resource
import signal
import sqlite3
import threading
from pathlib import Path

import pytest

from kvplug.connectors import DiskStore


def disk_bytes(root: Path) -> int:
    """Bytes of entry files plus temp files of writes in flight (what the cap covers)."""
    return sum(f.stat().st_size for d in ("data", "tmp") for f in (root / d).rglob("*") if f.is_file())


def test_cap_is_never_exceeded_and_lru_keeps_recent_entries(tmp_path):
    s = DiskStore(tmp_path, max_bytes=10_000)
    for i in range(50):
        assert s.put(f"k{i}", bytes([i % 256]) * 1000)
        s.get_many(["k0"])  # keep k0 hot
        s._flush_touches(force=True)
        assert disk_bytes(tmp_path) <= 10_000
    assert s.get("k0") == bytes([0]) * 1000  # recently used: survived
    assert s.get("k1") is None  # cold: evicted
    assert s.get("k49") is not None
    st = s.stats()
    assert st.used_bytes == disk_bytes(tmp_path) <= 10_000 and st.evictions >= 40
    assert not s.put("huge", b"x" * 20_000)  # larger than the cap: refused, counted
    assert s.stats().errors == {"too_large": 1}
    s.close()


def test_index_rebuilt_on_restart_when_missing_or_corrupt(tmp_path):
    s = DiskStore(tmp_path, max_bytes=1 << 20)
    s.put_many([(f"k{i}", b"v" * 100) for i in range(5)])
    s.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp_path / "index.sqlite3") + suffix).unlink(missing_ok=True)
    s = DiskStore(tmp_path, max_bytes=1 << 20)
    assert s.stats().entries == 5 and s.stats().used_bytes == 500
    assert s.get("k3") == b"v" * 100
    s.close()
    (tmp_path / "index.sqlite3").write_bytes(b"this is not sqlite" * 100)
    for suffix in ("-wal", "-shm"):
        Path(str(tmp_path / "index.sqlite3") + suffix).unlink(missing_ok=True)
    s = DiskStore(tmp_path, max_bytes=1 << 20)
    assert s.stats().entries == 5
    s.close()
    with sqlite3.connect(tmp_path / "index.sqlite3") as db:
        assert db.execute("select count(*) from entries").fetchone()[0] == 5


def test_busy_index_never_turns_a_read_into_a_miss(tmp_path):
    s = DiskStore(tmp_path)
    s.put_many([(f"k{i}", b"v" * 10) for i in range(300)])
    other = sqlite3.connect(tmp_path / "index.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the index write lock
    try:
        got = s.get_many([f"k{i}" for i in range(300)])  # 300 touches: forces an index flush
        assert got == [b"v" * 10] * 300
        assert s.stats().errors == {"index_busy": 1}
        assert not s.put("new", b"x")  # a write cannot reserve space: refused and counted, not raised
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert s.put("new", b"x") and s.get("new") == b"x"
    s.close()


def test_fsync_always_and_stale_temp_files(tmp_path):
    (tmp_path / "tmp").mkdir(parents=True)
    stale = tmp_path / "tmp" / "old.123.abc"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    s = DiskStore(tmp_path, fsync="always")
    assert not stale.exists()
    assert s.put("a", b"1" * 10) and s.get("a") == b"1" * 10
    s.close()


def _writer(root: str, worker: int, n: int, cap: int) -> None:
    s = DiskStore(root, max_bytes=cap)
    for i in range(n):
        key = f"k{(i * 7 + worker) % 40}"
        # every writer writes the same bytes for a key (content-addressed, as chunk keys are)
        value = key.encode() * (2000 + 50 * int(key[1:]))
        s.put(key, value)
        got = s.get(key)
        assert got is None or got == value, f"torn or foreign read for {key}"
    s.close()


def test_concurrent_processes_never_expose_a_torn_file_or_exceed_the_cap(tmp_path):
    cap = 200_000
    DiskStore(tmp_path, max_bytes=cap).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 150, cap)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert disk_bytes(tmp_path) <= cap
    s = DiskStore(tmp_path, max_bytes=cap)
    assert s.stats().used_bytes <= cap
    for key in s.keys():
        assert s.get(key) in (None, key.encode() * (2000 + 50 * int(key[1:])))
    assert not list((tmp_path / "tmp").iterdir())
    s.close()


def test_cap_holds_while_another_writer_is_mid_write(tmp_path):
    """The race that used to overshoot: one writer's temp file is on disk while another writer evicts."""
    cap = 10_000
    a, b = DiskStore(tmp_path, max_bytes=cap), DiskStore(tmp_path, max_bytes=cap)  # separate index connections
    a.put_many([(f"old{i}", b"o" * 1000) for i in range(8)])
    started, release = threading.Event(), threading.Event()
    real_write = a._write_tmp

    def slow_write(key, value):
        path = real_write(key, value)
        started.set()
        assert release.wait(10)
        return path

    a._write_tmp = slow_write
    t = threading.Thread(target=lambda: a.put("big", b"B" * 6000))
    t.start()
    assert started.wait(10)  # a's temp file (6000 bytes) exists; its reservation is pending
    assert disk_bytes(tmp_path) <= cap
    for i in range(6):  # b must evict around a's pending reservation, never counting it out
        b.put(f"new{i}", b"n" * 1500)
        assert disk_bytes(tmp_path) <= cap
    release.set()
    t.join(10)
    assert disk_bytes(tmp_path) <= cap
    assert a.get("big") in (None, b"B" * 6000)
    assert a.stats().used_bytes == b.stats().used_bytes == disk_bytes(tmp_path)
    a.close()
    b.close()


def test_index_deleted_while_two_stores_are_open(tmp_path):
    cap = 10_000
    a, b = DiskStore(tmp_path, max_bytes=cap), DiskStore(tmp_path, max_bytes=cap)
    a.put_many([(f"a{i}", b"a" * 1000) for i in range(5)])
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp_path / "index.sqlite3") + suffix).unlink(missing_ok=True)
    for i in range(30):  # both keep writing: they must share one new index, not keep two totals
        assert a.put(f"x{i}", b"x" * 1000) and b.put(f"y{i}", b"y" * 1000)
        assert disk_bytes(tmp_path) <= cap
    assert a.stats().errors.get("index_replaced") == 1 and b.stats().errors.get("index_replaced") == 1
    assert a.stats().used_bytes == b.stats().used_bytes == disk_bytes(tmp_path)
    a.close()
    b.close()


@pytest.mark.parametrize("bad", [".", "..", ".hidden", "k\n", "a/b", "", "x" * 201])
def test_malformed_keys_never_reach_the_filesystem(tmp_path, bad):
    s = DiskStore(tmp_path)
    with pytest.raises(ValueError, match="invalid key"):
        s.put(bad, b"v")
    with pytest.raises(ValueError, match="invalid key"):
        s.get_many(["ok", bad])
    assert not list((tmp_path / "data").rglob("*"))
    s.close()


def test_a_broken_entry_is_a_miss_for_that_key_only_and_the_store_still_opens(tmp_path):
    s = DiskStore(tmp_path)
    s.put_many([("k0", b"zero"), ("k1", b"one")])
    p1 = s._path("k1")
    p1.unlink()
    p1.mkdir()  # something that is not a file where an entry belongs
    assert s.get_many(["k0", "k1"]) == [b"zero", None]
    assert s.stats().errors == {"read": 1}
    s.close()
    (tmp_path / "data" / "zz").mkdir()
    (tmp_path / "data" / "zz" / "junk").write_bytes(b"a file where a shard directory belongs")
    (s._path("k0").parent / ".hidden").write_bytes(b"x")
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp_path / "index.sqlite3") + suffix).unlink(missing_ok=True)
    s = DiskStore(tmp_path)  # the rebuild skips what is not an entry
    assert sorted(s.keys()) == ["k0"] and s.get("k0") == b"zero"
    s.close()


def _full_disk_writer(root: str, q) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # files over 1 MiB cannot be written: EFBIG
    s = DiskStore(root)
    ok_small = s.put("small", b"s" * 1000)
    ok_big = s.put("big", b"b" * (2 << 20))
    q.put((ok_small, ok_big, s.get("small") == b"s" * 1000, s.get("big"), s.stats().errors, s.stats().used_bytes))
    s.close()


def test_disk_full_is_a_counted_failed_write(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_full_disk_writer, args=(str(tmp_path), q))
    p.start()
    ok_small, ok_big, small_back, big, errors, used = q.get(timeout=60)
    p.join(30)
    assert p.exitcode == 0  # nothing raised
    assert ok_small and small_back and not ok_big and big is None
    assert errors == {"write": 1} and used == 1000  # the failed write's reservation was given back
    assert not list((tmp_path / "tmp").iterdir())
