import threading

import pytest

from kvplug.worker import BoundedWorker


def test_failed_job_does_not_stop_the_worker_and_full_queue_refuses():
    done, gate = [], threading.Event()

    def handler(job):
        gate.wait(5)
        if job == "boom":
            raise RuntimeError("job failed")
        done.append(job)

    w = BoundedWorker("test-worker", handler, maxsize=2)
    results = [w.submit(j) for j in ("a", "boom", "b", "c", "d")]
    assert results.count(False) >= 2  # never blocks: refused while the first job is held at the gate
    gate.set()
    assert w.flush(5)
    assert "a" in done and "boom" not in done
    assert w.submit("after")  # the worker survived the failed job
    w.close()
    assert done[-1] == "after"  # close drains what was queued


def test_queue_size_is_checked():
    with pytest.raises(ValueError, match="queue size"):
        BoundedWorker("w", print, 0)
