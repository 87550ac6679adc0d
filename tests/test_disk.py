"""Disk store: byte cap, LRU, index rebuild, several processes writing at once."""

import multiprocessing as mp
import os
import sqlite3
from pathlib import Path

from kvplug.connectors import DiskStore


def disk_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in (root / "data").rglob("*") if f.is_file())


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
