"""The few vLLM facts the connector reads beyond the public KV connector API, in one place."""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger("kvplug.vllm")
TESTED_VLLM = ("0.32.0",)


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_version() -> bool:
    """Log a clear warning when the installed vLLM is not the version kvplug was tested with."""
    v = vllm_version().split("+")[0]
    if v not in TESTED_VLLM:
        log.warning(
            "kvplug was tested with vLLM %s; found %s. The connector uses the public KV connector API, "
            "but layouts may differ: run `kvplug doctor` and the kvplug tests before relying on it.",
            ", ".join(TESTED_VLLM),
            v,
        )
        return False
    return True


def attention_backend_and_isa(vllm_config: VllmConfig, kv_layer: torch.Tensor) -> tuple[str, str | None]:
    """(attention backend name, CPU ISA or None) of the model's attention layers."""
    ctx = vllm_config.compilation_config.static_forward_context
    names = set()
    for layer in ctx.values():
        backend = getattr(layer, "attn_backend", None)
        if backend is not None and getattr(layer, "kv_cache", None) is not None:
            names.add(backend.get_name())
    if len(names) != 1:
        raise NotImplementedError(f"kvplug: expected one attention backend, found {sorted(names) or 'none'}")
    name = names.pop()
    isa = None
    if name == "CPU_ATTN":
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        cc, mc = vllm_config.cache_config, vllm_config.model_config
        isa = _get_attn_isa(kv_layer.dtype, cc.block_size, mc.get_head_size(), cc.cache_dtype)
    return name, isa


# ---- sparse attention backend ----
# Private vLLM internals used by kvplug.integrations.vllm.sparse_backend (verified with vLLM 0.32.0, CPU_ATTN).
_BATCH = threading.local()


def track_runner_batches() -> None:
    """Wrap ``GPUModelRunner._build_attention_metadata`` (the CPU runner inherits it) so that, while attention
    metadata builders run, :func:`batch_requests` can see the runner whose batch it is: vLLM hands builders only
    tensors, and the sparse backend needs each row's request (its options and token ids). Idempotent; the wrapper
    only records and clears a thread-local reference around the original call."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._build_attention_metadata
    if getattr(original, "_kvplug_wrapped", False):
        return

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        _BATCH.runner = self
        try:
            return original(self, *args, **kwargs)
        finally:
            _BATCH.runner = None

    wrapper._kvplug_wrapped = True  # type: ignore[attr-defined]
    GPUModelRunner._build_attention_metadata = wrapper  # type: ignore[method-assign]


def batch_requests(num_rows: int) -> list[tuple[str, Any]] | None:
    """``(request id, CachedRequestState)`` of each row of the batch whose metadata is being built (rows follow
    ``input_batch.req_ids``); ``None`` outside a real batch (profiling and dummy runs, or rows that do not map)."""
    runner = getattr(_BATCH, "runner", None)
    if runner is None:
        return None
    ids = list(runner.input_batch.req_ids[:num_rows])
    if len(ids) != num_rows or any(i is None or i not in runner.requests for i in ids):
        return None
    return [(i, runner.requests[i]) for i in ids]


def live_request_ids() -> set[str] | None:
    """Ids of the requests the current runner still holds (finished ones are gone); ``None`` outside a batch."""
    runner = getattr(_BATCH, "runner", None)
    return None if runner is None else set(runner.requests)


def request_token_ids(state: Any) -> list[int]:
    """Prompt then output token ids of a runner request state (``CachedRequestState``)."""
    return list(state.prompt_token_ids or []) + list(state.output_token_ids or [])


def request_extra_args(state: Any) -> dict[str, Any]:
    """The request's ``SamplingParams.extra_args`` (``kv_transfer_params`` among them), as the worker's runner
    holds them; ``{}`` when none."""
    sp = getattr(state, "sampling_params", None)
    extra = getattr(sp, "extra_args", None)
    return extra if isinstance(extra, dict) else {}


def layer_index(layer_name: str) -> int | None:
    """The decoder-layer index in a vLLM attention layer name (``model.layers.7.self_attn.attn`` -> 7)."""
    from vllm.model_executor.models.utils import extract_layer_index

    try:
        return int(extract_layer_index(layer_name))
    except (AssertionError, ValueError):
        return None


def cpu_attn_isa(vllm_config: VllmConfig, dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The CPU_ATTN ISA (which fixes the KV block layout) for this dtype, block and head size."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return str(_get_attn_isa(dtype, block_size, head_size, vllm_config.cache_config.cache_dtype))


def cpu_scheduler_metadata(
    num_reqs: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    seq_lens: torch.Tensor,
    dtype: torch.dtype,
    query_start_loc: torch.Tensor,
    sliding_window: int,
    isa: str,
    kv_cache_dtype: str,
) -> torch.Tensor:
    """CPU_ATTN's work partition for one kernel call (``vllm._custom_ops.cpu_attn_get_scheduler_metadata``)."""
    from vllm import _custom_ops as ops
    from vllm import envs

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=num_reqs,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        seq_lens=seq_lens,
        dtype=dtype,
        query_start_loc=query_start_loc,
        causal=True,
        sliding_window_size=sliding_window,
        isa=isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=None,
        kv_cache_dtype=kv_cache_dtype,
    )


def cpu_paged_attention(**kwargs: Any) -> None:
    """CPU_ATTN's paged attention kernel (``vllm._custom_ops.cpu_attention_with_kv_cache``), keyword arguments as
    vLLM's own backend passes them; writes ``output`` in place."""
    from vllm import _custom_ops as ops

    ops.cpu_attention_with_kv_cache(**kwargs)


def override_cpu_attention(class_path: str) -> bool:
    """Make ``CPU_ATTN`` resolve to ``class_path`` (vLLM's attention-backend registry; CPU platform only).
    Idempotent; leaves someone else's override in place (returns False, with a warning)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    backend = AttentionBackendEnum.CPU_ATTN
    if backend.is_overridden():
        if backend.get_path() == class_path:
            return True
        log.warning("kvplug: CPU_ATTN is already overridden by %s; kvplug sparse attention is off", backend.get_path())
        return False
    register_backend(backend, class_path)
    return True


# ---- blending (kvplug.integrations.vllm.blend) ------------------------------------------------------------------
# Private vLLM internals used by the blend step (verified with vLLM 0.32.0, CPU_ATTN): the forward context's
# per-layer attention metadata and slot mappings (swapped for the layers that run on the selected rows only), the
# CPU attention metadata dataclass (rebuilt for those rows) and the batch's request order (the runner's
# ``input_batch.req_ids``, recorded by ``track_runner_batches``).


def require_tested(feature: str) -> None:
    """Stop with a clear error when ``feature`` (which reaches into vLLM internals) meets an untested vLLM;
    ``KVPLUG_ALLOW_UNTESTED_VLLM=1`` lets an operator try anyway."""
    import os

    v = vllm_version().split("+")[0]
    if v not in TESTED_VLLM and os.environ.get("KVPLUG_ALLOW_UNTESTED_VLLM") != "1":
        from kvplug.errors import ConfigError

        raise ConfigError(
            f"kvplug {feature} reaches into vLLM internals and was tested with vLLM {', '.join(TESTED_VLLM)}; "
            f"found {v}. Use a tested vLLM, or set KVPLUG_ALLOW_UNTESTED_VLLM=1 to try (and run kvplug's tests)."
        )


def start_loads_before_forward(scheduler_output: Any) -> None:
    """Make the worker call ``start_load_kv`` before this step's forward. vLLM 0.32 starts a step's loads after the
    forward unless the step has synchronous loads (``SchedulerOutput.has_sync_kv_loads``, set the same way by
    vLLM's own HiSparse connector); blend steps load nothing through vLLM yet need their plans in place first."""
    if not hasattr(scheduler_output, "has_sync_kv_loads"):
        return  # older vLLM: loads always start before the forward
    scheduler_output.has_sync_kv_loads = True


def record_batch_order() -> None:
    """Also remember the request order of the last batch whose attention metadata was built (the forward that
    follows runs that batch): the blend step maps its plans to batch rows with it. Idempotent."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    track_runner_batches()
    original = GPUModelRunner._build_attention_metadata
    if getattr(original, "_kvplug_order", False):
        return

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        _BATCH.order = list(self.input_batch.req_ids)
        return out

    wrapper._kvplug_wrapped = True  # type: ignore[attr-defined]
    wrapper._kvplug_order = True  # type: ignore[attr-defined]
    GPUModelRunner._build_attention_metadata = wrapper  # type: ignore[method-assign]


def last_batch_order() -> list[str]:
    """Request ids of the current batch in row order (empty before any batch)."""
    return list(getattr(_BATCH, "order", []) or [])


def forward_context() -> Any:
    from vllm.forward_context import get_forward_context

    return get_forward_context()


def layer_attention_metadata(ctx: Any, layer_name: str) -> Any:
    meta = ctx.attn_metadata
    if isinstance(meta, list):
        meta = meta[0]
    return meta[layer_name] if isinstance(meta, dict) else meta


def swap_layer_metadata(ctx: Any, layer_names: list[str], meta: Any, slots: torch.Tensor) -> dict[str, Any]:
    """Point ``layer_names`` at ``meta`` and ``slots`` in the forward context; returns what to restore."""
    saved: dict[str, Any] = {}
    attn = ctx.attn_metadata
    if isinstance(attn, list):
        attn = attn[0]
    for name in layer_names:
        saved[name] = (attn[name], ctx.slot_mapping.get(name))
        attn[name] = meta
        ctx.slot_mapping[name] = slots
    return saved


def restore_layer_metadata(ctx: Any, saved: dict[str, Any]) -> None:
    attn = ctx.attn_metadata
    if isinstance(attn, list):
        attn = attn[0]
    for name, (meta, slots) in saved.items():
        attn[name] = meta
        if slots is None:
            ctx.slot_mapping.pop(name, None)
        else:
            ctx.slot_mapping[name] = slots


def cpu_rows_metadata(
    meta: Any,
    vllm_config: VllmConfig,
    query_lens: list[int],
    seq_lens: list[int],
    table_rows: list[int],
    slots: torch.Tensor,
) -> Any:
    """CPU_ATTN metadata for a reduced batch of pseudo-sequences (each a run of selected tokens of one request:
    query length = run length, sequence length = last position + 1, the request's block-table row), with the
    scheduler metadata rebuilt by vLLM's own helper. ``meta`` is the step's metadata (its class and extra fields
    are kept)."""
    import dataclasses

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    if not isinstance(meta, CPUAttentionMetadata):
        raise NotImplementedError(f"kvplug blending runs on CPU_ATTN only (this step uses {type(meta).__name__})")
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    qsl = torch.zeros(len(query_lens) + 1, dtype=meta.query_start_loc.dtype)
    qsl[1:] = torch.tensor(query_lens, dtype=qsl.dtype).cumsum(0)
    sl = torch.tensor(seq_lens, dtype=meta.seq_lens.dtype)
    table = meta.block_table[torch.tensor(table_rows, dtype=torch.long)]
    head_dim = mc.get_head_size()
    isa = cpu_attn_isa(vllm_config, mc.dtype, cc.block_size, head_dim)
    sched = cpu_scheduler_metadata(
        num_reqs=len(query_lens),
        num_heads=mc.get_num_attention_heads(pc),
        num_kv_heads=mc.get_num_kv_heads(pc),
        head_dim=head_dim,
        seq_lens=sl,
        dtype=mc.dtype,
        query_start_loc=qsl,
        sliding_window=-1,
        isa=isa,
        kv_cache_dtype=cc.cache_dtype,
    )
    return dataclasses.replace(
        meta,
        num_actual_tokens=int(qsl[-1]),
        max_query_len=max(query_lens),
        query_start_loc=qsl,
        max_seq_len=max(seq_lens),
        seq_lens=sl,
        block_table=table,
        slot_mapping=slots,
        scheduler_metadata=sched,
        use_sdpa_prefill=False,
        num_decode_tokens=0,
        sdpa_attn_masks=None,
        sdpa_start_loc=None,
    )


def register_model_class(architecture: str, class_path: str) -> bool:
    """Make ``architecture`` resolve to ``class_path`` in vLLM's model registry (out-of-tree model classes, a
    public plugin API). Idempotent; False when vLLM does not know the architecture."""
    from vllm import ModelRegistry

    if architecture not in ModelRegistry.get_supported_archs():
        return False
    ModelRegistry.register_model(architecture, class_path)
    return True


# ---- cache-aware scheduler ----
# Private vLLM internals used by kvplug.integrations.vllm.scheduler (verified with vLLM 0.32.0; vLLM itself calls
# its scheduler interface "not public"): the Scheduler/AsyncScheduler base classes and the RequestQueue ABC, the
# ``waiting`` queue attribute the subclass replaces right after ``Scheduler.__init__``, the request status that
# marks a preempted request, and the KV cache manager's coordinator lookup used to count prefix-cache hits without
# side effects (``KVCacheManager.get_computed_blocks`` may emit KV events; the coordinator's
# ``find_longest_cache_hit`` only reads the block pool's hash map).


def scheduler_bases() -> tuple[type, type, type]:
    """(``Scheduler``, ``AsyncScheduler``, ``RequestQueue``) of the installed vLLM; a clear error when missing."""
    try:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        from vllm.v1.core.sched.request_queue import RequestQueue
        from vllm.v1.core.sched.scheduler import Scheduler
    except ImportError as e:
        from kvplug.errors import ConfigError

        raise ConfigError(
            f"kvplug's cache-aware scheduler needs vLLM's v1 scheduler (tested with vLLM {', '.join(TESTED_VLLM)}); "
            f"found vLLM {vllm_version()} without it: {e}"
        ) from e
    return Scheduler, AsyncScheduler, RequestQueue


def install_waiting_queue(scheduler: Any, queue: Any) -> None:
    """Make ``queue`` the scheduler's queue of new and preempted requests (``Scheduler.waiting``). Called right after
    ``Scheduler.__init__``, while that queue is still empty; the scheduler only calls the ``RequestQueue`` methods
    on it (add, peek, pop, prepend, remove, len, iter)."""
    from kvplug.errors import ConfigError

    _, _, request_queue = scheduler_bases()
    current = getattr(scheduler, "waiting", None)
    coordinator = getattr(getattr(scheduler, "kv_cache_manager", None), "coordinator", None)
    if not isinstance(current, request_queue) or not hasattr(coordinator, "find_longest_cache_hit"):
        raise ConfigError(
            f"kvplug's cache-aware scheduler does not recognise this vLLM's scheduler (vLLM {vllm_version()}; "
            f"tested with {', '.join(TESTED_VLLM)}): no RequestQueue 'waiting' or no KV cache coordinator lookup"
        )
    if len(current):
        raise ConfigError("kvplug: the waiting queue can only be replaced while it is empty")
    scheduler.waiting = queue


def local_prefix_hit_tokens(kv_cache_manager: Any, request: Any) -> int:
    """Prompt tokens of ``request`` that vLLM's prefix cache holds now (whole blocks, at most all but the last
    token), read without side effects: the lookup ``KVCacheManager.get_computed_blocks`` makes, minus its KV events
    and block list. 0 when prefix caching is off or the request skips the cache (e.g. prompt logprobs)."""
    if not kv_cache_manager.prefix_cache_lookup_enabled(request):
        return 0
    _, num_tokens, _ = kv_cache_manager.coordinator.find_longest_cache_hit(
        request.block_hashes, request.num_tokens - 1
    )
    return int(num_tokens)


def is_preempted(request: Any) -> bool:
    """Whether a waiting request was preempted (it ran before: vLLM resumes these first)."""
    from vllm.v1.request import RequestStatus

    return bool(request.status == RequestStatus.PREEMPTED)


def uses_priority_policy(scheduler: Any) -> bool:
    """Whether the engine schedules by request priority (``--scheduling-policy priority``)."""
    from vllm.v1.core.sched.request_queue import SchedulingPolicy

    return bool(getattr(scheduler, "policy", None) == SchedulingPolicy.PRIORITY)


# ---- eviction inside vLLM (kvplug.integrations.vllm.evict) ------------------------------------------------------
# Private vLLM internals (verified with vLLM 0.32.0): the KV cache spec registry (public class, but its
# ``_ensure_registered`` must run first or the built-in specs are skipped) and ``Attention.get_kv_cache_spec``,
# which builds a full-attention layer's spec without asking the backend (``customize_spec`` is only called for
# sliding-window layers), so a wrapper is the one way to report another spec.


def register_kv_spec(spec_cls: type, manager_cls: type) -> None:
    """Register a ``FullAttentionSpec`` subclass and its manager with vLLM's ``KVCacheSpecRegistry``, grouped with
    full attention. Idempotent."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(spec_cls, manager_cls, uniform_type_base_spec=FullAttentionSpec)


def transform_layer_kv_spec(transform: Any) -> None:
    """Wrap ``Attention.get_kv_cache_spec`` so that ``transform(spec, vllm_config)`` may replace the spec each
    attention layer reports. Idempotent (one wrapper, the latest transform)."""
    from vllm.model_executor.layers.attention import Attention

    original = Attention.get_kv_cache_spec
    if getattr(original, "_kvplug_wrapped", False):
        original._kvplug_transform[0] = transform  # type: ignore[attr-defined]
        return
    slot = [transform]

    @functools.wraps(original)
    def wrapper(self: Any, vllm_config: Any) -> Any:
        spec = original(self, vllm_config)
        return spec if spec is None else slot[0](spec, vllm_config)

    wrapper._kvplug_wrapped = True  # type: ignore[attr-defined]
    wrapper._kvplug_transform = slot  # type: ignore[attr-defined]
    Attention.get_kv_cache_spec = wrapper  # type: ignore[method-assign]


def kv_block_pool(llm: Any) -> Any:
    """The block pool of an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): its free-block count is
    vLLM's own measure of what requests hold (used by the runner's block trace)."""
    core = llm.llm_engine.engine_core.engine_core
    return core.scheduler.kv_cache_manager.block_pool


def running_requests(llm: Any) -> int:
    """Requests in the in-process engine's running set (scheduled with their KV allocated)."""
    return len(llm.llm_engine.engine_core.engine_core.scheduler.running)
