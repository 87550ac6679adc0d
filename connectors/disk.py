"""Sharded directory store with a byte cap, LRU eviction and a cross-process index.

Layout under ``root``: ``data/ab/cd/<key>`` (shards from a hash of the key), ``tmp/`` for writes in flight and
``index.sqlite3``, a WAL-mode SQLite index (key, size, last access) shared by every process using the
directory. A write reserves its bytes in the index first (evicting least recently used entries until the
reservation fits under ``max_bytes``), unlinks the victims, then writes a temp file and renames it into
place, so readers never see a torn file and the bytes on disk never exceed the cap. The index is rebuilt from
the files when it is missing or unreadable.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from kvplug.connectors.base import ChunkStore, Value
from kvplug.errors import StoreError

FsyncPolicy = Literal["never", "always"]
_TOUCH_FLUSH_COUNT = 256
_TOUCH_FLUSH_SECONDS = 1.0
_STALE_TMP_SECONDS = 3600.0
_INDEX_BUSY_TIMEOUT = 5.0  # seconds a write waits for another process's index transaction


class DiskStore(ChunkStore):
    """Local directory store. ``fsync="never"`` (default) relies on payload checksums after a crash;
    ``"always"`` fsyncs each file and its directory before the entry becomes visible."""

    kind = "disk"
    failures = (StoreError, OSError, sqlite3.Error)

    def __init__(
        self,
        root: str | os.PathLike[str],
        max_bytes: int = 10 << 30,
        fsync: FsyncPolicy = "never",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if max_bytes <= 0:
            raise ValueError(f"disk store: max_bytes must be > 0, got {max_bytes}")
        if fsync not in ("never", "always"):
            raise ValueError(f"disk store: fsync must be 'never' or 'always', got {fsync!r}")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.fsync = fsync
        self._data = self.root / "data"
        self._tmp = self.root / "tmp"
        for d in (self._data, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}
        self._last_flush = time.monotonic()
        self._db = self._open_index()
        self._clean_tmp()

    # ---- index -------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.root / "index.sqlite3", timeout=_INDEX_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, size INTEGER NOT NULL, atime REAL NOT NULL)"
        )
        db.execute("CREATE INDEX IF NOT EXISTS entries_atime ON entries(atime)")
        db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
        return db

    def _open_index(self) -> sqlite3.Connection:
        path = self.root / "index.sqlite3"
        try:
            db = self._connect()
            db.execute("SELECT count(*) FROM entries").fetchone()
        except sqlite3.DatabaseError:
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
            db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            built = db.execute("SELECT v FROM meta WHERE k='built'").fetchone()
            if built is None:
                self._rebuild(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return db

    def _rebuild(self, db: sqlite3.Connection) -> None:
        """Re-create the index from the files on disk (inside the caller's transaction)."""
        db.execute("DELETE FROM entries")
        total = 0
        for shard in self._data.glob("*/*"):
            for f in shard.iterdir():
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", (f.name, st.st_size, st.st_mtime))
                total += st.st_size
        db.execute("INSERT OR REPLACE INTO meta VALUES ('total', ?)", (total,))
        db.execute("INSERT OR REPLACE INTO meta VALUES ('built', 1)")

    def reindex(self) -> int:
        """Rebuild the index from the files (after files were removed by hand); returns the entry count."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._rebuild(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._db.execute("SELECT count(*) FROM entries").fetchone()[0]

    def _clean_tmp(self) -> None:
        cutoff = time.time() - _STALE_TMP_SECONDS
        for f in self._tmp.iterdir():
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
            except FileNotFoundError:
                pass

    def _path(self, key: str) -> Path:
        h = hashlib.blake2b(key.encode(), digest_size=4).hexdigest()
        return self._data / h[:2] / h[2:4] / key

    def _flush_touches(self, force: bool = False) -> None:
        """Write buffered access times (caller holds ``_lock``)."""
        if not self._touched:
            return
        if (
            not force
            and len(self._touched) < _TOUCH_FLUSH_COUNT
            and time.monotonic() - self._last_flush < _TOUCH_FLUSH_SECONDS
        ):
            return
        rows = [(t, k) for k, t in self._touched.items()]
        self._touched.clear()
        self._last_flush = time.monotonic()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("UPDATE entries SET atime=? WHERE key=?", rows)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _reserve(self, items: list[tuple[str, int]]) -> tuple[list[bool], list[str]]:
        """Reserve index space for (key, size) pairs, evicting LRU entries; returns (accepted, victims)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            total = db.execute("SELECT v FROM meta WHERE k='total'").fetchone()[0]
            accepted: list[bool] = []
            victims: list[str] = []
            now = time.time()
            for key, size in items:
                if size > self.max_bytes:
                    accepted.append(False)
                    continue
                row = db.execute("SELECT size FROM entries WHERE key=?", (key,)).fetchone()
                total += size - (row[0] if row else 0)
                while total > self.max_bytes:
                    batch = db.execute(
                        "SELECT key, size FROM entries WHERE key != ? ORDER BY atime LIMIT 64", (key,)
                    ).fetchall()
                    if not batch:
                        break
                    for vk, vs in batch:
                        if total <= self.max_bytes:
                            break
                        db.execute("DELETE FROM entries WHERE key=?", (vk,))
                        total -= vs
                        victims.append(vk)
                db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", (key, size, now))
                accepted.append(True)
            db.execute("UPDATE meta SET v=? WHERE k='total'", (total,))
            db.execute("COMMIT")
            return accepted, victims
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _forget(self, keys: list[str], sizes: dict[str, int] | None = None) -> int:
        """Drop index rows (only those whose size still matches ``sizes``, if given); returns rows removed."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            n = freed = 0
            for k in keys:
                row = db.execute("SELECT size FROM entries WHERE key=?", (k,)).fetchone()
                if row is None or (sizes is not None and row[0] != sizes[k]):
                    continue
                db.execute("DELETE FROM entries WHERE key=?", (k,))
                n += 1
                freed += row[0]
            db.execute("UPDATE meta SET v=v-? WHERE k='total'", (freed,))
            db.execute("COMMIT")
            return n
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # ---- hooks -------------------------------------------------------------------------------------------
    def _exists_many(self, keys: list[str]) -> list[bool]:
        return [self._path(k).is_file() for k in keys]

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for k in keys:
            try:
                with open(self._path(k), "rb") as f:
                    out.append(f.read())
            except FileNotFoundError:
                out.append(None)
        now = time.time()
        with self._lock:
            for k, v in zip(keys, out, strict=True):
                if v is not None:
                    self._touched[k] = now
            try:
                self._db.execute("PRAGMA busy_timeout=50")  # a read never waits long for the index
                try:
                    self._flush_touches()
                finally:
                    self._db.execute(f"PRAGMA busy_timeout={int(_INDEX_BUSY_TIMEOUT * 1000)}")
            except sqlite3.Error:
                # The files were read fine; a busy index only delays the LRU update (kept for the next flush).
                self._touched.update({k: now for k, v in zip(keys, out, strict=True) if v is not None})
                self.count_error("index_busy")
        return out

    def _put_many(self, items: list[tuple[str, Value]]) -> list[bool]:
        sizes = {k: memoryview(v).nbytes for k, v in items}
        with self._lock:
            self._flush_touches(force=True)
            accepted, victims = self._reserve([(k, sizes[k]) for k, _ in items])
        for vk in victims:
            self._path(vk).unlink(missing_ok=True)
        if victims:
            self.count("evictions", len(victims))
        ok: list[bool] = []
        failed: list[str] = []
        for (k, v), acc in zip(items, accepted, strict=True):
            if not acc:
                self.count_error("too_large")
                ok.append(False)
                continue
            try:
                self._write(k, v)
                ok.append(True)
            except OSError:
                self.count_error("write")
                failed.append(k)
                ok.append(False)
        written = [k for (k, _), s in zip(items, ok, strict=True) if s]
        with self._lock:
            if failed:
                self._forget(failed, sizes)
            # An entry evicted by another process between our reservation and our rename has no row:
            # remove its file so the directory never holds more than the index accounts for.
            present = (
                {
                    r[0]
                    for r in self._db.execute(
                        f"SELECT key FROM entries WHERE key IN ({','.join('?' * len(written))})", written
                    )
                }
                if written
                else set()
            )
        for k in written:
            if k not in present:
                self._path(k).unlink(missing_ok=True)
        self._m_used.set(self._total())
        return [s and k in present for (k, _), s in zip(items, ok, strict=True)]

    def _write(self, key: str, value: Value) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(value)
                if self.fsync == "always":
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, final)
            if self.fsync == "always":
                fd = os.open(final.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _delete(self, keys: list[str]) -> int:
        with self._lock:
            self._forget(keys)
        n = 0
        for k in keys:
            try:
                self._path(k).unlink()
                n += 1
            except FileNotFoundError:
                pass
        self._m_used.set(self._total())
        return n

    def _iter_keys(self) -> Iterator[str]:
        with self._lock:
            rows = self._db.execute("SELECT key FROM entries ORDER BY atime DESC").fetchall()
        return (r[0] for r in rows)

    def _total(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT v FROM meta WHERE k='total'").fetchone()[0])

    def _usage(self) -> tuple[int | None, int | None, int | None]:
        with self._lock:
            n = self._db.execute("SELECT count(*) FROM entries").fetchone()[0]
        return n, self._total(), self.max_bytes

    def _close(self) -> None:
        with self._lock:
            try:
                self._flush_touches(force=True)
            except sqlite3.Error:
                pass
            self._db.close()
