"""KVPlugConnector: vLLM KV connector (KVConnectorBase_V1) for prefix reuse from kvplug stores.

Enable with::

    --kv-transfer-config '{"kv_connector":"KVPlugConnector","kv_role":"kv_both",
                           "kv_connector_extra_config":{"store":"redis://127.0.0.1:6379/0"}}'

Scheduler side: one batched ``contains`` per request (cached per request), whole-block matches, at least one
prompt token left to compute; the load and save plans travel to the worker in the connector metadata.
Worker side: loads decoded chunks into the paged KV blocks before the forward; after the forward, copies newly
completed chunks out of the paged blocks (the only work on the forward path) and encodes and stores them on a
background thread with a bounded queue (full: dropped and counted). A chunk that is missing, refused (checksum,
codec, shape...) or unreachable reports its blocks through ``get_block_ids_with_load_errors`` so vLLM recomputes
them: a miss, never a wrong answer.

Per request (``SamplingParams(extra_args={"kv_transfer_params": {...}})`` or the HTTP body field
``kv_transfer_params``): ``skip_load``, ``skip_save`` (booleans) and ``tenant_salt`` (string).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvplug import metrics
from kvplug.cache import KVCache
from kvplug.chunks import Chunk, Namespace
from kvplug.config import KVPlugConfig
from kvplug.connectors import ChunkStore, open_store
from kvplug.errors import ConfigError
from kvplug.integrations.vllm.layouts import LayoutAdapter, adapter_for, token_slots
from kvplug.integrations.vllm.stats import FIELDS as STAT_FIELDS
from kvplug.integrations.vllm.stats import KVPlugPromMetrics, KVPlugStats
from kvplug.worker import BoundedWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvplug.vllm")
ENGINE = "vllm"
REQUEST_OPTIONS = {"skip_load", "skip_save", "tenant_salt"}
# kv_connector_extra_config keys read by the connector itself rather than KVPlugConfig
_CONNECTOR_EXTRA = {"load_failure_policy"}

_STORES: dict[str, ChunkStore] = {}
_STORES_LOCK = threading.Lock()


def shared_store(cfg: KVPlugConfig) -> ChunkStore:
    """One store per URL per process, so a scheduler and a worker in one process share a memory tier."""
    key = "|".join(cfg.store_urls)
    with _STORES_LOCK:
        if key not in _STORES or _STORES[key].closed:
            _STORES[key] = open_store(cfg.store_urls, queue_size=cfg.write_queue_size, promote=cfg.promote_on_hit)
        return _STORES[key]


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
    """Load tokens [start, end) into ``block_ids``; ``tokens`` runs to the end of the last chunk touched."""

    req_id: str
    tokens: list[int]
    salt: str
    start: int
    end: int
    block_ids: list[int]


@dataclass
class SaveSpec:
    """Save the chunks with indices ``chunk_ids`` of ``tokens`` from ``block_ids``."""

    req_id: str
    tokens: list[int]
    salt: str
    chunk_ids: list[int]
    block_ids: list[int]


@dataclass
class KVPlugMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _ReqState:
    """Scheduler-side state of one request."""

    request: Request
    opts: RequestOptions
    stored_chunks: int = 0  # leading chunks the store held at lookup
    load_end: int = 0  # tokens the connector offered (0: none)
    load_start: int = 0
    block_ids: list[int] = field(default_factory=list)
    saved_upto: int = 0  # chunks known stored or queued for saving


class KVPlugConnector(KVConnectorBase_V1):
    """kvplug's vLLM connector (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        raw_extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = KVPlugConfig.load({k: v for k, v in raw_extra.items() if k not in _CONNECTOR_EXTRA})
        policy = raw_extra.get("load_failure_policy", "recompute")
        if policy not in ("recompute", "fail"):
            raise ConfigError(f"load_failure_policy must be 'recompute' or 'fail', got {policy!r}")
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
        self.store = shared_store(self.config)
        self._caches: dict[str, KVCache] = {}
        # scheduler side
        self._reqs: dict[str, _ReqState] = {}
        # worker side
        self._kv_caches: list[torch.Tensor] = []
        self._adapter: LayoutAdapter | None = None
        self._load_errors: set[int] = set()
        self._saver: BoundedWorker[tuple[KVCache, list[tuple[Chunk, torch.Tensor]]]] = BoundedWorker(
            "kvplug-vllm-save", self._save, self.config.write_queue_size
        )
        self._stats = dict.fromkeys(STAT_FIELDS, 0)
        self._stats_lock = threading.Lock()
        log.info(
            "kvplug connector (%s): store %s, codec %s, chunk %d",
            role.name,
            self.config.store_urls,
            self.config.codec,
            self.config.chunk_size,
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
        if salt not in self._caches:
            ns = self.base_namespace
            if salt:
                ns = replace(ns, tenant_salt=f"{ns.tenant_salt}\x00{salt}")
            self._caches[salt] = KVCache(self.store, ns, partial=self.config.partial_chunk)  # type: ignore[arg-type]
        return self._caches[salt]

    # ---- scheduler side ----------------------------------------------------------------------------------
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
            if not opts.skip_load and tokens:
                cache = self._cache(opts.tenant_salt)
                chunks = cache.chunks(tokens)
                st.stored_chunks = self.store.contains([c.prefix_key for c in chunks])
                st.saved_upto = st.stored_chunks
                hit = chunks[st.stored_chunks - 1].end if st.stored_chunks else 0
                # whole blocks only, and at least one prompt token left to compute
                st.load_end = min(hit, (len(tokens) - 1) // self.block_size * self.block_size)
                metrics.CONNECTOR_LOOKUP_TOKENS.labels(ENGINE).inc(len(tokens))
                metrics.CONNECTOR_HIT_TOKENS.labels(ENGINE).inc(hit)
        if st.opts.skip_load or st.load_end <= num_computed_tokens:
            return 0, False
        return st.load_end - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens > 0:
            st.load_start = st.load_end - num_external_tokens
        else:
            st.load_start = st.load_end  # nothing to load (a local prefix-cache hit covered it)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVPlugMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._plan_load(meta, st)
            self._plan_save(meta, st, new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids else []
                self._plan_load(meta, st)  # a preempted request resumes in new blocks: load them again
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            self._plan_save(meta, st, cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id])
        return meta

    def _plan_load(self, meta: KVPlugMetadata, st: _ReqState) -> None:
        """Queue the load vLLM was promised in update_state_after_alloc (once per allocation)."""
        if st.load_start >= st.load_end:
            return
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
                list(st.block_ids),
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
                SaveSpec(req.request_id, tokens[: spans[ready[-1]][1]], st.opts.tenant_salt, ready, list(st.block_ids))
            )
            st.saved_upto = ready[-1] + 1

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        return False, None

    # ---- worker side -------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from kvplug.integrations.vllm._compat import attention_backend_and_isa

        self._kv_caches = list(kv_caches.values())
        if len(self._kv_caches) != self.base_namespace.num_layers:
            raise ConfigError(
                f"kvplug: {len(self._kv_caches)} KV layers registered, namespace says {self.base_namespace.num_layers}"
            )
        backend, isa = attention_backend_and_isa(self._vllm_config, self._kv_caches[0])
        self._adapter = adapter_for(backend, self.base_namespace.head_dim, isa)
        for t in self._kv_caches:
            self._adapter.check(t)
        log.info(
            "kvplug: %d KV layers %s, backend %s (%s), layout adapter %s",
            len(self._kv_caches),
            tuple(self._kv_caches[0].shape),
            backend,
            isa,
            self._adapter.name,
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPlugMetadata)
        for spec in meta.loads:
            self._load(spec)

    def _load(self, spec: LoadSpec) -> None:
        assert self._adapter is not None
        t0 = time.perf_counter()
        cache = self._cache(spec.salt)
        chunks = [c for c in cache.chunks(spec.tokens) if c.end > spec.start and c.start < spec.end]
        blocks = torch.tensor(spec.block_ids, dtype=torch.long)
        got = cache.get_chunks(chunks)
        loaded_to = spec.start
        for c, kv in zip(chunks, got, strict=True):
            if kv is None:
                break
            lo, hi = max(spec.start, c.start), min(spec.end, c.end)
            b, o = token_slots(blocks, lo, hi, self.block_size)
            try:
                for layer, cache_t in enumerate(self._kv_caches):
                    self._adapter.scatter(
                        cache_t,
                        b.to(cache_t.device),
                        o.to(cache_t.device),
                        kv[layer, :, lo - c.start : hi - c.start].to(cache_t.device),
                    )
            except (RuntimeError, ValueError) as e:
                log.error("kvplug: writing chunk %d of request %s failed: %s", c.index, spec.req_id, e)
                metrics.CONNECTOR_ERRORS.labels(ENGINE, "scatter").inc()
                break
            loaded_to = hi
        if loaded_to < spec.end:
            first, last = loaded_to // self.block_size, -(-spec.end // self.block_size)
            self._load_errors.update(spec.block_ids[first:last])
            metrics.CONNECTOR_ERRORS.labels(ENGINE, "load_miss").inc()
            log.warning(
                "kvplug: request %s: loaded %d of %d tokens; vLLM recomputes the rest",
                spec.req_id,
                loaded_to - spec.start,
                spec.end - spec.start,
            )
        seconds = time.perf_counter() - t0
        metrics.CONNECTOR_LOADED_TOKENS.labels(ENGINE).inc(loaded_to - spec.start)
        metrics.CONNECTOR_LOAD_SECONDS.labels(ENGINE).observe(seconds)
        self._record(loaded_tokens=loaded_to - spec.start, load_seconds=seconds, load_errors=int(loaded_to < spec.end))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return None  # whole chunks are copied out in wait_for_save, after every layer ran

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPlugMetadata) and self._adapter is not None
        for spec in meta.saves:
            cache = self._cache(spec.salt)
            chunks = cache.chunks(spec.tokens)
            blocks = torch.tensor(spec.block_ids, dtype=torch.long)
            pairs = []
            for i in spec.chunk_ids:
                c = chunks[i]
                b, o = token_slots(blocks, c.start, c.end, self.block_size)
                # the only copy on the forward path: out of the paged blocks, which vLLM may reuse next step
                kv = torch.stack(
                    [self._adapter.gather(t, b.to(t.device), o.to(t.device)).cpu() for t in self._kv_caches]
                )
                pairs.append((c, kv))
            self._enqueue_save(cache, pairs)

    def _enqueue_save(self, cache: KVCache, pairs: list[tuple[Chunk, torch.Tensor]]) -> None:
        if not self._saver.submit((cache, pairs)):
            metrics.CONNECTOR_ERRORS.labels(ENGINE, "save_queue_full").inc()
            self._record(save_errors=len(pairs))

    def _save(self, job: tuple[KVCache, list[tuple[Chunk, torch.Tensor]]]) -> None:
        """On the background thread: encode and store; a failure is a future miss, never an engine crash."""
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
        self.flush_saves(timeout=30.0)
        self._saver.close()
