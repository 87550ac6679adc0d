"""CacheAwareQueue without an engine: ordering, aging bound, the vLLM RequestQueue contract, config errors.

``FakeRequest`` stands in for ``vllm.v1.request.Request``: the queue only reads ``request_id``, ``arrival_time``,
``num_tokens``, ``priority`` and (through ``is_resumed``) ``status``; a real ``Request`` is used once to check the
queue accepts it. Time comes from a fake clock, so every interval is exact.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.vllm_helpers import require_vllm

require_vllm()

from kvplug.errors import ConfigError  # noqa: E402
from kvplug.integrations.vllm.scheduler import ERRORS, CacheAwareConfig, CacheAwareQueue, RequestQueue  # noqa: E402


@dataclass(eq=False)  # identity hash, like vLLM's Request
class FakeRequest:
    request_id: str
    arrival_time: float
    num_tokens: int = 100
    priority: int = 0
    status: str = "waiting"


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def resumed(r: FakeRequest) -> bool:
    return r.status == "preempted"


def make_queue(
    hits: dict[str, float], max_delay_s: float = 3.0, clock: Clock | None = None, **kw
) -> tuple[CacheAwareQueue, list[str]]:
    """A queue whose estimate is ``hits[request_id] * num_tokens`` (a hit fraction); also returns the call log."""
    calls: list[str] = []

    def estimate(r: FakeRequest) -> int:
        calls.append(r.request_id)
        return int(hits.get(r.request_id, 0.0) * r.num_tokens)

    q = CacheAwareQueue(estimate, max_delay_s=max_delay_s, is_resumed=resumed, clock=clock or Clock(), **kw)
    return q, calls


def drain(q: CacheAwareQueue) -> list[str]:
    out = []
    while q:
        peeked = q.peek_request()
        popped = q.pop_request()
        assert popped is peeked
        out.append(popped.request_id)
    return out


def test_is_a_vllm_request_queue_and_takes_real_requests():
    from vllm import SamplingParams
    from vllm.v1.request import Request

    q = CacheAwareQueue(lambda r: 0, is_resumed=lambda r: False)
    assert isinstance(q, RequestQueue)
    real = Request("real", [1, 2, 3], SamplingParams(max_tokens=1), None, arrival_time=5.0)
    q.add_request(real)
    assert len(q) == 1 and q.peek_request() is real and q.pop_request() is real and not q


def test_fully_cached_jumps_ahead_within_max_delay_not_beyond():
    hits = {"C": 1.0, "D": 1.0, "E": 1.0}
    q, _ = make_queue(hits, max_delay_s=3.0)
    for rid, t in [("A", 0.0), ("B", 2.0), ("C", 2.5), ("D", 3.5), ("E", 6.0)]:
        q.add_request(FakeRequest(rid, t))
    # keys: A 0, B 2, C -0.5, D 0.5, E 3: C passes A and B (<= 3 s later), D passes B only, E (6 s after A) passes none
    assert drain(q) == ["C", "A", "D", "B", "E"]


def test_partial_hit_moves_proportionally():
    q, _ = make_queue({"H": 0.5}, max_delay_s=4.0)
    for rid, t in [("A", 0.0), ("B", 1.5), ("H", 3.0)]:
        q.add_request(FakeRequest(rid, t))
    assert drain(q) == ["A", "H", "B"]  # H moves by 2 s: to key 1.0, ahead of B (1.5), not A (0)


def test_ties_keep_arrival_order():
    q, _ = make_queue({"late": 1.0}, max_delay_s=3.0)
    q.add_request(FakeRequest("late", 4.0))  # key 1.0, the same as "early"'s
    q.add_request(FakeRequest("early", 1.0))
    q.add_request(FakeRequest("b", 2.0))
    q.add_request(FakeRequest("a", 2.0))  # same arrival, same key: request id decides, deterministically
    assert drain(q) == ["early", "late", "a", "b"]


def test_preempted_first_and_unranked():
    q, _ = make_queue({"hit": 1.0}, max_delay_s=3.0)
    q.add_request(FakeRequest("hit", 0.5))
    q.add_request(FakeRequest("cold", 0.0))
    q.prepend_request(FakeRequest("pre-late", 9.0, status="preempted"))  # how vLLM returns a preempted request
    q.prepend_request(FakeRequest("pre-early", 8.0, status="preempted"))
    assert drain(q) == ["pre-early", "pre-late", "hit", "cold"]


def test_priority_policy_comes_first_only_when_asked():
    reqs = [("hi-prio-cold", 2.0, 0), ("lo-prio-cached", 0.0, 1)]
    by_prio, _ = make_queue({"lo-prio-cached": 1.0}, by_priority=True)
    plain, _ = make_queue({"lo-prio-cached": 1.0}, by_priority=False)
    for q in (by_prio, plain):
        for rid, t, prio in reqs:
            q.add_request(FakeRequest(rid, t, priority=prio))
    assert drain(by_prio) == ["hi-prio-cold", "lo-prio-cached"]  # lower value = higher priority, as in vLLM
    assert drain(plain) == ["lo-prio-cached", "hi-prio-cold"]


def test_max_delay_zero_is_fcfs():
    rng = random.Random(1)
    arrivals = sorted(rng.uniform(0, 10) for _ in range(40))
    hits = {f"r{i}": rng.random() for i in range(40)}
    q, _ = make_queue(hits, max_delay_s=0.0)
    order = [f"r{i}" for i in range(40)]
    for rid, t in zip(order, arrivals, strict=True):
        q.add_request(FakeRequest(rid, t))
    assert drain(q) == order


def test_peek_then_pop_returns_the_peeked_request_even_after_a_rescore():
    clock = Clock()
    hits = {"B": 0.0}
    q, _ = make_queue(hits, max_delay_s=3.0, clock=clock, rescore_interval_s=0.5)
    q.add_request(FakeRequest("A", 0.0))
    q.add_request(FakeRequest("B", 1.0))
    assert q.peek_request().request_id == "A"
    hits["B"] = 1.0  # B's prefix got cached while it waited ...
    clock.t += 1.0  # ... and the estimate is stale
    assert q.pop_request().request_id == "A"  # pop never reorders behind a peek
    q.add_request(FakeRequest("A2", 0.5))
    assert q.peek_request().request_id == "B"  # the next peek sees the new estimate
    assert q.pop_request().request_id == "B"


def test_remove_prepend_len_iter():
    q, _ = make_queue({"C": 1.0})
    reqs = {rid: FakeRequest(rid, t) for rid, t in [("A", 0.0), ("B", 1.0), ("C", 2.0), ("D", 3.0)]}
    for r in reqs.values():
        q.add_request(r)
    assert len(q) == 4 and bool(q)
    assert [r.request_id for r in q] == ["C", "A", "B", "D"]
    assert q.peek_request().request_id == "C"
    q.remove_request(reqs["C"])  # after a peek: the cached order must drop it
    assert q.peek_request().request_id == "A"
    with pytest.raises(ValueError, match="C"):
        q.remove_request(reqs["C"])
    q.remove_requests([reqs["B"], reqs["C"]])  # one not queued: ignored, as vLLM's queues do
    assert [r.request_id for r in q] == ["A", "D"]
    a = q.pop_request()
    q.prepend_request(a)  # vLLM skips a request this way: popped, then put back at the end of the step
    q.prepend_requests([])
    assert drain(q) == ["A", "D"]
    assert len(q) == 0 and not q and list(q) == []
    with pytest.raises(IndexError):
        q.peek_request()
    with pytest.raises(IndexError):
        q.pop_request()


def test_estimate_once_per_rescore_interval_even_across_skips():
    clock = Clock()
    q, calls = make_queue({"A": 0.5}, clock=clock, rescore_interval_s=0.5)
    reqs = [FakeRequest(rid, t) for rid, t in [("A", 0.0), ("B", 1.0)]]
    for r in reqs:
        q.add_request(r)
    for _ in range(20):  # many scheduler steps within one interval, each skipping both requests
        skipped = [q.pop_request() for _ in range(2)]
        q.prepend_requests(reversed(skipped))
        q.peek_request()
        clock.t += 0.01
    assert sorted(calls) == ["A", "B"]  # one lookup each
    clock.t += 0.5
    q.peek_request()
    assert sorted(calls) == ["A", "A", "B", "B"]  # and one more after the interval
    q.add_request(FakeRequest("C", 2.0))  # a new arrival rebuilds the order but does not re-ask fresh estimates
    q.peek_request()
    assert sorted(calls) == ["A", "A", "B", "B", "C"]


def test_a_failing_estimate_ranks_cold_and_never_raises():
    def estimate(r: FakeRequest) -> int:
        if r.request_id == "bad":
            raise OSError("store down")
        return r.num_tokens if r.request_id == "good-cached" else 0

    before = ERRORS.labels("estimate")._value.get()
    q = CacheAwareQueue(estimate, max_delay_s=3.0, is_resumed=resumed, clock=Clock())
    q.add_request(FakeRequest("bad", 0.0))
    q.add_request(FakeRequest("good-cached", 2.0))
    q.add_request(FakeRequest("cold-ish", 0.5))
    assert drain(q) == ["good-cached", "bad", "cold-ish"]  # good: key -1; bad ranks as cold (key 0)
    assert ERRORS.labels("estimate")._value.get() == before + 1


def test_estimate_is_clamped():
    q = CacheAwareQueue(lambda r: -5 if r.request_id == "neg" else 10**9, max_delay_s=3.0, is_resumed=resumed)
    neg, big = FakeRequest("neg", 0.0), FakeRequest("big", 3.5, num_tokens=10)
    q.add_request(neg)
    q.add_request(big)
    q.peek_request()
    assert q.saved_tokens(neg) == 0
    assert q.rank_key(big)[2] == pytest.approx(0.5)  # at most the whole prompt: moves by max_delay_s, no more
    assert q.rank_key(neg)[2] == 0.0


# ---- the aging bound ---------------------------------------------------------------------------------------------
def simulate(arrivals: list[float], services: list[float], queue: CacheAwareQueue | None, clock: Clock) -> list[float]:
    """A single-slot, work-conserving, non-preemptive server; returns each request's admission time. ``queue``
    None is FCFS."""
    n = len(arrivals)
    reqs = [FakeRequest(f"r{i:03d}", a) for i, a in enumerate(arrivals)]
    admitted = [math.nan] * n
    fifo: list[int] = []
    free_at, nxt, done = 0.0, 0, 0
    while done < n:
        waiting = len(queue) if queue is not None else len(fifo)
        t = max(free_at, arrivals[nxt]) if waiting == 0 else free_at
        while nxt < n and arrivals[nxt] <= t:
            if queue is not None:
                queue.add_request(reqs[nxt])
            else:
                fifo.append(nxt)
            nxt += 1
        clock.t = t
        if queue is not None:
            i = int(queue.pop_request().request_id[1:])
        else:
            i = fifo.pop(0)
        admitted[i] = t
        free_at = t + services[i]
        done += 1
    return admitted


@settings(max_examples=300, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 3.0, allow_nan=False), min_size=1, max_size=40),
    services=st.lists(st.floats(0.01, 4.0, allow_nan=False), min_size=40, max_size=40),
    max_delay_s=st.sampled_from([0.0, 0.5, 3.0, 10.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_aging_bound(gaps, services, max_delay_s, seed):
    """No request is admitted after one that arrived more than max_delay_s later; hence each request starts no later
    than FCFS would start a request arriving max_delay_s after it (its added delay is at most max_delay_s plus
    the FCFS work of those max_delay_s of arrivals) - for any hit estimates, even ones changing at every read."""
    arrivals = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    n = len(arrivals)
    rng = random.Random(seed)
    clock = Clock(0.0)
    q = CacheAwareQueue(
        lambda r: int(rng.random() * r.num_tokens),
        max_delay_s=max_delay_s,
        rescore_interval_s=0.3,
        is_resumed=resumed,
        clock=clock,
    )
    admitted = simulate(arrivals, services, q, clock)
    for a in range(n):
        for b in range(n):
            if arrivals[b] > arrivals[a] + max_delay_s:
                assert admitted[a] <= admitted[b], (a, b)
    for a in range(n):
        # FCFS over the arrivals up to arrival[a] + max_delay_s, plus a probe arriving right then: its start
        horizon = arrivals[a] + max_delay_s
        head = [t for t in arrivals if t <= horizon]
        fcfs = simulate([*head, horizon], [*services[: len(head)], 0.0], None, Clock(0.0))
        assert admitted[a] <= fcfs[-1] + 1e-9
    if max_delay_s == 0.0:
        assert admitted == simulate(arrivals, services, None, Clock(0.0))


# ---- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"max_delay_s": -1}, "kvplug_scheduler.max_delay_s"),
        ({"max_delay_s": "3"}, "kvplug_scheduler.max_delay_s"),
        ({"max_delay_s": True}, "kvplug_scheduler.max_delay_s"),
        ({"max_delay_s": float("inf")}, "kvplug_scheduler.max_delay_s"),
        ({"rescore_interval_s": 0}, "kvplug_scheduler.rescore_interval_s"),
        ({"use_connector": "yes"}, "kvplug_scheduler.use_connector"),
        ({"max_delay": 3}, "max_delay"),
        ([3.0], "kvplug_scheduler"),
    ],
)
def test_config_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key):
        CacheAwareConfig.parse(raw)


def test_config_defaults_and_from_vllm_config():
    assert CacheAwareConfig.parse(None) == CacheAwareConfig(3.0, 0.5, True)
    cfg = CacheAwareConfig.from_vllm_config(SimpleNamespace(additional_config={"kvplug_scheduler": {"max_delay_s": 1}}))
    assert cfg.max_delay_s == 1
    assert CacheAwareConfig.from_vllm_config(SimpleNamespace(additional_config={})) == CacheAwareConfig()
    with pytest.raises(ConfigError, match=r"additional_config\.kvplug_scheduler: unknown key\(s\) \['delay'\]"):
        CacheAwareConfig.from_vllm_config(SimpleNamespace(additional_config={"kvplug_scheduler": {"delay": 1}}))
