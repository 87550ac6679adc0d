"""KV eviction inside vLLM with the memory really freed: StreamingLLM (sinks + window) and score-based block
eviction after the prompt (SnapKV, PyramidKV's scores, TOVA, KNorm: kvplug's own method classes).

Switch it on for an engine with one of (first found wins)::

    LLM(..., additional_config={"kvplug_evict": {"method": "streamingllm", "num_sinks": 4, "window": 1020}})
    LLM(..., additional_config={"kvplug_evict": {"method": "snapkv", "compression_ratio": 0.5}})
    --additional-config '{"kvplug_evict": {"method": "snapkv", "compression_ratio": 0.5}}'
    kv_connector_extra_config: {"evict": {...}}          # read, but a KV connector is refused alongside (below)
    KVPLUG_EVICT='{"method": "streamingllm", "window": 1020}'

How it works (vLLM 0.32, CPU_ATTN):

- Every full-attention layer reports a :class:`StreamingSpec` or :class:`ScoredSpec` (``FullAttentionSpec``
  subclasses carrying the method) instead of vLLM's ``FullAttentionSpec``; the specs are registered with vLLM's
  ``KVCacheSpecRegistry`` together with :class:`StreamingManager` / :class:`ScoredManager`, so the scheduler's KV
  cache manager for the layers is kvplug's.
- StreamingLLM: once a request's prompt is computed, the manager frees every block that is neither a sink block
  nor inside the window, and keeps doing so as the generation grows (a long generation holds
  ``sink blocks + window / block_size + 1`` blocks whatever its length).
- Score-based: in the step that completes a prompt, kvplug's ``CPU_ATTN`` runs the stock attention, then reads
  the prompt's keys/values from the paged cache and the last queries of the prompt, and asks the kvplug method for
  its token scores (:func:`layer_token_scores`: mean over heads, normalised per layer, summed over layers); after
  the last layer :func:`blocks_to_drop` gives up the lowest-scored whole blocks until the kept blocks hold the
  method's budget (its protected tokens, e.g. SnapKV's observation window, and the partial last block are always
  kept). The choice goes to the scheduler's manager (same process: one worker, checked at start), which frees the
  blocks at its next allocation. Eviction is per block across all layers (one KV cache group), so per-layer or
  per-head budgets (PyramidKV's pyramid, CAKE) reduce to their scores.
- A freed block goes back to vLLM's free pool (other requests can use it at once) and the request's block table
  gets vLLM's null block in its place, so logical positions are kept. The attention-metadata builder drops the
  same blocks from each row's block table and shortens its sequence length (:func:`compact`). Keys carry their
  rotary positions already, so nothing else changes.

Semantics (deterministic, independent of batching and of when the scheduler frees): the prompt is prefilled with
full attention (compress after prefill, as kvpress and kvplug's HF path do). StreamingLLM: a token at position
``p`` after the prompt attends to the sink blocks (``ceil(num_sinks / block_size)``) and to every block from
``floor((p + 1 - window) / block_size)`` on; with ``window`` at least the request's length nothing is freed and
the output is bit-for-bit the normal path's. Score-based: every token after the prompt attends to all blocks but
the chosen ones.

Prefix caching: only prompt blocks (computed with full attention) enter vLLM's prefix cache; blocks computed after
an eviction never do. A request resumed after preemption recomputes its prompt and output in one prefill (its
score-based choice is forgotten and made again from the recomputed prompt): output tokens past the prompt are then
recomputed with more context than they had while decoding, so a resumed request can differ from an uninterrupted
one after the resumption point.

Per request (scored methods only): ``SamplingParams(extra_args={"kvplug_evict": ...})`` (HTTP: ``"vllm_xargs"``) or
``kv_transfer_params: {"evict": ...}`` with ``false`` (keep every block), ``true`` (the engine's setting) or an
object overriding the method or its fields (:func:`request_method`). StreamingLLM is engine-wide (its manager
frees by position). Limits: a KV connector is refused alongside (the kvplug
connector saves requests by block id); sliding-window layers keep vLLM's own spec; the sparse-attention backend
and eviction are exclusive; score-based methods need CPU_ATTN's ``vec`` layout with ``kv_cache_dtype`` auto.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import Counter
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from kvplug.errors import ConfigError
from kvplug.integrations.vllm import _compat
from kvplug.integrations.vllm.options import engine_setting, request_option, setting_object

log = logging.getLogger("kvplug.vllm.evict")

CONFIG_KEY = "kvplug_evict"  # additional_config key
CONNECTOR_KEY = "evict"  # kv_connector_extra_config key
ENV_VAR = "KVPLUG_EVICT"
EXTRA_KEY = "kvplug_evict"  # a request's own setting: SamplingParams.extra_args key (HTTP: vllm_xargs)
REQUEST_KEY = "evict"  # or kv_transfer_params key
# kvplug methods whose token scores need only the prompt's keys, values and last queries (``query_window`` not None)
SCORED = ("snapkv", "pyramidkv", "tova", "knorm")
METHODS = ("streamingllm", *SCORED)

FREED = Counter("kvplug_evict_blocks_freed", "KV blocks returned to vLLM's free pool by eviction", ["method"])
SCORED_REQUESTS = Counter("kvplug_evict_requests_scored", "Prompts whose blocks were scored for eviction", ["method"])
ERRORS = Counter("kvplug_evict_errors", "Scoring failures (the request keeps all its blocks)", ["kind"])


@dataclass(frozen=True)
class StreamingLLMConfig:
    """StreamingLLM (Xiao et al., ICLR'24, arXiv 2309.17453): attention sinks plus a window of recent tokens.

    Defaults from the paper's setting: 4 sink tokens and a 1024-token cache (4 + 1020)."""

    num_sinks: int = 4
    window: int = 1020
    method: str = "streamingllm"

    @classmethod
    def parse(cls, raw: dict[str, Any], source: str) -> StreamingLLMConfig:
        method = "streamingllm"
        known = {f.name for f in dataclasses.fields(cls)} - {"method"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {unknown} for {method} (known: {sorted(known)})")
        for k, v in raw.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"{source}: {k} must be an integer number of tokens, got {v!r}")
        cfg = cls(**raw)
        if cfg.num_sinks < 0:
            raise ConfigError(f"{source}: num_sinks must be >= 0, got {cfg.num_sinks}")
        if cfg.window < 1:
            raise ConfigError(f"{source}: window must be >= 1 token, got {cfg.window}")
        return cfg


@dataclass(frozen=True)
class ScoredConfig:
    """Block eviction after the prompt by a kvplug method's token scores (``SCORED``; the method's own docstring
    cites its paper), with its parameters (``compression_ratio`` = fraction of the prompt's blocks freed, or
    ``token_budget``)."""

    method: str
    params: str  # JSON, sorted keys: hashable, and it travels in the KV cache spec

    @classmethod
    def parse(cls, raw: dict[str, Any], method: str, source: str) -> ScoredConfig:
        from kvplug.methods import registry

        if "compression_ratio" not in raw and "token_budget" not in raw:
            raise ConfigError(f"{source}: {method} needs compression_ratio (fraction freed) or token_budget")
        try:
            registry.get(method, **raw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cls(method, json.dumps(raw, sort_keys=True))

    def build(self) -> Any:
        from kvplug.methods import registry

        return registry.get(self.method, **json.loads(self.params))


def parse_config(raw: Any, source: str) -> StreamingLLMConfig | ScoredConfig:
    """An eviction setting: an object ``{"method": ..., options}``, its JSON text, or a bare method name."""
    raw = setting_object(raw, source, "{'method': 'streamingllm'}")
    method = str(raw.pop("method", "streamingllm")).lower()
    if method == "streamingllm":
        return StreamingLLMConfig.parse(raw, source)
    if method in SCORED:
        return ScoredConfig.parse(raw, method, source)
    raise ConfigError(f"{source}: unknown eviction method {method!r} inside vLLM (supported: {', '.join(METHODS)})")


def engine_config(vllm_config: Any) -> StreamingLLMConfig | ScoredConfig | None:
    """The engine's eviction config (``additional_config``, the kvplug connector's extra config or the environment,
    first found); ``None`` when none is given."""
    found = engine_setting(vllm_config, CONFIG_KEY, CONNECTOR_KEY, ENV_VAR)
    return None if found is None else parse_config(*found)


# ---- the KV cache spec and its manager (scheduler side) -------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class StreamingSpec(FullAttentionSpec):
    """A full-attention layer whose blocks outside the sinks and the window are freed after the prompt."""

    num_sinks: int = 4
    window: int = 1020

    @property
    def sink_blocks(self) -> int:
        return -(-self.num_sinks // self.block_size)

    def window_start_block(self, first_position: int) -> int:
        """First kept block after the sinks for a query whose first token is at ``first_position``."""
        return max(self.sink_blocks, (first_position + 1 - self.window) // self.block_size)

    @classmethod
    def merge(cls, specs: list[Any]) -> StreamingSpec:
        sizes = {(s.num_sinks, s.window) for s in specs if isinstance(s, StreamingSpec)}
        if len(sizes) != 1 or not all(isinstance(s, StreamingSpec) for s in specs):
            raise ValueError(f"kvplug eviction: layers of one KV cache group disagree on sinks/window: {sizes}")
        base = super().merge(specs)  # FullAttentionSpec's checks; builds cls with the default sizes
        num_sinks, window = sizes.pop()
        return dataclasses.replace(base, num_sinks=num_sinks, window=window)


class _PromptOnlyPrefixCache(FullAttentionManager):
    def cache_blocks(self, request: Any, num_tokens: int, *args: Any, **kwargs: Any) -> None:
        # only prompt blocks are a plain prefix: later blocks were computed with evicted context
        super().cache_blocks(request, min(num_tokens, request.num_prompt_tokens), *args, **kwargs)


class StreamingManager(_PromptOnlyPrefixCache):
    """vLLM's full-attention manager that frees the blocks a :class:`StreamingSpec` no longer attends."""

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        spec = self.kv_cache_spec
        if num_prompt_tokens is None or processed_computed_tokens < num_prompt_tokens:
            return  # the prompt is prefilled with full attention: nothing is evicted before it is done
        first, last = spec.sink_blocks, spec.window_start_block(processed_computed_tokens)
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None or first >= min(last, len(blocks)):
            return
        before = sum(b is not self._null_block for b in blocks)
        self._remove_blocks_in_range(request_id, first, last)
        freed = before - sum(b is not self._null_block for b in blocks)
        if freed:
            FREED.labels("streamingllm").inc(freed)


@dataclass(frozen=True, kw_only=True)
class ScoredSpec(FullAttentionSpec):
    """A full-attention layer whose lowest-scored prompt blocks (a kvplug method's scores) are freed after the
    prompt."""

    method: str = ""
    params: str = "{}"

    def config(self) -> ScoredConfig:
        return ScoredConfig(self.method, self.params)

    @classmethod
    def merge(cls, specs: list[Any]) -> ScoredSpec:
        cfgs = {(s.method, s.params) for s in specs if isinstance(s, ScoredSpec)}
        if len(cfgs) != 1 or not all(isinstance(s, ScoredSpec) for s in specs):
            raise ValueError(f"kvplug eviction: layers of one KV cache group disagree on the method: {cfgs}")
        base = super().merge(specs)
        method, params = cfgs.pop()
        return dataclasses.replace(base, method=method, params=params)


@dataclass
class Choice:
    """The logical blocks a request's prompt gives up (chosen by the worker after the prompt's last layer)."""

    holes: tuple[int, ...]
    applied: bool = False  # freed by the scheduler's manager


# Worker -> scheduler: the worker writes a request's choice after the forward that completes its prompt; the
# scheduler's manager frees the blocks at its next allocation and forgets the choice when the request's blocks are
# freed (finish or preemption). Both sides run in vLLM's engine-core process (one worker: checked at start).
_CHOICES: dict[str, Choice] = {}
_CHOICES_LOCK = threading.Lock()


def choice(request_id: str) -> Choice | None:
    with _CHOICES_LOCK:
        return _CHOICES.get(request_id)


def _set_choice(request_id: str, c: Choice) -> None:
    with _CHOICES_LOCK:
        _CHOICES[request_id] = c


class ScoredManager(_PromptOnlyPrefixCache):
    """vLLM's full-attention manager that frees the prompt blocks the worker's scoring gave up."""

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        c = choice(request_id)
        if c is None or c.applied or num_prompt_tokens is None or processed_computed_tokens < num_prompt_tokens:
            return
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None:
            return
        freed = []
        for i in c.holes:
            if i < len(blocks) and blocks[i] is not self._null_block:
                freed.append(blocks[i])
                blocks[i] = self._null_block
        if freed:
            self.block_pool.free_blocks(freed)
            FREED.labels(self.kv_cache_spec.method).inc(len(freed))
        c.applied = True

    def free(self, request_id: str) -> None:
        super().free(request_id)
        with _CHOICES_LOCK:
            _CHOICES.pop(request_id, None)  # finished or preempted: a resumed request is scored again


def register() -> None:
    """Register :class:`StreamingSpec` with vLLM (idempotent) and make full-attention layers report it when the
    engine's config asks for eviction. Runs in every vLLM process (the kvplug plugin)."""
    _compat.register_kv_spec(StreamingSpec, StreamingManager)
    _compat.register_kv_spec(ScoredSpec, ScoredManager)
    _compat.transform_layer_kv_spec(_layer_spec)


def _layer_spec(spec: Any, vllm_config: Any) -> Any:
    """A layer's KV cache spec under the engine's eviction config (vLLM's spec when eviction is off)."""
    if type(spec) is not FullAttentionSpec or spec.sliding_window is not None:
        return spec
    cfg = engine_config(vllm_config)
    if cfg is None:
        return spec
    _compat.require_tested("KV eviction")
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    if ktc is not None and getattr(ktc, "kv_connector", None):
        raise ConfigError(
            "kvplug eviction inside vLLM does not run alongside a KV connector yet (a connector saves requests by "
            "block id and would read freed blocks): remove kv_transfer_config or the kvplug_evict setting"
        )
    from kvplug.integrations.vllm import sparse_backend

    if sparse_backend.engine_config(vllm_config) is not None:
        raise ConfigError("kvplug eviction and kvplug sparse attention cannot both be on for one engine")
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
    if isinstance(cfg, StreamingLLMConfig):
        return StreamingSpec(**fields, num_sinks=cfg.num_sinks, window=cfg.window)
    world = getattr(getattr(vllm_config, "parallel_config", None), "world_size", 1)
    if world != 1:
        raise ConfigError(
            f"kvplug {cfg.method} eviction needs one worker in the engine-core process (world size 1, found {world})"
        )
    return ScoredSpec(**fields, method=cfg.method, params=cfg.params)


# ---- the worker side: drop evicted blocks from the attention metadata ----------------------------------------------
def _dropped(spec: Any, request_id: str, first: int, n_prompt: int) -> tuple[int, ...] | range:
    """Logical blocks a row whose first query token is at ``first`` must not read."""
    if first < n_prompt:
        return ()  # prompt prefill: full attention
    if isinstance(spec, StreamingSpec):
        return range(spec.sink_blocks, spec.window_start_block(first))
    c = choice(request_id)
    return c.holes if c is not None else ()


@dataclass
class _BatchRow:
    index: int
    request_id: str
    state: Any  # the worker's CachedRequestState
    seq_len: int  # tokens in context after this step
    first: int  # position of the row's first query token
    query_start: int  # batch index of that token
    n_prompt: int


def batch_rows(cm: Any) -> list[_BatchRow]:
    """The rows of the batch whose metadata is being built (``CommonAttentionMetadata``), with their requests;
    empty outside a real batch (profiling and dummy runs)."""
    rows = _compat.batch_requests(cm.num_reqs)
    if rows is None:
        return []
    qsl = cm.query_start_loc_cpu.tolist()
    seq_lens = cm.seq_lens.tolist() if cm.seq_lens.device.type == "cpu" else cm.seq_lens.cpu().tolist()
    return [
        _BatchRow(
            i, rid, state, seq_lens[i], seq_lens[i] - (qsl[i + 1] - qsl[i]), qsl[i], len(state.prompt_token_ids or ())
        )
        for i, (rid, state) in enumerate(rows)
    ]


def compact(spec: StreamingSpec | ScoredSpec, cm: Any, rows: list[_BatchRow]) -> Any:
    """``cm`` (vLLM's ``CommonAttentionMetadata``) with every row past its prompt reading only the blocks the
    method keeps: the block-table row is compacted and the sequence length shortened by the dropped blocks. Rows of
    prompt prefill are left whole. ``rows``: :func:`batch_rows` of ``cm``. Returns ``cm`` itself when no row
    changes (or outside a real batch)."""
    bs = spec.block_size
    table, lens = None, None
    for row in rows:
        i, rid, n = row.index, row.request_id, row.seq_len
        dropped = set(_dropped(spec, rid, row.first, row.n_prompt))
        if not dropped:
            continue
        if table is None:
            table, lens = cm.block_table_tensor.clone(), cm.seq_lens.clone()
        keep = [b for b in range(-(-n // bs)) if b not in dropped]
        table[i, : len(keep)] = cm.block_table_tensor[i, keep]
        lens[i] = n - len(dropped) * bs
    if table is None:
        return cm
    return dataclasses.replace(cm, block_table_tensor=table, seq_lens=lens, max_seq_len=int(lens.max().item()))


# ---- the worker side: score a prompt's blocks in the step that completes it ----------------------------------------
def layer_token_scores(method: Any, layer: Any) -> torch.Tensor:
    """One layer's token scores ``[N]`` for block selection: the method's scores averaged over heads, shifted to a
    minimum of 0 and normalised to sum 1 (so every layer weighs the same when layers are summed, whatever the
    method's scale or sign: KNorm's scores are negative norms)."""
    s = method.score(layer)[0].float().mean(0)
    s = s - s.min()
    return s / s.sum().clamp_min(1e-12)


def blocks_to_drop(method: Any, scores: torch.Tensor, n: int, block_size: int) -> tuple[int, ...]:
    """The prompt blocks given up for the summed token ``scores`` ``[n]``: enough of the lowest-scored whole blocks
    (mean token score; ties: the earlier block goes) that the kept blocks hold ``method.budget(n)`` tokens; blocks
    with a token the method protects (its window, sinks) and the partial last block are always kept."""
    bs = block_size
    total, full = -(-n // bs), n // bs
    keep = min(total, -(-method.budget(n) // bs))
    prot = method.protected(n, method.budget(n), scores.device)
    forced = set() if prot is None else {int(t) // bs for t in torch.nonzero(prot).flatten().tolist()}
    candidates = [b for b in range(full) if b not in forced]
    block_score = {b: float(scores[b * bs : (b + 1) * bs].mean()) for b in candidates}
    ranked = sorted(candidates, key=lambda b: (block_score[b], b))
    return tuple(sorted(ranked[: max(0, total - keep)]))


@dataclass
class _ScoreRow:
    request_id: str
    method: Any
    tokens: torch.Tensor  # batch indices of the prompt's last queries in this step
    blocks: torch.Tensor  # physical ids of the prompt's blocks
    n: int  # prompt tokens
    scores: torch.Tensor | None = None
    failed: bool = False


@dataclass
class ScoreStep:
    """The rows of one step whose prompt completes in it, scored layer by layer in the attention forward."""

    rows: list[_ScoreRow]
    layers: dict[str, int]  # layer name -> index
    last_layer: str
    head_dim: int
    block_size: int

    def add_layer(self, layer_name: str, query: torch.Tensor, kv_cache: torch.Tensor, scale: float) -> None:
        """Score this layer's prompt tokens for every row (after the layer's KV is in the paged cache)."""
        from kvplug.integrations.vllm.layouts import CpuVecAdapter
        from kvplug.methods.base import LayerKV

        idx = self.layers[layer_name]
        for row in self.rows:
            if row.failed:
                continue
            try:
                kv = CpuVecAdapter(self.head_dim).gather_blocks(kv_cache, row.blocks)[:, : row.n]  # [2, N, H, D]
                q = query.index_select(0, row.tokens).permute(1, 0, 2).unsqueeze(0).float() if len(row.tokens) else None
                layer = LayerKV(
                    keys=kv[0].permute(1, 0, 2).unsqueeze(0).float(),
                    values=kv[1].permute(1, 0, 2).unsqueeze(0).float(),
                    queries=q,
                    layer_idx=idx,
                    num_layers=len(self.layers),
                    scaling=scale,
                )
                s = layer_token_scores(row.method, layer)
                row.scores = s if row.scores is None else row.scores + s
            except Exception as e:  # never into the engine: this request keeps all its blocks
                row.failed = True
                ERRORS.labels("score").inc()
                log.warning("kvplug eviction: scoring %s failed, it keeps all its blocks: %r", row.request_id, e)
        if layer_name == self.last_layer:
            self.finish()

    def finish(self) -> None:
        for row in self.rows:
            holes: tuple[int, ...] = ()
            if not row.failed and row.scores is not None:
                try:
                    holes = blocks_to_drop(row.method, row.scores, row.n, self.block_size)
                except Exception as e:
                    ERRORS.labels("choose").inc()
                    log.warning("kvplug eviction: choosing blocks for %s failed: %r", row.request_id, e)
            _set_choice(row.request_id, Choice(holes))
            SCORED_REQUESTS.labels(row.method.name).inc()


def request_method(spec: ScoredSpec, default: Any, opt: Any) -> Any:
    """The method for a request whose own setting is ``opt``: ``None``/``True`` the engine's, ``False`` none (the
    request keeps every block), an object overrides the method and its fields (``{"compression_ratio": 0.25}``,
    ``{"method": "tova", "compression_ratio": 0.5}``; another method starts from its own defaults)."""
    if opt is None or opt is True:
        return default
    if opt is False:
        return None
    if not isinstance(opt, dict):
        raise ConfigError(f"the request's eviction setting must be true, false or an object, got {opt!r}")
    opt = dict(opt)
    name = str(opt.pop("method", spec.method)).lower()
    if name not in SCORED:
        raise ConfigError(f"a request can choose among the scored methods {SCORED} on this engine, not {name!r}")
    params = {**(json.loads(spec.params) if name == spec.method else {}), **opt}
    return ScoredConfig.parse(params, name, "the request's eviction setting").build()


def plan_scoring(
    spec: ScoredSpec, cm: Any, rows: list[_BatchRow], method: Any, layers: dict[str, int], head_dim: int
) -> ScoreStep | None:
    """The rows of this step that complete their prompt and have no choice yet, or ``None``."""
    if not layers:
        return None
    out = []
    for row in rows:
        i, rid, state, first, n_prompt = row.index, row.request_id, row.state, row.first, row.n_prompt
        if not first < n_prompt <= row.seq_len or choice(rid) is not None:
            continue
        try:
            m = request_method(spec, method, request_option(state, EXTRA_KEY, REQUEST_KEY))
        except Exception as e:  # a bad per-request setting: the request keeps its blocks, and it is said
            ERRORS.labels("request_options").inc()
            log.warning("kvplug eviction: request %s keeps all its blocks: %s", rid, e)
            m = None
        if m is None:
            _set_choice(rid, Choice(()))
            continue
        end = row.query_start + n_prompt - first  # batch index after the prompt's last token
        w = min(m.query_window or 0, n_prompt - first)
        blocks = cm.block_table_tensor[i, : -(-n_prompt // spec.block_size)].cpu().clone()
        out.append(_ScoreRow(rid, m, torch.arange(end - w, end), blocks, n_prompt))
    if not out:
        return None
    return ScoreStep(out, layers, max(layers, key=layers.__getitem__), head_dim, spec.block_size)
