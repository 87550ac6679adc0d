"""Sparse decode attention for vLLM (CPU): a subclass of the ``CPU_ATTN`` backend that the kvplug plugin registers
in its place. Without a sparse configuration it is the stock backend (same metadata, same kernel calls).

Switch it on for an engine with one of (first found wins)::

    LLM(..., additional_config={"kvplug_sparse": {"method": "quest", "budget": 1024}})
    --additional-config '{"kvplug_sparse": {"method": "quest", "budget": 1024}}'
    kv_connector_extra_config: {"sparse": {...}}          # when the kvplug connector is configured
    KVPLUG_SPARSE='{"method": "quest", "budget": 1024}'   # or just KVPLUG_SPARSE=quest

The object holds ``method`` (``quest``, ``hierarchical``, ``sentencekv``) and that method's fields, plus
``requests`` (``"all"``, the default, or ``"opt-in"``) and ``dense_up_to`` (contexts of at most this many tokens
stay dense; default the budget, where sparse attention would read everything anyway). Per request, the option
``false`` opts out, ``true`` opts in and ``{"method": ..., "budget": ...}`` overrides the engine's choice; it goes
in ``SamplingParams(extra_args={"kvplug_sparse": ...})`` (HTTP: ``"vllm_xargs": {"kvplug_sparse": ...}``) or, next
to the kvplug connector's own options, in ``kv_transfer_params: {"sparse": ...}`` (without a KV connector vLLM
logs a warning for every request that carries ``kv_transfer_params``).

How it works. Prefill and multi-token steps stay dense. For a decode row of a sparse request the metadata builder
(once per step) summarises every newly completed KV block of the request for each full-attention layer, reading
the blocks straight from the paged cache (so blocks loaded by a KV connector or found in the prefix cache get
their summaries like any other); then each layer's attention asks the method for the blocks to read and runs
vLLM's own CPU paged-attention kernel once per KV head over a compacted block table (the selected blocks, then the
block being filled) with the matching sequence length. Rows that are not sparse run the stock kernel on their own
sub-batch. The hierarchical method's pooled tokens need a weighted softmax the stock kernel lacks: those rows use
:func:`kvplug.kernels.paged_decode_attention` (the torch reference on CPU). Any error in the sparse path falls back
to dense attention for that request (logged and counted in ``kvplug_sparse_errors``), never an exception into
the engine. The private vLLM pieces used (row to request mapping, the kernel ops) live in ``_compat.py``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client import Counter
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from kvplug.errors import ConfigError
from kvplug.integrations.vllm import _compat, evict
from kvplug.integrations.vllm.options import engine_setting, request_option, setting_object
from kvplug.methods import sparse
from kvplug.methods.sparse import SparseMethod, SparseState

log = logging.getLogger("kvplug.vllm.sparse")

CONFIG_KEY = "kvplug_sparse"  # additional_config key
CONNECTOR_KEY = "sparse"  # kv_connector_extra_config key
ENV_VAR = "KVPLUG_SPARSE"
REQUEST_KEY = "sparse"  # kv_transfer_params key
EXTRA_KEY = "kvplug_sparse"  # SamplingParams.extra_args key (no connector needed, so no vLLM warning)
SUPPORTED_ISAS = ("vec",)  # CPU_ATTN block layouts the summaries are read from (verified: vec, float32/bf16)

STEPS = Counter("kvplug_sparse_decode_steps", "Decode steps (request x step) run with sparse attention", ["method"])
ATTENDED = Counter("kvplug_sparse_attended_tokens", "Tokens attended by sparse rows, summed over layers", ["method"])
CONTEXT = Counter("kvplug_sparse_context_tokens", "Context tokens of sparse rows, summed over layers", ["method"])
SELECTIONS = Counter("kvplug_sparse_selections", "Per-layer selections by kind (ranked, reused, dense)", ["kind"])
ERRORS = Counter("kvplug_sparse_errors", "Sparse-path failures (the request falls back to dense)", ["kind"])


# ---- configuration ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseConfig:
    """The engine's sparse-attention setting (see the module docstring)."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    requests: str = "all"
    dense_up_to: int | None = None

    @classmethod
    def parse(cls, raw: Any, source: str) -> SparseConfig:
        raw = setting_object(raw, source, "{'method': 'quest', 'budget': 1024}")
        method = raw.pop("method", None)
        if not isinstance(method, str):
            raise ConfigError(f"{source}: 'method' is required (one of {sorted(sparse.METHODS)})")
        requests = raw.pop("requests", "all")
        if requests not in ("all", "opt-in"):
            raise ConfigError(f"{source}: requests must be 'all' or 'opt-in', got {requests!r}")
        dense_up_to = raw.pop("dense_up_to", None)
        if dense_up_to is not None and (isinstance(dense_up_to, bool) or not isinstance(dense_up_to, int)):
            raise ConfigError(f"{source}: dense_up_to must be an integer number of tokens, got {dense_up_to!r}")
        cfg = cls(method, raw, requests, dense_up_to)
        cfg.build(method, raw)  # validates the method and its parameters now (a ConfigError names the problem)
        return cfg

    def build(self, method: str, params: dict[str, Any]) -> SparseMethod:
        return sparse.get(method, **params)

    def for_request(self, opt: Any) -> tuple[SparseMethod | None, int]:
        """The method for a request whose option is ``opt`` (``None``: not given) and its dense-up-to threshold;
        ``None`` for the method means dense."""
        if opt is None:
            opt = self.requests == "all"
        if opt is False:
            return None, 0
        name, params = self.method, dict(self.params)
        dense_up_to = self.dense_up_to
        if isinstance(opt, dict):
            opt = dict(opt)
            name = opt.pop("method", self.method)
            dense_up_to = opt.pop("dense_up_to", dense_up_to)
            params = {**(self.params if name == self.method else {}), **opt}
        elif opt is not True:
            raise ConfigError(f"the request's sparse option must be true, false or an object, got {opt!r}")
        m = self.build(name, params)
        return m, (m.budget if dense_up_to is None else int(dense_up_to))


def engine_config(vllm_config: VllmConfig) -> SparseConfig | None:
    """The engine's sparse config (``additional_config``, the kvplug connector's extra config or the environment,
    first found); ``None`` when none is given."""
    found = engine_setting(vllm_config, CONFIG_KEY, CONNECTOR_KEY, ENV_VAR)
    return None if found is None else SparseConfig.parse(*found)


# ---- per-request state and per-step plan ----------------------------------------------------------------------------
@dataclass
class _Request:
    method: SparseMethod | None
    dense_up_to: int = 0
    states: dict[str, SparseState] = field(default_factory=dict)  # layer name -> state
    blocks: list[int] = field(default_factory=list)  # physical blocks summarised, in order
    failed: str | None = None


@dataclass
class _Row:
    token: int  # index of the row's query token in the batch
    req: _Request
    n: int  # tokens in context, the current one included
    token_id: int | None  # the step's input token
    blocks: torch.Tensor  # the row's physical block ids, up to the block being filled


@dataclass
class SparseStep:
    """What one step's sparse rows need, shared by every layer."""

    rows: list[_Row]
    tok_idx: torch.Tensor
    layers: dict[str, int]  # sparse-capable layer name -> model layer index
    dense_idx: torch.Tensor | None = None  # query tokens of the other rows, and their own metadata
    dense_meta: CPUAttentionMetadata | None = None
    sched_cache: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # flushed to Prometheus after the last layer
    last_layer: int = -1

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def flush(self) -> None:
        """Add this step's counts to the Prometheus counters (once per step, not per layer)."""
        for key, n in self.counts.items():
            kind, _, method = key.partition(":")
            if kind == "attended":
                ATTENDED.labels(method).inc(n)
            elif kind == "context":
                CONTEXT.labels(method).inc(n)
            else:
                SELECTIONS.labels(kind).inc(n)
        self.counts.clear()


@dataclass
class SparseCPUAttentionMetadata(CPUAttentionMetadata):
    sparse: SparseStep | None = None
    evict: evict.ScoreStep | None = None  # kvplug eviction: prompts completing in this step, scored per layer


def _vec_views(kv_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``K^T [blocks, H, D, bs]`` and ``V [blocks, H, bs, D]`` views of a CPU ``vec`` layer cache (see
    :class:`kvplug.integrations.vllm.layouts.CpuVecAdapter`)."""
    nb, h, bs, _ = kv_cache.shape
    slab = kv_cache.view(nb, h, 2, head_dim * bs)
    return slab[:, :, 0].view(nb, h, head_dim, bs), slab[:, :, 1].view(nb, h, bs, head_dim)


class SparseCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """CPU_ATTN's builder plus the per-step sparse plan (summaries kept up to date, rows split)."""

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: VllmConfig, device: Any) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.cfg = engine_config(vllm_config)
        self._reqs: dict[str, _Request] = {}
        self._layers: dict[str, int] = {}
        self._modules: dict[str, Attention] = {}
        self._punct: frozenset[int] | None = None
        self._tokenizer = vllm_config.model_config.tokenizer
        self._warned: set[str] = set()
        self._last_step: SparseStep | None = None
        self._evict = kv_cache_spec if isinstance(kv_cache_spec, evict.StreamingSpec | evict.ScoredSpec) else None
        self._evict_method: Any = None
        self._evict_layers: dict[str, int] = {}
        if self._evict is not None:
            _compat.track_runner_batches()  # compact() and plan_scoring() map rows to requests
        if isinstance(self._evict, evict.ScoredSpec):
            if self.isa not in SUPPORTED_ISAS or self.kv_cache_dtype not in (None, "auto"):
                raise NotImplementedError(
                    f"kvplug {self._evict.method} eviction reads keys from CPU_ATTN's ISA {SUPPORTED_ISAS} layout with "
                    f"kv_cache_dtype auto; found ISA {self.isa!r}, kv_cache_dtype {self.kv_cache_dtype!r}"
                )
            self._evict_method = self._evict.config().build()
            for name in layer_names:
                idx = _compat.layer_index(name)
                if idx is not None:
                    self._evict_layers[name] = idx
        if self.cfg is None or self.is_cross_attention or self.is_encoder_only_attention:
            return
        if self.isa not in SUPPORTED_ISAS or self.kv_cache_dtype not in (None, "auto"):
            raise NotImplementedError(
                f"kvplug sparse attention: CPU_ATTN with ISA {self.isa!r} and KV cache dtype "
                f"{self.kv_cache_dtype!r} is not supported (supported: ISA {SUPPORTED_ISAS}, kv_cache_dtype auto)"
            )
        _compat.check_version()
        for name, layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).items():
            impl = layer.impl
            if not isinstance(impl, SparseCPUAttentionImpl) or impl.attn_type != AttentionType.DECODER:
                continue
            if impl.sliding_window != -1:  # local layers (Gemma-3) are already cheap: left dense
                continue
            if impl.alibi_slopes is not None or impl.sinks is not None:  # per-head biases: not in the sparse path
                continue
            idx = _compat.layer_index(name)
            if idx is not None:
                self._layers[name] = idx
                self._modules[name] = layer
        if self._layers:
            _compat.track_runner_batches()
            log.info(
                "kvplug sparse attention: %s on %d layers (config %s)", self.cfg.method, len(self._layers), self.cfg
            )

    # -- build ---------------------------------------------------------------------------------------------------------
    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> CPUAttentionMetadata:
        if self._evict is not None:  # kvplug eviction (never with sparse attention): evicted blocks dropped
            rows = evict.batch_rows(common_attn_metadata)  # once per step, for both uses
            meta = super().build(common_prefix_len, evict.compact(self._evict, common_attn_metadata, rows), fast_build)
            if self._evict_method is None:
                return meta
            try:
                scoring = evict.plan_scoring(
                    self._evict, common_attn_metadata, rows, self._evict_method, self._evict_layers, self.head_dim
                )
            except Exception as e:  # never into the engine: these prompts keep all their blocks
                self._warn("evict-plan", f"kvplug eviction: planning failed, no eviction this step: {e!r}")
                evict.ERRORS.labels("plan").inc()
                scoring = None
            if scoring is None:
                return meta
            return SparseCPUAttentionMetadata(
                **{f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}, evict=scoring
            )
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if not self._layers:
            return meta
        if self._last_step is not None:  # in case the last layer never ran (an aborted forward)
            self._last_step.flush()
            self._last_step = None
        try:
            step = self._plan(common_attn_metadata, meta)
        except Exception as e:  # never into the engine: this step is dense
            self._warn("plan", f"kvplug sparse attention: planning failed, dense this step: {e!r}")
            ERRORS.labels("plan").inc()
            step = None
        if step is None:
            return meta
        self._last_step = step
        return SparseCPUAttentionMetadata(
            **{f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}, sparse=step
        )

    def _plan(self, cm: CommonAttentionMetadata, meta: CPUAttentionMetadata) -> SparseStep | None:
        rows = _compat.batch_requests(cm.num_reqs)
        if rows is None or meta.dynamic_causal is not None or meta.causal is not True:
            return None
        live = _compat.live_request_ids()
        if live is not None:  # finished (or aborted) requests: drop their summaries
            for rid in [r for r in self._reqs if r not in live]:
                del self._reqs[rid]
        qsl = cm.query_start_loc_cpu
        seq = cm.seq_lens.cpu()
        table = cm.block_table_tensor
        bs = self.block_size
        sparse_rows: list[_Row] = []
        row_ids: list[int] = []
        for i, (rid, rs) in enumerate(rows):
            if int(qsl[i + 1] - qsl[i]) != 1:
                continue
            req = self._request(rid, rs)
            n = int(seq[i])
            if req.method is None or req.failed or n <= req.dense_up_to:
                continue
            # token ids only for methods that read text (an O(context) list per step otherwise wasted)
            ids = _compat.request_token_ids(rs) if isinstance(req.method, sparse.SentenceKV) else []
            blocks = table[i, : (n - 1) // bs + 1].long()
            try:
                self._sync(req, blocks, n, ids)
            except Exception as e:
                req.failed = repr(e)
                ERRORS.labels("summarise").inc()
                self._warn("summarise", f"kvplug sparse attention: request {rid} is dense from now on: {e!r}")
                continue
            sparse_rows.append(_Row(int(qsl[i]), req, n, ids[n - 1] if len(ids) >= n else None, blocks))
            row_ids.append(i)
            STEPS.labels(req.method.name).inc()
        if not sparse_rows:
            return None
        step = SparseStep(sparse_rows, torch.tensor([r.token for r in sparse_rows]), self._layers)
        step.last_layer = max(self._layers.values())
        taken = set(row_ids)
        others = [i for i in range(cm.num_reqs) if i not in taken]
        if others:
            step.dense_idx, step.dense_meta = self._sub_batch(meta, others)
        return step

    def _request(self, rid: str, rs: Any) -> _Request:
        req = self._reqs.get(rid)
        if req is not None:
            return req
        assert self.cfg is not None
        try:
            opt = request_option(rs, EXTRA_KEY, REQUEST_KEY)
            method, dense_up_to = self.cfg.for_request(opt)
            if isinstance(method, sparse.SentenceKV) and not method.punctuation_ids:
                method = dataclasses.replace(method, punctuation_ids=self._punctuation())
            req = _Request(method, dense_up_to)
        except Exception as e:  # a bad per-request option: served dense, and said so
            ERRORS.labels("request_options").inc()
            log.warning("kvplug sparse attention: request %s runs dense: %s", rid, e)  # once: requests are cached
            req = _Request(None, 0, failed=str(e))
        self._reqs[rid] = req
        return req

    def _punctuation(self) -> frozenset[int]:
        if self._punct is None:
            from transformers import AutoTokenizer

            self._punct = sparse.sentence_end_ids(AutoTokenizer.from_pretrained(self._tokenizer))
        return self._punct

    def _sync(self, req: _Request, blocks: torch.Tensor, n: int, ids: list[int]) -> None:
        """Summarise the request's blocks completed before this step (all sparse layers)."""
        assert req.method is not None
        bs = self.block_size
        full = (n - 1) // bs
        done = len(req.blocks)
        current = blocks[:full].tolist()
        if current[:done] != req.blocks:  # preempted and rescheduled on other blocks: start over
            req.states.clear()
            req.blocks, done = [], 0
        if full <= done:
            return
        m = req.method
        new = blocks[done:full]
        tok = ids[done * bs : full * bs] if isinstance(m, sparse.SentenceKV) else None
        if tok is not None and len(tok) != (full - done) * bs:
            raise RuntimeError(f"token ids of the request are shorter than its KV ({len(ids)} < {full * bs})")
        for name, idx in self._layers.items():
            if idx < m.dense_layers:
                continue
            st = req.states.get(name)
            if st is None:
                st = req.states[name] = m.new_state(self.num_kv_heads, self.head_dim, bs, "cpu", torch.float32)
            kt, v = _vec_views(self._modules[name].kv_cache, self.head_dim)
            hd = (self.num_kv_heads, self.head_dim)
            keys = kt[new].permute(0, 3, 1, 2).reshape(-1, *hd)
            values = v[new].permute(0, 2, 1, 3).reshape(-1, *hd) if m.needs_values else None
            m.append(st, keys, values, tok)
        req.blocks = current

    def _sub_batch(self, meta: CPUAttentionMetadata, rows: list[int]) -> tuple[torch.Tensor, CPUAttentionMetadata]:
        """The metadata of the non-sparse rows alone (their query tokens packed)."""
        qsl = meta.query_start_loc
        starts, ends = qsl[rows], qsl[[r + 1 for r in rows]]
        idx = torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends, strict=True)])
        lens = (ends - starts).to(torch.int32)
        sub_qsl = torch.zeros(len(rows) + 1, dtype=torch.int32)
        torch.cumsum(lens, 0, out=sub_qsl[1:])
        seq_lens = meta.seq_lens[rows]
        sched = _compat.cpu_scheduler_metadata(
            len(rows),
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            seq_lens,
            self.dtype,
            sub_qsl,
            self.window_size,
            self.isa,
            self.kv_cache_dtype,
        )
        sub = CPUAttentionMetadata(
            num_actual_tokens=int(idx.numel()),
            max_query_len=int(lens.max()),
            query_start_loc=sub_qsl,
            max_seq_len=int(seq_lens.max()),
            seq_lens=seq_lens,
            block_table=meta.block_table[rows],
            slot_mapping=meta.slot_mapping,
            scheduler_metadata=sched,
            causal=True,
        )
        return idx, sub

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)


class SparseCPUAttentionImpl(CPUAttentionBackendImpl):
    """CPU_ATTN's attention plus the sparse path for the rows the builder planned (see the module docstring)."""

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CPUAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scoring = getattr(attn_metadata, "evict", None)
        name = getattr(layer, "layer_name", None)
        if scoring is not None:  # kvplug eviction: the stock attention, then this layer's scores
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale)
            if name in scoring.layers:
                scoring.add_layer(name, query, kv_cache, self.scale)
            return output
        step = getattr(attn_metadata, "sparse", None)
        if step is None or name not in step.layers or output_scale is not None or output_block_scale is not None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale)
        idx = step.layers[name]
        try:
            if all(r.req.method is None or idx < r.req.method.dense_layers for r in step.rows):
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
            try:
                self._sparse(layer, query, kv_cache, step, name, idx, output)
            except Exception as e:  # never into the engine: dense for this layer, and these requests from now on
                ERRORS.labels("attention").inc()
                log.warning("kvplug sparse attention failed on %s, requests fall back to dense: %r", name, e)
                for r in step.rows:
                    r.req.failed = repr(e)
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
            return output
        finally:
            if idx == step.last_layer:
                step.flush()

    def _sparse(
        self,
        layer: Any,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        step: SparseStep,
        name: str,
        idx: int,
        output: torch.Tensor,
    ) -> None:
        if step.dense_meta is not None and step.dense_idx is not None:
            qd = query.index_select(0, step.dense_idx)
            od = output.new_empty(qd.shape[0], *output.shape[1:])
            super().forward(layer, qd, qd, qd, kv_cache, step.dense_meta, od)
            output.index_copy_(0, step.dense_idx, od)
        nb, h, bs, _ = kv_cache.shape
        d = self.head_size
        g = self.num_heads // h
        q = query.index_select(0, step.tok_idx)  # [B, Hq, D]
        # Each (block, head) slab of the cache is a block of a one-head cache ``[blocks * H, 1, ...]`` (a view: the
        # slabs are contiguous), so every (row, KV head) pair becomes a sequence of its own, with a block table of
        # "virtual" block ids ``block * H + head``: one kernel call serves every row and head.
        head_off = torch.arange(h).view(h, 1)
        tables: list[torch.Tensor] = []
        lens: list[int] = []
        extras: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
        for r, row in enumerate(step.rows):
            m = row.req.method
            assert m is not None
            st = row.req.states.get(name)
            n_units = (row.n - 1) // bs
            extra = None
            if st is None or idx < m.dense_layers:  # a dense layer for this request's method
                units = torch.arange(n_units).expand(h, -1)
                step.count("dense")
            else:
                sel = m.select(q[r], st, row.n, row.token_id, layer=idx)
                units = sel.units
                step.count("dense" if sel.dense else "reused" if sel.reused else "ranked")
                if sel.extra_k is not None:
                    assert sel.extra_v is not None and sel.extra_logw is not None
                    extra = (sel.extra_k, sel.extra_v, sel.extra_logw)
            tables.append(torch.cat([row.blocks[units], row.blocks[n_units:].expand(h, -1)], dim=1))
            lens.append(units.shape[1] * bs + row.n - n_units * bs)
            extras.append(extra)
            step.count("attended:" + m.name, lens[-1] * h)
            step.count("context:" + m.name, row.n * h)
        b = len(tables)
        if b == 1:
            table = tables[0].unsqueeze(0)
        else:
            table = torch.zeros(b, h, max(t.shape[1] for t in tables), dtype=torch.long)
            for r, t in enumerate(tables):
                table[r, :, : t.shape[1]] = t
        seq = torch.tensor(lens, dtype=torch.int32)
        if any(e is not None for e in extras):
            out = self._with_pooled(q, kv_cache, table, seq, extras)
            output.index_copy_(0, step.tok_idx, out.to(output.dtype))
            return
        key_cache, value_cache = kv_cache.view(nb * h, 1, bs * 2, -1).chunk(2, dim=2)
        virt = (table * h + head_off).view(b * h, -1).to(torch.int32)
        seq_bh = seq.repeat_interleave(h) if b > 1 else seq.expand(h).contiguous()
        qsl = torch.arange(b * h + 1, dtype=torch.int32)
        key = tuple(lens)
        sched = step.sched_cache.get(key)
        if sched is None:
            sched = step.sched_cache[key] = _compat.cpu_scheduler_metadata(
                b * h, g, 1, d, seq_bh, query.dtype, qsl, -1, layer.isa, self.kv_cache_dtype
            )
        out = output.new_empty(b * h, g, output.shape[-1])
        _compat.cpu_paged_attention(
            query=q.view(b * h, g, d),
            key_cache=key_cache,
            value_cache=value_cache,
            output=out,
            query_start_loc=qsl,
            seq_lens=seq_bh,
            scale=self.scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=virt,
            softcap=self.logits_soft_cap,
            scheduler_metadata=sched,
            s_aux=None,
            dynamic_causal=None,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        output.index_copy_(0, step.tok_idx, out.view(b, h * g, -1))

    def _with_pooled(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        table: torch.Tensor,
        seq: torch.Tensor,
        extras: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None],
    ) -> torch.Tensor:
        """Rows with pooled entries (hierarchical), which the stock kernel cannot weight: the math of
        :func:`kvplug.kernels.reference.paged_decode_attention`, gathering whole (block, head) slabs of the CPU
        ``vec`` layout with one ``index_select`` per row."""
        if self.logits_soft_cap:
            raise NotImplementedError("pooled tokens with a logit soft cap")
        nb, h, bs, _ = kv_cache.shape
        d = self.head_size
        g = self.num_heads // h
        slabs = kv_cache.view(nb * h, 2, d * bs)  # per (block, head): K^T [D, bs] then V [bs, D]
        out = q.new_empty(table.shape[0], h * g, d)
        for r, extra in enumerate(extras):
            n = int(seq[r])
            s = -(-n // bs)
            ids = (table[r, :, :s] * h + torch.arange(h).view(h, 1)).reshape(-1)
            blk = slabs.index_select(0, ids).view(h, s, 2, d * bs).float()
            kt, v = blk[:, :, 0].view(h, s, d, bs), blk[:, :, 1].view(h, s, bs, d)
            qq = q[r].float().view(h, 1, g, d) * self.scale
            logits = torch.matmul(qq, kt).transpose(1, 2).reshape(h, g, s * bs)  # [H, G, S*bs]
            if n < s * bs:
                logits[..., n:] = float("-inf")
            if extra is not None:
                ek, ev, el = extra
                pooled = torch.matmul(qq[:, 0], ek.float().transpose(1, 2)) + el.float().unsqueeze(1)  # [H, G, E]
                p = torch.softmax(torch.cat([logits, pooled], dim=-1), dim=-1)
                o = torch.matmul(p[..., s * bs :], ev.float())
            else:
                p = torch.softmax(logits, dim=-1)
                o = 0.0
            o = o + torch.matmul(p[..., : s * bs].view(h, g, s, bs).transpose(1, 2), v).sum(1)  # [H, G, D]
            out[r] = o.reshape(h * g, d).to(q.dtype)
        return out


class SparseCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with kvplug's sparse decode path (the name stays ``CPU_ATTN``: same KV layout)."""

    @staticmethod
    def get_impl_cls() -> type[SparseCPUAttentionImpl]:
        return SparseCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SparseCPUMetadataBuilder]:
        return SparseCPUMetadataBuilder
