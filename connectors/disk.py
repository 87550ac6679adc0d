"""Sharded directory store with a byte cap, LRU eviction and a cross-process index.

Layout under ``root``: ``data/ab/cd/<key>`` (shards from a hash of the key), ``tmp/`` for writes in flight and
``index.sqlite3``, a WAL-mode SQLite index (key, size, last access) shared by every process using the
directory. The cap holds across processes, at every instant, for the bytes of the files in ``data/`` plus the
temp files of writes in flight (file sizes, ``st_size``; the filesystem's block rounding comes on top):

* a write first reserves its bytes in the index (one transaction under SQLite's write lock), evicting least
  recently used entries until the reservation fits; victims' files are unlinked before their rows go;
* the temp file is written outside the lock, then renamed into place inside a second transaction, and only if
  its reservation still exists, so every file in ``data/`` has a row and every row counts its bytes;
* a reservation in flight is never evicted by another writer (unless its writer died over an hour ago); when
  everything else is in flight, a write that does not fit is refused rather than exceeding the cap.

If the index file is deleted or replaced while stores are open, each store notices at its next write or delete
and reopens (rebuilding it from the files once), so processes never keep separate totals. Readers never see a
torn file. The index is rebuilt from the files when it is missing or unreadable; stray files and directories
that are not well-formed entries are ignored.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from kvplug.connectors.base import KEY_RE, ChunkStore, Value
from kvplug.errors import StoreError

FsyncPolicy = Literal["never", "always"]


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


_TOUCH_FLUSH_COUNT = 256
_TOUCH_FLUSH_SECONDS = 1.0
_STALE_TMP_SECONDS = 3600.0
_INDEX_BUSY_TIMEOUT = 5.0  # seconds a write waits for another process's index transaction
_PENDING = 1e12  # atime offset marking a reservation whose file is not in place yet (never evicted while fresh)


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
        with _transaction(db):
            if db.execute("SELECT v FROM meta WHERE k='built'").fetchone() is None:
                self._rebuild(db)
        st = os.stat(path)
        self._index_id = (st.st_dev, st.st_ino)
        return db

    def _check_index(self) -> None:
        """Reopen the index if its file was deleted or replaced while this store was open (caller holds
        ``_lock``): otherwise this process would keep counting bytes in an index nobody else sees."""
        try:
            st = os.stat(self.root / "index.sqlite3")
            if (st.st_dev, st.st_ino) == self._index_id:
                return
        except FileNotFoundError:
            pass
        self.count_error("index_replaced")
        self._touched.clear()
        self._db.close()
        self._db = self._open_index()

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the index (waits for other processes' transactions)."""
        with _transaction(self._db):
            yield self._db

    def _rebuild(self, db: sqlite3.Connection) -> None:
        """Re-create the index from the files on disk (inside the caller's transaction). Anything in ``data/``
        that is not a well-formed entry file (a stray directory, a hidden or badly named file) is skipped."""
        db.execute("DELETE FROM entries")
        total = 0
        for shard in self._data.glob("*/*"):
            if not shard.is_dir():
                continue
            for f in shard.iterdir():
                if not KEY_RE.fullmatch(f.name):
                    continue
                try:
                    st = f.stat()
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", (f.name, st.st_size, st.st_mtime))
                total += st.st_size
        db.execute("INSERT OR REPLACE INTO meta VALUES ('total', ?)", (total,))
        db.execute("INSERT OR REPLACE INTO meta VALUES ('built', 1)")

    def reindex(self) -> int:
        """Rebuild the index from the files (after files were removed by hand); returns the entry count."""
        with self._lock, self._txn() as db:
            self._rebuild(db)
            return db.execute("SELECT count(*) FROM entries").fetchone()[0]

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
        rows = [(t, k, _PENDING) for k, t in self._touched.items()]
        self._touched.clear()
        self._last_flush = time.monotonic()
        with self._txn() as db:  # a pending reservation keeps its mark until its file is in place
            db.executemany("UPDATE entries SET atime=? WHERE key=? AND atime < ?", rows)

    def _reserve(self, items: list[tuple[str, int]]) -> list[bool | None]:
        """Reserve index space for (key, size) pairs, evicting LRU entries; returns per item True (reserved),
        False (refused: too large for the cap) or None (another writer holds a pending reservation for it).

        Inside one index transaction (other processes wait on SQLite's write lock): victims' files are unlinked
        *before* their rows disappear, and an overwritten key's old file is unlinked before its new size is
        counted, so the bytes in ``data/`` plus the temp files of writes in flight never exceed the index total,
        and the total never exceeds ``max_bytes``. A reservation is pending (not evictable) until its file is in
        place; a pending row older than an hour (its writer died) is evictable again.
        """
        victims = 0
        now = time.time()
        with self._txn() as db:
            total = db.execute("SELECT v FROM meta WHERE k='total'").fetchone()[0]
            accepted: list[bool | None] = []
            for key, size in items:
                if size > self.max_bytes:
                    accepted.append(False)
                    continue
                row = db.execute("SELECT size, atime FROM entries WHERE key=?", (key,)).fetchone()
                if row is not None and _PENDING + now - _STALE_TMP_SECONDS <= row[1]:
                    accepted.append(None)  # another writer is placing this key right now: it will be stored
                    continue
                if row is not None:
                    self._unlink(key)
                    total -= row[0]
                total += size
                while total > self.max_bytes:
                    batch = db.execute(
                        "SELECT key, size FROM entries WHERE key != ? AND (atime < ? OR atime < ?) "
                        "ORDER BY atime LIMIT 64",
                        (key, _PENDING, _PENDING + now - _STALE_TMP_SECONDS),
                    ).fetchall()
                    if not batch:
                        break
                    for vk, vs in batch:
                        if total <= self.max_bytes:
                            break
                        self._unlink(vk)
                        db.execute("DELETE FROM entries WHERE key=?", (vk,))
                        total -= vs
                        victims += 1
                if total > self.max_bytes:  # everything else is pending in other writers: refuse, stay under
                    total -= size
                    if row is not None:
                        db.execute("DELETE FROM entries WHERE key=?", (key,))
                    accepted.append(False)
                    continue
                db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", (key, size, _PENDING + now))
                accepted.append(True)
            db.execute("UPDATE meta SET v=? WHERE k='total'", (total,))
        if victims:
            self.count("evictions", victims)
        return accepted

    def _commit_files(self, written: list[tuple[str, Path]]) -> list[bool]:
        """Move written temp files into place, each only while its (pending) row still exists, under the index
        lock: a file in ``data/`` always has a row. Returns which were placed."""
        placed: list[bool] = []
        now = time.time()
        with self._txn() as db:
            for key, tmp in written:
                row = db.execute("SELECT atime FROM entries WHERE key=?", (key,)).fetchone()
                if row is None or row[0] < _PENDING:  # evicted (or replaced) by another process meanwhile
                    tmp.unlink(missing_ok=True)
                    placed.append(False)
                    continue
                final = self._path(key)
                try:
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, final)
                except OSError:
                    tmp.unlink(missing_ok=True)
                    self._forget_rows(db, [key])
                    self.count_error("write")
                    placed.append(False)
                    continue
                db.execute("UPDATE entries SET atime=? WHERE key=?", (now, key))
                placed.append(True)
        if self.fsync == "always":
            for d in {self._path(k).parent for (k, _), ok in zip(written, placed, strict=True) if ok}:
                fd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return placed

    def _forget_rows(self, db: sqlite3.Connection, keys: list[str]) -> int:
        """Drop index rows inside the caller's transaction; returns rows removed."""
        n = freed = 0
        for k in keys:
            row = db.execute("SELECT size FROM entries WHERE key=?", (k,)).fetchone()
            if row is None:
                continue
            db.execute("DELETE FROM entries WHERE key=?", (k,))
            n += 1
            freed += row[0]
        db.execute("UPDATE meta SET v=v-? WHERE k='total'", (freed,))
        return n

    def _unlink(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError:  # e.g. a directory where a file belongs: leave it, the row goes anyway
            self.count_error("unlink")

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
            except OSError:  # one unreadable entry is a miss for that key, not for the whole batch
                self.count_error("read")
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
        with self._lock:
            self._check_index()
            self._flush_touches(force=True)
            accepted = self._reserve([(k, memoryview(v).nbytes) for k, v in items])
        written: list[tuple[str, Path]] = []
        failed: list[str] = []
        for (k, v), acc in zip(items, accepted, strict=True):
            if acc is None:
                continue
            if not acc:
                self.count_error("too_large")
                continue
            try:
                written.append((k, self._write_tmp(k, v)))
            except OSError:  # disk full, quota, permissions: a counted failed write, never an exception
                self.count_error("write")
                failed.append(k)
        with self._lock:
            if failed:
                with self._txn() as db:
                    self._forget_rows(db, failed)
            placed = dict(zip([k for k, _ in written], self._commit_files(written), strict=True)) if written else {}
        self._m_used.set(self._total())
        return [acc is None or placed.get(k, False) for (k, _), acc in zip(items, accepted, strict=True)]

    def _write_tmp(self, key: str, value: Value) -> Path:
        tmp = self._tmp / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(value)
                if self.fsync == "always":
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _delete(self, keys: list[str]) -> int:
        n = 0
        with self._lock:
            self._check_index()
            with self._txn() as db:  # files first, then rows: a file in data/ always has a row
                for k in keys:
                    try:
                        self._path(k).unlink()
                        n += 1
                    except FileNotFoundError:
                        pass
                self._forget_rows(db, keys)
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
