"""Keeping a sick backend off the request path: a circuit breaker with growing back-off and background probes,
and calls with a deadline.

* :class:`CircuitBreaker`: closed until a failure; then open for a back-off that doubles with every consecutive
  failure (``backoff_min`` up to ``backoff_max``). While open, :meth:`~CircuitBreaker.allow` answers False at once.
  When the back-off ends, one probe runs on a background thread (never on a caller's path): success closes the
  breaker, failure re-opens it with the next, longer back-off. Without a probe function, the first caller after
  the back-off is let through as the probe (and only that one).
* :func:`run_with_deadline`: runs a blocking call on a small shared thread pool and gives up after ``timeout``
  seconds (the call keeps its thread until its own socket timeout ends it; its result is dropped).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

log = logging.getLogger("kvplug.guard")
T = TypeVar("T")


class DeadlineExceeded(TimeoutError):
    """A call did not finish within its deadline (its result, if any comes, is dropped)."""


class CircuitBreaker:
    """See the module docstring. Thread-safe."""

    def __init__(
        self,
        name: str,
        probe: Callable[[], bool] | None = None,
        backoff_min: float = 0.25,
        backoff_max: float = 30.0,
    ) -> None:
        if not 0 < backoff_min <= backoff_max:
            raise ValueError(f"breaker {name}: need 0 < backoff_min <= backoff_max, got {backoff_min}, {backoff_max}")
        self.name = name
        self.probe = probe
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._lock = threading.Lock()
        self._open_until = 0.0
        self._backoff = 0.0  # 0: closed
        self._probing = False
        self.opened = 0  # times the breaker went from closed to open

    @property
    def is_open(self) -> bool:
        return self._backoff > 0.0

    @property
    def backoff(self) -> float:
        return self._backoff

    def allow(self) -> bool:
        """True when a call may go to the backend now."""
        if self._backoff == 0.0:
            return True
        with self._lock:
            if self._backoff == 0.0:
                return True
            if time.monotonic() < self._open_until or self._probing:
                return False
            self._probing = True
            if self.probe is None:
                return True  # this caller is the probe; the others keep getting False until it reports
        threading.Thread(target=self._run_probe, name=f"kvplug-probe-{self.name}", daemon=True).start()
        return False

    def _run_probe(self) -> None:
        try:
            ok = bool(self.probe()) if self.probe is not None else False
        except Exception:  # noqa: BLE001 - a probe that raises is a failed probe
            ok = False
        if ok:
            self.success()
        else:
            self.failure()

    def failure(self) -> None:
        """Open (or keep open) with the next back-off."""
        with self._lock:
            if self._backoff == 0.0:
                self.opened += 1
                self._backoff = self.backoff_min
                log.warning("kvplug: %s is failing; misses for %.2fs, then a probe", self.name, self._backoff)
            else:
                self._backoff = min(self.backoff_max, self._backoff * 2)
            self._open_until = time.monotonic() + self._backoff
            self._probing = False

    def success(self) -> None:
        """Close."""
        if self._backoff == 0.0 and not self._probing:
            return
        with self._lock:
            if self._backoff:
                log.info("kvplug: %s answers again", self.name)
            self._backoff = 0.0
            self._probing = False


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kvplug-deadline")
        return _POOL


def run_with_deadline(fn: Callable[[], T], timeout: float) -> T:
    """``fn()``, or :class:`DeadlineExceeded` after ``timeout`` seconds. Exceptions of ``fn`` propagate."""
    fut: Future[T] = _pool().submit(fn)
    try:
        return fut.result(timeout=timeout)
    except FutureTimeout:
        fut.cancel()
        raise DeadlineExceeded(f"no answer within {timeout:.3f}s") from None
