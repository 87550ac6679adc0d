"""KVPlugConnector: vLLM KV connector (KVConnectorBase_V1) for prefix reuse from kvplug stores.

Enable with::

    --kv-transfer-config '{"kv_connector":"KVPlugConnector","kv_role":"kv_both",
                           "kv_connector_extra_config":{"store":"redis://127.0.0.1:6379/0"}}'

Scheduler side: one batched ``contains`` per request (cached per request, bounded by ``lookup_timeout``), whole-block
matches, at least one prompt token left to compute; the load and save plans travel to the worker in the connector
metadata. Worker side: loads chunks into the paged KV blocks before the forward through a pipeline (a background
thread fetches and verifies chunk i+1 while chunk i is written, all layers of a chunk in one pass), bounded by
``load_timeout``; with ``async_load`` the load runs between engine steps and the request waits in vLLM's
``WAITING_FOR_REMOTE_KVS`` state, so a long load never stalls the other requests of a batch. After the forward,
newly completed chunks are copied out of the paged blocks (the only save work on the forward path) and encoded and
stored on a background thread with a queue bounded in jobs and bytes (full: dropped and counted).

A chunk that is missing, refused (checksum, MAC, codec, shape...), late or unreachable reports its blocks through
``get_block_ids_with_load_errors`` so vLLM recomputes them: a miss, never a wrong answer. No exception from kvplug
reaches the engine: every hook catches, counts (``kvplug_connector_errors{kind}``) and falls back to "no reuse".

Per request (``SamplingParams(extra_args={"kv_transfer_params": {...}})`` or the HTTP body field
``kv_transfer_params``): ``skip_load``, ``skip_save`` (booleans) and ``tenant_salt`` (string).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from kvplug import metrics
from kvplug.cache import KVCache
from kvplug.chunks import Chunk, Namespace
from kvplug.config import KVPlugConfig
from kvplug.connectors import ChunkStore, open_store
from kvplug.errors import ConfigError
from kvplug.integrations.vllm.blend import runtime as blend_runtime
from kvplug.integrations.vllm.blend.plan import BlendConfig, BlendSpec
from kvplug.integrations.vllm.blend.sides import BlendLoader, BlendPlanner, refuse
from kvplug.integrations.vllm.layouts import adapter_for
from kvplug.integrations.vllm.loading import ChunkLoader, LoadProfile, LoadResult, PagedKV
from kvplug.integrations.vllm.stats import FIELDS as STAT_FIELDS
from kvplug.integrations.vllm.stats import KVPlugPromMetrics, KVPlugStats
from kvplug.payload import mac_key_of
from kvplug.redact import redact_all
from kvplug.worker import BoundedWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvplug.vllm")
ENGINE = "vllm"
REQUEST_OPTIONS = {"skip_load", "skip_save", "tenant_salt"}
# kv_connector_extra_config keys read by the connector itself rather than KVPlugConfig
_CONNECTOR_EXTRA = {"load_failure_policy", "async_load", "load_pipeline", "blend"}
R = TypeVar("R")

_STORES: dict[str, ChunkStore] = {}
_STORES_LOCK = threading.Lock()


def shared_store(cfg: KVPlugConfig) -> ChunkStore:
    """One store per URL per process, so a scheduler and a worker in one process share a memory tier."""
    key = "|".join(cfg.store_urls)
    with _STORES_LOCK:
        if key not in _STORES or _STORES[key].closed:
            _STORES[key] = open_store(cfg.store_urls, queue_size=cfg.write_queue_size, promote=cfg.promote_on_hit)
        return _STORES[key]


def never_raises(kind: str, default: Any = None) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorator for engine-facing hooks: any exception is logged, counted as ``kind`` and answered by
    ``default`` (or by ``self._fallback_<kind>(...)`` when the connector defines one)."""

    def wrap(fn: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(fn)
        def guarded(self: KVPlugConnector, *args: Any, **kwargs: Any) -> R:
            try:
                return fn(self, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - the engine never sees a kvplug exception
                metrics.CONNECTOR_ERRORS.labels(ENGINE, kind).inc()
                log.error("kvplug: %s failed (%s: %s); continuing without KV reuse", fn.__name__, type(e).__name__, e)
                fallback = getattr(self, f"_fallback_{kind}", None)
                if fallback is None:
                    return default
                try:
                    return fallback(*args, **kwargs)
                except Exception as e2:  # noqa: BLE001
                    log.critical("kvplug: %s fallback failed too (%s: %s)", fn.__name__, type(e2).__name__, e2)
                    return default

        return guarded

    return wrap


@dataclass(frozen=True)
class RequestOptions:
    skip_load: bool = False
    skip_save: bool = False
    tenant_salt: str = ""

    @classmethod
    def parse(cls, params: dict[str, Any] | None) -> RequestOptions:
        params = params or {}
        if not isinstance(params, dict):
            raise ConfigError("kv_transfer_params must be an object")
        unknown = {k for k in params if k.startswith(("skip_", "tenant")) and k not in REQUEST_OPTIONS}
        if unknown:
            raise ConfigError(
                f"kv_transfer_params: unknown kvplug option(s) {sorted(unknown)}; known: {sorted(REQUEST_OPTIONS)}"
            )
        for name in ("skip_load", "skip_save"):
            if name in params and not isinstance(params[name], bool):
                raise ConfigError(f"kv_transfer_params.{name} must be true or false")
        salt = params.get("tenant_salt", "")
        if not isinstance(salt, str):
            raise ConfigError("kv_transfer_params.tenant_salt must be a string")
        return cls(bool(params.get("skip_load", False)), bool(params.get("skip_save", False)), salt)


@dataclass
class LoadSpec:
    """Load tokens [start, end) into ``block_ids`` (one list per KV cache group); ``tokens`` runs to the end of
    the last chunk touched."""

    req_id: str
    tokens: list[int]
    salt: str
    start: int
    end: int
    block_ids: list[list[int]]
    is_async: bool = False


@dataclass
class SaveSpec:
    """Save the chunks with indices ``chunk_ids`` of ``tokens`` from ``block_ids`` (one list per group)."""

    req_id: str
    tokens: list[int]
    salt: str
    chunk_ids: list[int]
    block_ids: list[list[int]]


@dataclass
class KVPlugMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    blends: list[BlendSpec] = field(default_factory=list)


@dataclass
class _ReqState:
    """Scheduler-side state of one request."""

    request: Request
    opts: RequestOptions
    stored_chunks: int = 0  # leading chunks the store held at lookup
    load_end: int = 0  # tokens the connector offered (0: none)
    load_start: int = 0
    load_blocks: list[list[int]] = field(default_factory=list)  # per group: the request's blocks at the load's plan
    block_ids: list[list[int]] = field(default_factory=list)  # per group: blocks known to the save planner
    saved_upto: int = 0  # chunks known stored or queued for saving
    blend: BlendSpec | None = None  # a blend plan waiting for the request's (one, whole-prompt) step


class KVPlugConnector(KVConnectorBase_V1, SupportsHMA):
    """kvplug's vLLM connector (see the module docstring).

    Hybrid models (sliding-window layers, e.g. Gemma-3) run with vLLM's hybrid KV cache manager on: payloads stay
    all layers in model order; loads write each group's layers into that group's blocks and skip the null blocks
    of out-of-window positions; a chunk whose sliding-window blocks are gone is not saved. With several groups a
    failed load can only be reported per request, so loads are asynchronous there and a failed one is recomputed
    whole."""

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save dropped by a preemption is a future miss, not a lost hand-off

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        raw_extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = KVPlugConfig.load({k: v for k, v in raw_extra.items() if k not in _CONNECTOR_EXTRA})
        policy = raw_extra.get("load_failure_policy", "recompute")
        if policy not in ("recompute", "fail"):
            raise ConfigError(f"load_failure_policy must be 'recompute' or 'fail', got {policy!r}")
        self.async_load = _flag(raw_extra, "async_load", False)
        self.num_groups = _check_groups(kv_cache_config)
        if self.num_groups > 1 and not self.async_load:
            # vLLM cannot take block-level load errors with several KV cache groups (it raises); request-level
            # failures exist for asynchronous loads only
            log.info("kvplug: %d KV cache groups (hybrid model): loads are asynchronous", self.num_groups)
            self.async_load = True
        self.load_pipeline = _flag(raw_extra, "load_pipeline", True)
        # vLLM's default fails a request whose KV load failed; for a cache a failed load is a miss. The scheduler
        # reads this field after it has built its connector, so setting it here takes effect.
        self._kv_transfer_config.kv_load_failure_policy = policy
        self.block_size = vllm_config.cache_config.block_size
        if self.config.chunk_size % self.block_size:
            raise ConfigError(
                f"kvplug chunk_size {self.config.chunk_size} must be a multiple of the engine's "
                f"block size {self.block_size}"
            )
        self.base_namespace = self._namespace(vllm_config, kv_cache_config)
        if not isinstance(getattr(torch, self.base_namespace.dtype, None), torch.dtype):
            raise ConfigError(
                f"kvplug: KV cache dtype {self.base_namespace.dtype!r} is not supported yet "
                "(supported: the model dtype, i.e. kv_cache_dtype 'auto')"
            )
        self.blend_config = BlendConfig.parse(raw_extra.get("blend"), where="kv_connector_extra_config.blend")
        self.blend_supported = self._check_blend(vllm_config)
        self._planner = BlendPlanner(self.blend_config, vllm_config, self.config.lookup_timeout)
        self._blend_loader: BlendLoader | None = None
        self.store = shared_store(self.config)
        self.mac_key = mac_key_of(self.config.payload_secret)
        self._caches: OrderedDict[str, KVCache] = OrderedDict()
        self._caches_lock = threading.Lock()
        # scheduler side
        self._reqs: dict[str, _ReqState] = {}
        # worker side
        self._paged: PagedKV | None = None
        self._loader: ChunkLoader | None = None
        self._load_errors: set[int] = set()
        self._failed_recv: set[str] = set()
        self._async_pool: ThreadPoolExecutor | None = None
        self._async_loads: dict[str, tuple[LoadSpec, Future[LoadResult]]] = {}
        self._saver: BoundedWorker[Any] = BoundedWorker(
            "kvplug-vllm-save", self._save, self.config.write_queue_size, self.config.write_queue_bytes
        )
        self._stats = dict.fromkeys(STAT_FIELDS, 0)
        self._stats_lock = threading.Lock()
        self.last_load: LoadProfile | None = None
        log.info(
            "kvplug connector (%s): store %s, codec %s, chunk %d, payloads %s, loads %s",
            role.name,
            redact_all(self.config.store_urls),
            self.config.codec,
            self.config.chunk_size,
            "authenticated" if self.mac_key else "checksummed",
            "async" if self.async_load else "sync",
        )

    # ---- shared ------------------------------------------------------------------------------------------
    def _namespace(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> Namespace:
        mc = vllm_config.model_config
        pc = vllm_config.parallel_config
        cache_dtype = vllm_config.cache_config.cache_dtype
        dtype = str(mc.dtype).removeprefix("torch.") if cache_dtype in (None, "auto") else str(cache_dtype)
        layers = sum(len(g.layer_names) for g in kv_cache_config.kv_cache_groups)
        hf = mc.hf_text_config
        rope = {
            k: str(getattr(hf, k))
            for k in ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings")
            if getattr(hf, k, None) is not None
        }
        return Namespace(
            model=self.config.model_id or mc.model,
            revision=mc.revision or "",
            dtype=dtype,
            num_layers=layers,
            num_kv_heads=mc.get_num_kv_heads(pc),
            head_dim=mc.get_head_size(),
            tp_rank=pc.rank % pc.tensor_parallel_size if self.role == KVConnectorRole.WORKER else 0,
            tp_size=pc.tensor_parallel_size,
            codec=self.config.codec,
            codec_params=Namespace.items(self.config.codec_params),
            rope=Namespace.items(rope),
            tenant_salt=self.config.tenant_salt,
            chunk_size=self.config.chunk_size,
        )

    def _cache(self, salt: str) -> KVCache:
        """The KVCache of one tenant; at most ``max_tenants`` are kept (least recently used dropped)."""
        with self._caches_lock:
            cache = self._caches.get(salt)
            if cache is None:
                ns = self.base_namespace
                if salt:
                    ns = replace(ns, tenant_salt=f"{ns.tenant_salt}\x00{salt}")
                cache = KVCache(self.store, ns, partial=self.config.partial_chunk, mac_key=self.mac_key)  # type: ignore[arg-type]
                self._caches[salt] = cache
                while len(self._caches) > self.config.max_tenants:
                    self._caches.popitem(last=False)
            else:
                self._caches.move_to_end(salt)
            return cache

    # ---- scheduler side ----------------------------------------------------------------------------------
    @never_raises("lookup", (0, False))
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._reqs.get(request.request_id)
        if st is None:
            try:
                opts = RequestOptions.parse(request.kv_transfer_params)
            except ConfigError as e:
                log.error("kvplug: request %s: %s; KV reuse disabled for it", request.request_id, e)
                metrics.CONNECTOR_ERRORS.labels(ENGINE, "bad_request_options").inc()
                opts = RequestOptions(skip_load=True, skip_save=True)
            st = _ReqState(request, opts)
            self._reqs[request.request_id] = st
            tokens = list(request.prompt_token_ids or [])
            st.blend = self._plan_blend(request, opts, num_computed_tokens)
            if st.blend is not None:
                # the whole prompt runs in one step through the blend model; no prefix load, no prefix save (its
                # blocks after the first reused segment are approximate)
                st.opts = replace(opts, skip_load=True, skip_save=True)
            elif not opts.skip_load and tokens:
                cache = self._cache(opts.tenant_salt)
                chunks = cache.chunks(tokens)
                # bounded: a hung store answers 0 after lookup_timeout and opens the store's breaker
                st.stored_chunks = self.store.contains(
                    [c.prefix_key for c in chunks], timeout=self.config.lookup_timeout
                )
                st.saved_upto = st.stored_chunks
                hit = chunks[st.stored_chunks - 1].end if st.stored_chunks else 0
                # whole blocks only, and at least one prompt token left to compute
                st.load_end = min(hit, (len(tokens) - 1) // self.block_size * self.block_size)
                metrics.CONNECTOR_LOOKUP_TOKENS.labels(ENGINE).inc(len(tokens))
                metrics.CONNECTOR_HIT_TOKENS.labels(ENGINE).inc(hit)
        if st.opts.skip_load or st.load_end <= num_computed_tokens:
            return 0, False
        return st.load_end - num_computed_tokens, self.async_load

    @never_raises("estimate", 0)
    def estimated_hit_tokens(self, request: Request) -> int:
        """Prompt tokens this connector expects to serve for ``request`` without computing them: the stored prefix,
        or for a blend request the tokens of its segments found in the store (an upper bound: a blend step still
        recomputes a fraction). One store lookup per request, cached for its lifetime; what a scheduler ranks by."""
        st = self._reqs.get(request.request_id)
        if st is None:
            self.get_num_new_matched_tokens(request, 0)  # the lookup vLLM would do anyway, done early and cached
            st = self._reqs.get(request.request_id)
        if st is None:
            return 0
        if st.blend is not None:
            return sum(s.end - s.start for s in st.blend.segments if s.found)
        return st.load_end

    @never_raises("alloc")
    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens > 0:
            st.load_start = st.load_end - num_external_tokens
            st.load_blocks = [list(ids) for ids in blocks.get_block_ids()]
        else:
            st.load_start = st.load_end  # nothing to load (a local prefix-cache hit covered it)

    def _fallback_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """A load was promised but cannot be planned: plan one that reports every promised block as failed."""
        st = self._reqs.get(request.request_id)
        if st is not None and num_external_tokens > 0:
            st.load_start = st.load_end - num_external_tokens
            st.load_blocks = [list(ids) for ids in blocks.get_block_ids()]
            st.request = request
            st.stored_chunks = -1  # marks the load as failed before it starts

    @never_raises("build_meta")
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVPlugMetadata()
        # loads first, for every request that got its blocks this step (sync and async alike)
        for st in self._reqs.values():
            if st.load_start < st.load_end:
                self._plan_load(meta, st)
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = [list(ids) for ids in new.block_ids]
            if st.blend is not None:
                spec, st.blend = st.blend, None
                if new.num_computed_tokens == 0 and scheduler_output.num_scheduled_tokens[new.req_id] == len(
                    spec.prompt
                ):
                    spec.block_ids = list(new.block_ids[0])
                    meta.blends.append(spec)
                else:
                    refuse("chunked")
                    log.warning("kvplug: request %s is prefilled in several steps: no blending", new.req_id)
            self._plan_save(meta, st, new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id])
        if meta.blends:
            from kvplug.integrations.vllm._compat import start_loads_before_forward

            start_loads_before_forward(scheduler_output)  # the blend plans must be active when the forward runs
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = [list(ids) for ids in new_ids] if new_ids else []
            elif new_ids:
                if not st.block_ids:
                    st.block_ids = [[] for _ in new_ids]
                for mine, more in zip(st.block_ids, new_ids, strict=True):
                    mine.extend(more)
            self._plan_save(meta, st, cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id])
        return meta

    def _fallback_build_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Planning failed: promised loads still go out (their blocks reported failed), saves are skipped."""
        meta = KVPlugMetadata()
        for st in self._reqs.values():
            if st.load_start < st.load_end:
                meta.loads.append(self._failed_load(st))
                st.load_start = st.load_end
        return meta

    def _failed_load(self, st: _ReqState) -> LoadSpec:
        rid = st.request.request_id
        return LoadSpec(rid, [], "", st.load_start, st.load_end, [list(b) for b in st.load_blocks], self.async_load)

    def _plan_load(self, meta: KVPlugMetadata, st: _ReqState) -> None:
        """Queue the load vLLM was promised in update_state_after_alloc (once per allocation)."""
        if st.stored_chunks < 0:
            meta.loads.append(self._failed_load(st))
        else:
            chunk = self.config.chunk_size
            tokens = list(st.request.prompt_token_ids or [])
            # whole chunks: the last one may be loaded only in part (load_end leaves a block to compute)
            meta.loads.append(
                LoadSpec(
                    st.request.request_id,
                    tokens[: -(-st.load_end // chunk) * chunk],
                    st.opts.tenant_salt,
                    st.load_start,
                    st.load_end,
                    [list(b) for b in st.load_blocks],
                    self.async_load,
                )
            )
        st.load_start = st.load_end

    def _plan_save(self, meta: KVPlugMetadata, st: _ReqState, computed_after: int) -> None:
        """Queue the chunks that this step completes (prompt chunks; generated ones with save_decode)."""
        if st.opts.skip_save:
            return
        req = st.request
        prompt = list(req.prompt_token_ids or [])
        tokens = list(req.all_token_ids) if self.config.save_decode else prompt
        # KV exists for the first computed_after tokens once this step ran
        tokens = tokens[: min(computed_after, len(tokens))]
        cache = self._cache(st.opts.tenant_salt)
        spans = cache.keyer.spans(len(tokens))
        whole_prompt = not self.config.save_decode and len(tokens) == len(prompt)
        if spans and spans[-1][1] - spans[-1][0] < self.config.chunk_size and not whole_prompt:
            spans = spans[:-1]  # a partial chunk ("keep") is saved only once, when the whole prompt is computed
        ready = list(range(st.saved_upto, len(spans)))
        if ready:
            meta.saves.append(
                SaveSpec(
                    req.request_id,
                    tokens[: spans[ready[-1]][1]],
                    st.opts.tenant_salt,
                    ready,
                    [list(b) for b in st.block_ids],
                )
            )
            st.saved_upto = ready[-1] + 1

    @never_raises("request_finished", (False, None))
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        return False, None

    @never_raises("request_finished", (False, None))
    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        return False, None

    @never_raises("connector_output")
    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """An async load is used once. vLLM asks for external tokens again only when a load left the request with
        nothing computed (it failed at its first block, or as a whole on hybrid models): the request is recomputed
        and must not be offered the same load again (that would loop forever on a lasting failure)."""
        done = set(connector_output.failed_recving or ()) | set(connector_output.finished_recving or ())
        for rid in done:
            st = self._reqs.get(rid)
            if st is not None:
                st.load_end = st.load_start = 0

    # ---- worker side -------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # not guarded: an unsupported layout must stop the engine at start-up with a clear message
        from kvplug.integrations.vllm._compat import attention_backend_and_isa, layer_index

        if len(kv_caches) != self.base_namespace.num_layers:
            raise ConfigError(
                f"kvplug: {len(kv_caches)} KV layers registered, namespace says {self.base_namespace.num_layers}"
            )
        index = {name: layer_index(name) for name in kv_caches}
        if any(i is None for i in index.values()):
            raise ConfigError(f"kvplug: cannot tell the model order of KV layers {sorted(kv_caches)[:4]}...")
        order = sorted(kv_caches, key=lambda n: index[n])  # model order: payloads never depend on vLLM's grouping
        position = {name: i for i, name in enumerate(order)}
        groups = [g.layer_names for g in self._kv_cache_config.kv_cache_groups]
        first = kv_caches[order[0]]
        backend, isa = attention_backend_and_isa(self._vllm_config, first)
        adapter = adapter_for(backend, self.base_namespace.head_dim, isa)
        for t in kv_caches.values():
            adapter.check(t)
        if self.blend_supported:
            from kvplug.integrations.vllm._compat import record_batch_order

            record_batch_order()  # the blend step maps its plans to batch rows by the runner's request order
        self._paged = PagedKV(
            [[kv_caches[n] for n in names] for names in groups],
            adapter,
            self.block_size,
            [[position[n] for n in names] for names in groups],
        )
        self._loader = ChunkLoader(self._paged, pipelined=self.load_pipeline)
        log.info(
            "kvplug: %d KV layers %s in %d group(s), backend %s (%s), layout adapter %s, %s writes",
            len(kv_caches),
            tuple(first.shape),
            len(groups),
            backend,
            isa,
            adapter.name,
            "stacked-layer" if all(v is not None for v in self._paged.stacked) else "per-layer",
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVPlugMetadata):
            return
        for spec in meta.loads:
            if spec.is_async:
                self._start_async(spec)
            else:
                self._finish_load(spec, self._run_load(spec))  # never raises
        if meta.blends:
            self._start_blends(meta.blends)

    def _run_load(self, spec: LoadSpec) -> LoadResult:
        """Load one request's KV; never raises (a failure is a result that loaded nothing)."""
        try:
            if not spec.tokens or self._loader is None:
                return LoadResult(spec.start, "error", LoadProfile())
            cache = self._cache(spec.salt)
            chunks = [c for c in cache.chunks(spec.tokens) if c.end > spec.start and c.start < spec.end]
            return self._loader.load(cache, chunks, spec.start, spec.end, spec.block_ids, self.config.load_timeout)
        except Exception as e:  # noqa: BLE001 - a failed load is a recompute, never an engine crash
            log.error("kvplug: loading request %s failed (%s: %s); recomputing", spec.req_id, type(e).__name__, e)
            return LoadResult(spec.start, "error", LoadProfile())

    def _finish_load(self, spec: LoadSpec, res: LoadResult) -> None:
        """Account for a load; blocks it did not fill are reported to vLLM, which recomputes them."""
        loaded = res.loaded_to - spec.start
        if res.loaded_to < spec.end:
            if self.num_groups == 1:
                first, last = res.loaded_to // self.block_size, -(-spec.end // self.block_size)
                self._load_errors.update(spec.block_ids[0][first:last])
            else:  # block ids overlap across groups: only a request-level failure (whole recompute) is possible
                self._failed_recv.add(spec.req_id)
                loaded = 0
            metrics.CONNECTOR_ERRORS.labels(ENGINE, f"load_{res.reason}").inc()
            log.warning(
                "kvplug: request %s: loaded %d of %d tokens (%s); vLLM recomputes the rest",
                spec.req_id,
                loaded,
                spec.end - spec.start,
                res.reason,
            )
        p = res.profile
        self.last_load = p
        metrics.CONNECTOR_LOADED_TOKENS.labels(ENGINE).inc(loaded)
        metrics.CONNECTOR_LOAD_SECONDS.labels(ENGINE).observe(p.total_s)
        for phase in ("fetch", "decode", "write", "wait"):
            metrics.CONNECTOR_LOAD_PHASE_SECONDS.labels(ENGINE, phase).inc(getattr(p, f"{phase}_s"))
        self._record(
            loaded_tokens=loaded,
            load_seconds=p.total_s,
            load_errors=int(res.loaded_to < spec.end),
            load_fetch_seconds=p.fetch_s,
            load_decode_seconds=p.decode_s,
            load_write_seconds=p.write_s,
            load_bytes=p.bytes,
        )

    def _start_async(self, spec: LoadSpec) -> None:
        """Start a load between engine steps; the request must be reported finished whatever happens (else it
        would wait forever), so a load that cannot even start is a finished, failed one."""
        try:
            if self._async_pool is None:
                self._async_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvplug-async-load")
            fut = self._async_pool.submit(self._run_load, spec)
        except Exception as e:  # noqa: BLE001
            log.error("kvplug: async load of %s did not start (%s); recomputing", spec.req_id, e)
            fut = Future()
            fut.set_result(LoadResult(spec.start, "error", LoadProfile()))
        self._async_loads[spec.req_id] = (spec, fut)

    @never_raises("get_finished", (None, None))
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Async loads that completed: their failed blocks go out with this same step (vLLM reads load errors
        right after this call)."""
        done = {rid for rid, (_, fut) in self._async_loads.items() if fut.done()}
        for rid in done:
            spec, fut = self._async_loads.pop(rid)
            self._finish_load(spec, fut.result())
        return None, (done or None)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Finished async loads, and (hybrid models) the ones that failed as a whole: vLLM recomputes those."""
        sending, recving = self.get_finished(finished_req_ids)
        failed, self._failed_recv = self._failed_recv, set()
        return KVConnectorTransferResults(
            finished_sending=set(sending or ()), finished_recving=set(recving or ()), failed_recving=failed
        )

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # sync loads complete in start_load_kv; async ones before the request is scheduled

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return None  # whole chunks are copied out in wait_for_save, after every layer ran

    # ---- blending -------------------------------------------------------------------------------------------
    def _check_blend(self, vllm_config: VllmConfig) -> bool:
        """Whether this engine can blend; with blending on engine-wide and ``unsupported: error`` (the default),
        an engine that cannot stops at start-up with the reason."""
        from kvplug.integrations.vllm import blend

        arch = (vllm_config.model_config.architectures or ["?"])[0]
        reasons = []
        if not blend.supports(arch):
            reasons.append(f"architecture {arch} (supported: {', '.join(blend.ARCHITECTURES)})")
        if not blend.enabled_by_env():
            reasons.append("KVPLUG_BLEND=off")
        pc = vllm_config.parallel_config
        if pc.tensor_parallel_size > 1 or pc.pipeline_parallel_size > 1:
            reasons.append("tensor or pipeline parallelism (selections would differ across ranks)")
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            reasons.append("a non-CPU platform (the blend step runs on CPU_ATTN in this version)")
        if reasons and self.blend_config is not None and self.blend_config.unsupported == "error":
            raise ConfigError("kvplug blending cannot run here: " + "; ".join(reasons))
        if self.blend_config is not None and not reasons:
            from kvplug.integrations.vllm._compat import require_tested

            require_tested("blending")
        elif reasons:
            log.info("kvplug: blending unavailable (%s)", "; ".join(reasons))
        return not reasons

    def _plan_blend(self, request: Request, opts: RequestOptions, num_computed: int) -> BlendSpec | None:
        try:
            cfg = self._planner.request_config(request.kv_transfer_params)
        except ConfigError as e:
            log.error("kvplug: request %s: %s; no blending for it", request.request_id, e)
            metrics.CONNECTOR_ERRORS.labels(ENGINE, "bad_request_options").inc()
            return None
        if cfg is None:
            return None
        if not self.blend_supported:
            refuse("unsupported")
            return None
        spec = self._planner.plan(request, cfg, self._cache(opts.tenant_salt), num_computed, self.block_size)
        if spec is not None:
            spec.salt = opts.tenant_salt
        return spec

    def _start_blends(self, specs: list[BlendSpec]) -> None:
        """Load each blend request's found segments and hand the plans to the blend model for this step."""
        if self._paged is None:
            return
        if self._blend_loader is None:
            self._blend_loader = BlendLoader(self._vllm_config, self.block_size)
            blend_runtime.set_paged_cache(self._paged)
        plans = []
        dtype = self._paged.layers[0].dtype
        for spec in specs:
            try:
                plans.append(self._blend_loader.load(spec, self._cache(spec.salt), dtype))
            except Exception as e:  # noqa: BLE001 - no plan: the request runs as a normal prefill
                metrics.CONNECTOR_ERRORS.labels(ENGINE, "blend_load").inc()
                log.error("kvplug: blend load of %s failed (%s: %s); full prefill", spec.req_id, type(e).__name__, e)
        blend_runtime.activate(plans)

    def _finish_blends(self, specs: list[BlendSpec]) -> None:
        """Account for this step's blend plans and store the segments computed in place."""
        plans = {p.req_id: p for p in blend_runtime.deactivate()}
        paged = self._paged
        if paged is None or self._blend_loader is None:
            return

        def read(slots: torch.Tensor) -> torch.Tensor:
            return torch.stack([paged.read_slots(i, slots).cpu() for i in range(paged.num_layers)])

        for spec in specs:
            plan = plans.get(spec.req_id)
            if spec.warm:
                metrics.BLEND_REQUESTS.labels("warm").inc()
            elif plan is not None and plan.ran and plan.fallback is None:
                metrics.BLEND_REQUESTS.labels("blended").inc()
                metrics.BLEND_TOKENS.labels("reused").inc(plan.reused_tokens)
                metrics.BLEND_TOKENS.labels("recomputed").inc(plan.recomputed)
                metrics.BLEND_TOKENS.labels("fresh").inc(len(spec.prompt) - plan.reused_tokens)
                self._record(blend_requests=1, blend_reused_tokens=plan.reused_tokens, blend_recomputed=plan.recomputed)
            else:
                reason = "not run" if plan is None or plan.fallback is None else plan.fallback
                metrics.BLEND_REQUESTS.labels("fallback").inc()
                if plan is None or not plan.fallback or "guard" not in reason:
                    metrics.BLEND_FALLBACKS.labels("not_blended").inc()
                log.info("kvplug: request %s ran as a full prefill (%s)", spec.req_id, reason)
            cache = self._cache(spec.salt)
            segs = self._blend_loader.store_missing(spec, plan, cache, read)
            if segs:
                self._enqueue_segments(cache, segs)

    def _enqueue_segments(self, cache: KVCache, segs: list[Any]) -> None:
        from kvplug.methods.blend import SegmentStore

        def put() -> None:
            store = SegmentStore(cache.store, cache.namespace, payloads=cache.payloads)
            for seg in segs:
                store.put(seg)

        nbytes = sum(s.kv.numel() * s.kv.element_size() for s in segs)
        if not self._saver.submit(put, nbytes):
            metrics.CONNECTOR_ERRORS.labels(ENGINE, "save_queue_full").inc()

    @never_raises("save")
    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVPlugMetadata) or self._paged is None:
            return
        if meta.blends:
            self._finish_blends(meta.blends)
        for spec in meta.saves:
            cache = self._cache(spec.salt)
            chunks = cache.chunks(spec.tokens)
            pairs = []
            bs = self.block_size
            for i in spec.chunk_ids:
                c = chunks[i]
                ids = [torch.tensor(g[c.start // bs : -(-c.end // bs)], dtype=torch.long) for g in spec.block_ids]
                # the only copy on the forward path: out of the paged blocks, which vLLM may reuse next step
                kv = self._paged.read(ids)
                if kv is None:  # a sliding-window group already dropped these tokens: nothing whole to save
                    metrics.CONNECTOR_ERRORS.labels(ENGINE, "save_out_of_window").inc()
                    break
                pairs.append((c, kv[:, :, : c.num_tokens].contiguous() if kv.shape[2] != c.num_tokens else kv))
            if pairs:
                self._enqueue_save(cache, pairs)

    def _enqueue_save(self, cache: KVCache, pairs: list[tuple[Chunk, torch.Tensor]]) -> None:
        nbytes = sum(kv.numel() * kv.element_size() for _, kv in pairs)
        if not self._saver.submit((cache, pairs), nbytes):
            metrics.CONNECTOR_ERRORS.labels(ENGINE, "save_queue_full").inc()
            self._record(save_errors=len(pairs))

    def _save(self, job: Any) -> None:
        """On the background thread: encode and store; a failure is a future miss, never an engine crash."""
        if callable(job):
            job()
            return
        cache, pairs = job
        t0 = time.perf_counter()
        try:
            stored = cache.put_chunks(pairs)
        except Exception:
            metrics.CONNECTOR_ERRORS.labels(ENGINE, "save_exception").inc()
            self._record(save_errors=len(pairs))
            raise
        if stored < len(pairs):
            metrics.CONNECTOR_ERRORS.labels(ENGINE, "save_failed").inc(len(pairs) - stored)
        saved = sum(c.num_tokens for c, _ in pairs) if stored == len(pairs) else 0
        seconds = time.perf_counter() - t0
        metrics.CONNECTOR_SAVED_TOKENS.labels(ENGINE).inc(saved)
        metrics.CONNECTOR_SAVE_SECONDS.labels(ENGINE).observe(seconds)
        self._record(saved_tokens=saved, save_seconds=seconds, save_errors=len(pairs) - stored)

    def flush_saves(self, timeout: float = 30.0) -> bool:
        """Wait until queued saves are stored (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        if not self._saver.flush(timeout):
            return False
        flush = getattr(self.store, "flush", None)
        return bool(flush(max(0.0, deadline - time.monotonic()))) if flush else True

    # ---- stats (vLLM's path to the API server's /metrics) ---------------------------------------------------
    def _record(self, **values: float) -> None:
        with self._stats_lock:
            for k, v in values.items():
                self._stats[k] += v

    def get_kv_connector_stats(self) -> KVPlugStats | None:
        with self._stats_lock:
            if not any(self._stats.values()):
                return None
            data, self._stats = self._stats, dict.fromkeys(STAT_FIELDS, 0)
        return KVPlugStats(data=data)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVPlugStats | None:
        return KVPlugStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[Any, Any],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVPlugPromMetrics:
        return KVPlugPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        try:
            self.flush_saves(timeout=30.0)
            self._saver.close()
            if self._loader is not None:
                self._loader.close()
            if self._async_pool is not None:
                self._async_pool.shutdown(wait=False, cancel_futures=True)
        except Exception as e:  # noqa: BLE001 - shutdown never raises into the engine
            log.error("kvplug: shutdown: %s: %s", type(e).__name__, e)


def _check_groups(kv_cache_config: KVCacheConfig) -> int:
    """The number of KV cache groups, after checking kvplug can serve them: full-attention and sliding-window
    groups of one block size (anything else stops the engine at start-up with this message)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    groups = kv_cache_config.kv_cache_groups
    sizes = set()
    for g in groups:
        spec = g.kv_cache_spec
        if not isinstance(spec, FullAttentionSpec | SlidingWindowSpec):
            raise ConfigError(
                f"kvplug: KV cache group of {type(spec).__name__} layers ({g.layer_names[:3]}...) is not supported "
                "(supported: full attention and sliding window)"
            )
        sizes.add(spec.block_size)
    if len(sizes) > 1:
        raise ConfigError(f"kvplug: KV cache groups with different block sizes {sorted(sizes)} are not supported")
    return len(groups)


def _flag(extra: dict[str, Any], name: str, default: bool) -> bool:
    from kvplug.config import parse_bool

    try:
        return parse_bool(extra.get(name, default))
    except ConfigError:
        raise ConfigError(f"kv_connector_extra_config.{name} must be true or false") from None
