"""A bounded background queue with one worker thread: ``submit`` never blocks (a full queue refuses the job),
``flush`` waits for queued jobs, ``close`` drains and stops. Used for write-backs and engine-side saves.

The bound is a number of jobs and, optionally, bytes: ``submit(job, nbytes)`` refuses a job that would take the
bytes held by queued and running jobs over ``max_bytes``."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class BoundedWorker(Generic[T]):
    def __init__(
        self, name: str, handler: Callable[[T], None], maxsize: int, max_bytes: int | None = None
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"{name}: queue size must be >= 1")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"{name}: max_bytes must be >= 1")
        self.name = name
        self._handler = handler
        self._q: queue.Queue[tuple[T, int] | None] = queue.Queue(maxsize=maxsize)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.max_bytes = max_bytes
        self.pending_bytes = 0

    def submit(self, job: T, nbytes: int = 0) -> bool:
        """Queue ``job`` (holding ``nbytes``); False (nothing queued) when the queue or its byte budget is full."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            if self.max_bytes is not None and self.pending_bytes + nbytes > self.max_bytes:
                return False
            try:
                self._q.put_nowait((job, nbytes))
            except queue.Full:
                return False
            self.pending_bytes += nbytes
            return True

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                self._handler(item[0])
            except Exception:  # noqa: BLE001 - a failed job is logged; the worker keeps serving
                log.exception("%s: job failed", self.name)
            finally:
                if item is not None:
                    with self._lock:
                        self.pending_bytes -= item[1]
                self._q.task_done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued job is done; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._q.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued jobs (up to ``timeout``), then stop the thread."""
        if self._thread is None:
            return
        self.flush(timeout)
        self._q.put(None)
        self._thread.join(timeout=5.0)
        self._thread = None
