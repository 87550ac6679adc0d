"""Cache-aware scheduling for vLLM: among waiting requests, admit first those whose prefill the caches already hold,
with aging, so no request waits behind later arrivals for more than ``max_delay_s``.

Turn it on with vLLM's scheduler-class option (one flag; works with and without the kvplug connector)::

    LLM(model, scheduler_cls="kvplug.integrations.vllm.scheduler.CacheAwareScheduler",
        additional_config={"kvplug_scheduler": {"max_delay_s": 3.0}})   # additional_config is optional

    python -m vllm.entrypoints.openai.api_server --model ... \\
        --scheduler-cls kvplug.integrations.vllm.scheduler.CacheAwareScheduler \\
        --additional-config '{"kvplug_scheduler": {"max_delay_s": 3.0}}'

Ranking. Each waiting request ``r`` gets an estimated saving ``s(r)``: the prompt tokens vLLM's prefix cache holds
for it, or (with the kvplug connector) the tokens the kvplug store holds (its stored prefix, or for a blend request
the tokens of its segments found in the store), whichever is larger (both are prefixes, so they overlap, not add).
The queue is ordered by the key ``arrival_time - max_delay_s * s(r) / len(r)``: a fully cached request goes ahead
of requests that arrived up to ``max_delay_s`` before it, a half cached one up to half that, a cold one keeps its
FCFS place. Ties keep arrival order. Preempted requests resume first (as in vLLM's FCFS queue), and with
``--scheduling-policy priority`` the request priority still comes first.

Bound (the aging). Every key lies in ``[arrival - max_delay_s, arrival]``, so a request is never admitted after one
that arrived more than ``max_delay_s`` later than it: once a request has waited ``max_delay_s``, no newcomer passes
it. Its wait is therefore at most ``max_delay_s`` longer than what vLLM's FCFS would give a request arriving
``max_delay_s`` later: a bound on the delay the reordering adds, not a promise of service under overload (no
scheduler can give that). ``max_delay_s: 0`` is vLLM's FCFS order exactly.

Cost. Scores are cached per request and refreshed every ``rescore_interval_s`` (vLLM's prefix cache changes while
requests wait); the kvplug store is asked once per request (``KVPlugConnector.estimated_hit_tokens``, the lookup
vLLM makes at admission anyway, made earlier and cached). Nothing here raises into the engine: a failed estimate
ranks the request as cold, logged and counted in ``kvplug_scheduler_errors``.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram

from kvplug.errors import ConfigError
from kvplug.integrations.vllm import _compat

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvplug.vllm")
CONFIG_KEY = "kvplug_scheduler"  # additional_config key
CLASS_PATH = "kvplug.integrations.vllm.scheduler.CacheAwareScheduler"

Scheduler, AsyncScheduler, RequestQueue = _compat.scheduler_bases()

_WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
QUEUE_WAIT = Histogram(
    "kvplug_scheduler_queue_wait_seconds", "Arrival to first admission, per request", buckets=_WAIT_BUCKETS
)
ADMISSIONS = Counter(
    "kvplug_scheduler_admissions",
    "First admissions, by order: in_order, or ahead (an earlier arrival was still waiting)",
    ["order"],
)
LATE = Counter(
    "kvplug_scheduler_late_admissions", "First admissions after waiting more than max_delay_s (the engine was full)"
)
ERRORS = Counter("kvplug_scheduler_errors", "Failed hit estimates (the request ranks as cold)", ["kind"])


@dataclass(frozen=True)
class CacheAwareConfig:
    """KVShare's cache-aware scheduling (Yang et al., arXiv 2503.16525): rank by cache hit, age to avoid starvation.

    The paper gives no aging constant and no code; ``max_delay_s`` = 3 s ("a few seconds") is kvplug's default.
    """

    max_delay_s: float = 3.0  # the most a cache hit can move a request ahead (and so delay another)
    rescore_interval_s: float = 0.5  # how old a cached estimate may get before it is read again
    use_connector: bool = True  # also rank by what the kvplug connector's store holds

    def __post_init__(self) -> None:
        for name in ("max_delay_s", "rescore_interval_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{CONFIG_KEY}.{name} must be a finite number >= 0, got {v!r}")
        if self.rescore_interval_s == 0:
            raise ConfigError(f"{CONFIG_KEY}.rescore_interval_s must be > 0")
        if not isinstance(self.use_connector, bool):
            raise ConfigError(f"{CONFIG_KEY}.use_connector must be true or false, got {self.use_connector!r}")

    @classmethod
    def parse(cls, raw: Any, where: str = CONFIG_KEY) -> CacheAwareConfig:
        """From a JSON object; unknown keys and bad values are errors naming the key."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig) -> CacheAwareConfig:
        """``additional_config["kvplug_scheduler"]`` (``--additional-config``), or the defaults."""
        extra = getattr(vllm_config, "additional_config", None)
        raw = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
        return cls.parse(raw, f"additional_config.{CONFIG_KEY}")


@dataclass
class _Score:
    saved: int = 0  # estimated prompt tokens served from a cache
    at: float = -math.inf  # clock() when estimated (-inf: not yet)


class CacheAwareQueue(RequestQueue):  # type: ignore[misc,valid-type]
    """vLLM ``RequestQueue`` ordered by ``(priority, resumed first, arrival - max_delay_s * saved fraction)``.

    ``estimate(request)`` returns the prompt tokens a cache can serve; it is called at most once per request per
    ``rescore_interval_s``. The order is computed on ``peek`` and kept until the queue changes (or the interval
    passes), so a ``peek`` followed by a ``pop`` returns the same request, as vLLM's scheduling loop expects.
    """

    def __init__(
        self,
        estimate: Callable[[Request], int],
        max_delay_s: float = CacheAwareConfig.max_delay_s,
        rescore_interval_s: float = CacheAwareConfig.rescore_interval_s,
        by_priority: bool = False,
        is_resumed: Callable[[Request], bool] = _compat.is_preempted,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._estimate = estimate
        self.max_delay_s = float(max_delay_s)
        self.rescore_interval_s = float(rescore_interval_s)
        self._by_priority = by_priority
        self._is_resumed = is_resumed
        self._clock = clock
        self._scores: dict[Request, _Score] = {}  # the waiting requests
        # estimates outlive a pop: vLLM pops requests it skips in a step (blocked, remote KV pending...) and
        # prepends them back at the end of the step; re-adding one must not ask the caches again
        self._known: weakref.WeakKeyDictionary[Request, _Score] = weakref.WeakKeyDictionary()
        self._order: list[Request] | None = None  # rank order, None when it must be rebuilt
        self._built_at = -math.inf

    # -- ranking --------------------------------------------------------------------------------------------------
    def saved_tokens(self, request: Request) -> int:
        """The current estimate for a waiting request (0 if unknown)."""
        s = self._scores.get(request)
        return s.saved if s is not None else 0

    def rank_key(self, request: Request) -> tuple[Any, ...]:
        resumed = self._is_resumed(request)
        n = max(int(request.num_tokens), 1)
        fraction = 0.0 if resumed else min(self.saved_tokens(request), n) / n
        return (
            request.priority if self._by_priority else 0,
            0 if resumed else 1,
            request.arrival_time - self.max_delay_s * fraction,
            request.arrival_time,
            request.request_id,
        )

    def _score(self, request: Request) -> int:
        try:
            return max(int(self._estimate(request)), 0)
        except Exception as e:  # noqa: BLE001 - ranking never raises into the engine
            ERRORS.labels("estimate").inc()
            log.warning(
                "kvplug scheduler: hit estimate for %s failed (%s: %s); ranked as cold",
                request.request_id,
                type(e).__name__,
                e,
            )
            return 0

    def _build(self) -> list[Request]:
        now = self._clock()
        for request, s in self._scores.items():
            if now - s.at >= self.rescore_interval_s:
                s.saved, s.at = self._score(request), now
        self._order = sorted(self._scores, key=self.rank_key)
        self._built_at = now
        return self._order

    def _current(self, refresh: bool) -> list[Request]:
        if self._order is None or (refresh and self._clock() - self._built_at >= self.rescore_interval_s):
            return self._build()
        return self._order

    def oldest_arrival(self) -> float:
        """The earliest arrival time among waiting requests (inf when empty)."""
        return min((r.arrival_time for r in self._scores), default=math.inf)

    # -- RequestQueue ---------------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        score = self._known.get(request)
        if score is None:
            score = self._known[request] = _Score()
        self._scores[request] = score
        self._order = None

    def pop_request(self) -> Request:
        order = self._current(refresh=False)
        if not order:
            raise IndexError("pop from an empty queue")
        request = order.pop(0)
        del self._scores[request]
        return request

    def peek_request(self) -> Request:
        order = self._current(refresh=True)
        if not order:
            raise IndexError("peek from an empty queue")
        return order[0]

    def prepend_request(self, request: Request) -> None:
        """vLLM puts preempted and skipped requests back this way; their rank decides (preempted ones come first)."""
        self.add_request(request)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.add_request(request)

    def remove_request(self, request: Request) -> None:
        if request not in self._scores:
            raise ValueError(f"request {request.request_id} is not in the queue")
        del self._scores[request]
        if self._order is not None:
            self._order.remove(request)

    def remove_requests(self, requests: Iterable[Request]) -> None:
        gone = set(requests)
        for request in gone:
            self._scores.pop(request, None)
        if self._order is not None:
            self._order = [r for r in self._order if r not in gone]

    def __bool__(self) -> bool:
        return bool(self._scores)

    def __len__(self) -> int:
        return len(self._scores)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._current(refresh=False)))


@dataclass
class SchedulerStats:
    """What the cache-aware scheduler did, in this engine process (also exported as Prometheus metrics)."""

    admitted: int = 0  # first admissions
    ahead: int = 0  # ... while an earlier arrival was still waiting
    late: int = 0  # ... after waiting more than max_delay_s (the engine was full, not the ranking)
    max_wait_s: float = 0.0
    order: deque[str] = field(default_factory=lambda: deque(maxlen=4096))  # recent first admissions, in order


class CacheAwareScheduler(Scheduler):  # type: ignore[misc,valid-type]
    """vLLM's scheduler with a cache-aware waiting queue (KVShare, Yang et al., arXiv 2503.16525). Everything else
    (budgets, preemption, the connector protocol) is vLLM's own code. Picks the async variant by itself when the
    engine schedules asynchronously (the default on GPUs)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> CacheAwareScheduler:
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        sched_cfg = getattr(vllm_config, "scheduler_config", None)
        if cls is CacheAwareScheduler and getattr(sched_cfg, "async_scheduling", False):
            cls = CacheAwareAsyncScheduler
        return super().__new__(cls)  # type: ignore[no-any-return]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _compat.require_tested("cache-aware scheduler")
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        self.cache_aware = CacheAwareConfig.from_vllm_config(vllm_config)  # a bad config fails before the engine
        super().__init__(*args, **kwargs)
        estimate = getattr(self.connector, "estimated_hit_tokens", None) if self.cache_aware.use_connector else None
        self._connector_estimate: Callable[[Request], int] | None = estimate if callable(estimate) else None
        self.kvplug_stats = SchedulerStats()
        self._queue = CacheAwareQueue(
            self.estimate_saved_tokens,
            max_delay_s=self.cache_aware.max_delay_s,
            rescore_interval_s=self.cache_aware.rescore_interval_s,
            by_priority=_compat.uses_priority_policy(self),
        )
        _compat.install_waiting_queue(self, self._queue)
        log.info(
            "kvplug: cache-aware scheduler on (max_delay_s=%g, hits from vLLM's prefix cache%s)",
            self.cache_aware.max_delay_s,
            " and the kvplug connector" if self._connector_estimate else "",
        )

    def estimate_saved_tokens(self, request: Request) -> int:
        """Prompt tokens a cache can serve for ``request``: the longer of vLLM's prefix-cache hit and the kvplug
        connector's stored tokens (both are prefixes of the prompt for prefix reuse, so they overlap)."""
        if getattr(request, "skip_reading_prefix_cache", False):
            return 0  # vLLM reads neither cache for it (prompt logprobs, some pooling requests)
        local = _compat.local_prefix_hit_tokens(self.kv_cache_manager, request)
        external = int(self._connector_estimate(request)) if self._connector_estimate is not None else 0
        return max(local, external)

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        out = super().schedule(*args, **kwargs)
        if out.scheduled_new_reqs:
            try:
                self._record_admissions(out)
            except Exception as e:  # noqa: BLE001 - statistics never break a step
                ERRORS.labels("stats").inc()
                log.warning("kvplug scheduler: admission stats failed (%s: %s)", type(e).__name__, e)
        return out

    def _record_admissions(self, out: SchedulerOutput) -> None:
        now = time.time()  # arrival_time is wall-clock time (set by vLLM's frontend)
        oldest_waiting = self._queue.oldest_arrival()
        st = self.kvplug_stats
        for new in out.scheduled_new_reqs:
            request = self.requests.get(new.req_id)
            if request is None or request.num_preemptions:
                continue  # resumed after a preemption: not a first admission
            wait = max(now - request.arrival_time, 0.0)
            QUEUE_WAIT.observe(wait)
            st.admitted += 1
            st.max_wait_s = max(st.max_wait_s, wait)
            st.order.append(new.req_id)
            if wait > self.cache_aware.max_delay_s:
                st.late += 1
                LATE.inc()
            if oldest_waiting < request.arrival_time:
                st.ahead += 1
                ADMISSIONS.labels("ahead").inc()
            else:
                ADMISSIONS.labels("in_order").inc()


class CacheAwareAsyncScheduler(CacheAwareScheduler, AsyncScheduler):  # type: ignore[misc,valid-type]
    """The cache-aware queue on vLLM's ``AsyncScheduler`` (chosen by ``CacheAwareScheduler`` itself when the
    engine schedules asynchronously)."""
