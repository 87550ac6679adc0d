"""KV eviction inside vLLM with the memory really freed: StreamingLLM as a sink-plus-window KV cache spec.

Switch it on for an engine with one of (first found wins)::

    LLM(..., additional_config={"kvplug_evict": {"method": "streamingllm", "num_sinks": 4, "window": 1020}})
    --additional-config '{"kvplug_evict": {"method": "streamingllm", "window": 1020}}'
    kv_connector_extra_config: {"evict": {...}}          # when the kvplug connector is configured
    KVPLUG_EVICT='{"method": "streamingllm", "window": 1020}'

How it works (vLLM 0.32, CPU_ATTN):

- Every full-attention layer reports a :class:`StreamingSpec` (a ``FullAttentionSpec`` with the sink and window
  sizes) instead of vLLM's ``FullAttentionSpec``; the spec is registered with vLLM's ``KVCacheSpecRegistry``
  together with :class:`StreamingManager`, so the scheduler's KV cache manager for the layers is kvplug's.
- Once a request's prompt is computed, the manager frees every block that is neither a sink block nor inside the
  window: the real block goes back to vLLM's free pool (other requests can use it at once) and the request's block
  table gets vLLM's null block in its place, so logical positions are kept. Blocks are freed as the generation
  grows, so a long generation holds ``sink blocks + window / block_size + 1`` blocks whatever its length.
- The attention-metadata builder of kvplug's ``CPU_ATTN`` (``sparse_backend``) drops the same blocks from each
  row's block table and shortens its sequence length (:func:`compact`). Keys carry their rotary positions already,
  so nothing else changes: the model sees positions as without eviction.

Semantics (deterministic, independent of batching and of when the scheduler frees): the prompt is prefilled with
full attention (compress after prefill, as kvpress and kvplug's HF path do); a token at position ``p`` after the
prompt attends to the sink blocks (``ceil(num_sinks / block_size)`` blocks) and to every block from
``floor((p + 1 - window) / block_size)`` on, i.e. at least the last ``window`` tokens. With ``window`` at least
the request's length nothing is freed and the output is bit-for-bit the normal path's.

Prefix caching: only prompt blocks (computed with full attention) enter vLLM's prefix cache; blocks computed after
an eviction never do. A request resumed after preemption recomputes its prompt and output in one prefill: output
tokens past the prompt then attend to the window counted from their chunk's first token (a little more than they
saw while decoding), so a resumed request can differ from an uninterrupted one after the resumption point.

Limits: one method (StreamingLLM); the kvplug connector is refused alongside (it saves requests by block id);
sliding-window layers keep vLLM's own spec; the sparse-attention backend and eviction are exclusive.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from kvplug.errors import ConfigError
from kvplug.integrations.vllm import _compat

log = logging.getLogger("kvplug.vllm.evict")

CONFIG_KEY = "kvplug_evict"  # additional_config key
CONNECTOR_KEY = "evict"  # kv_connector_extra_config key
ENV_VAR = "KVPLUG_EVICT"
METHODS = ("streamingllm",)

FREED = Counter("kvplug_evict_blocks_freed", "KV blocks returned to vLLM's free pool by eviction", ["method"])


@dataclass(frozen=True)
class StreamingLLMConfig:
    """StreamingLLM (Xiao et al., ICLR'24, arXiv 2309.17453): attention sinks plus a window of recent tokens.

    Defaults from the paper's setting: 4 sink tokens and a 1024-token cache (4 + 1020)."""

    num_sinks: int = 4
    window: int = 1020
    method: str = "streamingllm"

    @classmethod
    def parse(cls, raw: Any, source: str) -> StreamingLLMConfig:
        if isinstance(raw, str):
            text = raw.strip()
            raw = json.loads(text) if text.startswith("{") else {"method": text}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected an object like {{'method': 'streamingllm'}}, got {raw!r}")
        raw = dict(raw)
        method = str(raw.pop("method", "streamingllm")).lower()
        if method not in METHODS:
            raise ConfigError(f"{source}: unknown eviction method {method!r} inside vLLM (supported: {METHODS})")
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


def engine_config(vllm_config: Any) -> StreamingLLMConfig | None:
    """The engine's eviction config from ``additional_config``, the kvplug connector's extra config or the
    environment (in that order); ``None`` when none is given."""
    extra = getattr(vllm_config, "additional_config", None)
    if isinstance(extra, dict) and extra.get(CONFIG_KEY) is not None:
        return StreamingLLMConfig.parse(extra[CONFIG_KEY], f"additional_config.{CONFIG_KEY}")
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    conn = getattr(ktc, "kv_connector_extra_config", None) or {}
    if ktc is not None and conn.get(CONNECTOR_KEY) is not None:
        return StreamingLLMConfig.parse(conn[CONNECTOR_KEY], f"kv_connector_extra_config.{CONNECTOR_KEY}")
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env.lower() not in ("0", "off", "false", "none"):
        return StreamingLLMConfig.parse(env, ENV_VAR)
    return None


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


class StreamingManager(FullAttentionManager):
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

    def cache_blocks(self, request: Any, num_tokens: int, *args: Any, **kwargs: Any) -> None:
        # only prompt blocks are a plain prefix: later blocks were computed with evicted context
        super().cache_blocks(request, min(num_tokens, request.num_prompt_tokens), *args, **kwargs)


def register() -> None:
    """Register :class:`StreamingSpec` with vLLM (idempotent) and make full-attention layers report it when the
    engine's config asks for eviction. Runs in every vLLM process (the kvplug plugin)."""
    _compat.register_kv_spec(StreamingSpec, StreamingManager)
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
    return StreamingSpec(**fields, num_sinks=cfg.num_sinks, window=cfg.window)


# ---- the worker side: drop evicted blocks from the attention metadata ----------------------------------------------
def compact(spec: StreamingSpec, cm: Any) -> Any:
    """``cm`` (vLLM's ``CommonAttentionMetadata``) with every row past its prompt reading only its sink blocks and
    its window: the block table row is compacted and the sequence length shortened by the dropped blocks. Rows of
    prompt prefill are left whole. Returns ``cm`` itself when no row changes (or outside a real batch)."""
    rows = _compat.batch_requests(cm.num_reqs)
    if rows is None:
        return cm
    qsl = cm.query_start_loc_cpu.tolist()
    seq_lens = cm.seq_lens.tolist() if cm.seq_lens.device.type == "cpu" else cm.seq_lens.cpu().tolist()
    bs, sink = spec.block_size, spec.sink_blocks
    table, lens = None, None
    for i, (_, state) in enumerate(rows):
        n = seq_lens[i]
        first = n - (qsl[i + 1] - qsl[i])  # position of the row's first query token
        if first < len(state.prompt_token_ids or ()):
            continue
        start = spec.window_start_block(first)
        if start <= sink:
            continue
        if table is None:
            table, lens = cm.block_table_tensor.clone(), cm.seq_lens.clone()
        nb = -(-n // bs)
        keep = nb - start
        table[i, sink : sink + keep] = cm.block_table_tensor[i, start:nb]
        lens[i] = n - (start - sink) * bs
    if table is None:
        return cm
    return dataclasses.replace(cm, block_table_tensor=table, seq_lens=lens, max_seq_len=int(lens.max().item()))
