"""Tiered store: write-back, bounded queue, promotion on hit."""

import threading

from kvplug.connectors import DiskStore, MemoryStore, TieredStore, open_store


class GatedMemoryStore(MemoryStore):
    """A real memory store whose writes wait on a gate: stands in for a slow remote tier (no real slow
    Redis can be made deterministic here)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def _put_many(self, items):
        self.gate.wait(10)
        return super()._put_many(items)


def test_write_back_reaches_lower_tiers(tmp_path, redis_url):
    s = open_store(f"memory://|file://{tmp_path}|{redis_url}")
    assert isinstance(s, TieredStore) and len(s.tiers) == 3
    s.put("a", b"payload")
    assert s.flush(10)
    assert [t.get("a") for t in s.tiers] == [b"payload"] * 3
    s.close()


def test_full_queue_drops_and_counts_but_never_blocks():
    slow = GatedMemoryStore()
    s = TieredStore([MemoryStore(), slow], queue_size=2)
    for i in range(10):
        assert s.put(f"k{i}", b"x")  # returns at once: first tier written, write-back queued or dropped
    st = s.stats()
    assert st.queue_drops >= 7
    slow.gate.set()
    assert s.flush(10)
    assert s.get("k0") == b"x"  # first tier has everything
    assert sum(v is not None for v in slow.get_many([f"k{i}" for i in range(10)])) <= 3
    s.close()


def test_promotion_on_hit(tmp_path):
    mem, disk = MemoryStore(), DiskStore(tmp_path)
    s = TieredStore([mem, disk])
    disk.put("old", b"from-disk")
    assert mem.get("old") is None
    assert s.get("old") == b"from-disk"
    assert mem.get("old") == b"from-disk"  # promoted
    assert s.contains(["old"]) == 1
    s.close()


def test_contains_spans_tiers(tmp_path):
    mem, disk = MemoryStore(), DiskStore(tmp_path)
    s = TieredStore([mem, disk], promote=False)
    mem.put("a", b"1")
    disk.put("b", b"2")
    assert s.contains(["a", "b", "c"]) == 2
    assert s.exists_many(["c", "b"]) == [False, True]
    s.close()
