"""The connector's blending halves: :class:`BlendPlanner` on the scheduler side (finds a request's segments, looks
them up, decides whether the request may blend) and :class:`BlendLoader` on the worker side (loads the found
segments with keys re-rotated to their new positions, and stores the segments that were computed in place)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from kvplug import metrics
from kvplug.cache import KVCache
from kvplug.integrations.vllm.blend.plan import BlendConfig, BlendSpec, SegmentRef
from kvplug.integrations.vllm.blend.runtime import BlendPlan, LoadedSegment
from kvplug.integrations.vllm.blend.segmenting import (
    MessageMarkers,
    explicit_segments,
    keep_long,
    message_segments,
    separator_segments,
)
from kvplug.methods.blend import SegmentKV, SegmentStore, rerotate, rope_for_layer

log = logging.getLogger("kvplug.vllm.blend")


def refuse(reason: str) -> None:
    metrics.BLEND_REQUESTS.labels("refused").inc()
    metrics.BLEND_FALLBACKS.labels(reason).inc()


class BlendPlanner:
    """Scheduler side (see the module docstring)."""

    def __init__(self, config: BlendConfig | None, vllm_config: Any, lookup_timeout: float) -> None:
        self.config = config
        self.vllm_config = vllm_config
        self.lookup_timeout = lookup_timeout
        self._tokenizer: Any = None
        self._markers: MessageMarkers | None = None
        self._separators: dict[str, list[int]] = {}

    def request_config(self, params: dict[str, Any] | None) -> BlendConfig | None:
        """The engine's blend config overridden by the request's ``kv_transfer_params["blend"]``."""
        value = (params or {}).get("blend") if isinstance(params, dict) else None
        return BlendConfig.parse(value, self.config, where="kv_transfer_params.blend")

    def _tok(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            mc = self.vllm_config.model_config
            self._tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision)
        return self._tokenizer

    def spans(self, cfg: BlendConfig, tokens: list[int]) -> list[tuple[int, int]]:
        if cfg.warm:
            return [(0, len(tokens))]
        if cfg.segments is not None:
            return explicit_segments([list(s) for s in cfg.segments], len(tokens))
        spans: list[tuple[int, int]] = []
        if cfg.separator:
            if cfg.separator not in self._separators:
                ids = self._tok()(cfg.separator.rstrip(), add_special_tokens=False).input_ids
                self._separators[cfg.separator] = list(ids)
            spans = separator_segments(tokens, self._separators[cfg.separator])
        elif cfg.messages:
            if self._markers is None:
                self._markers = MessageMarkers.from_tokenizer(self._tok())
            spans = message_segments(tokens, self._markers)
        return keep_long(spans, cfg.min_tokens)

    def plan(
        self, request: Any, cfg: BlendConfig, cache: KVCache, num_computed: int, block_size: int
    ) -> BlendSpec | None:
        """A blend plan for ``request``, or None (it runs normally; the reason is counted and logged)."""
        tokens = list(request.prompt_token_ids or [])
        sp = getattr(request, "sampling_params", None)
        sched = self.vllm_config.scheduler_config
        if sp is not None and getattr(sp, "prompt_logprobs", None):
            return self._no(request, "prompt_logprobs", "prompt logprobs need every row's hidden state")
        if self.vllm_config.cache_config.enable_prefix_caching and not getattr(request, "cache_salt", None):
            return self._no(
                request,
                "unsalted",
                "vLLM's prefix cache is on: blended KV must not be cached as exact blocks; "
                "send a unique cache_salt with blend requests (or turn prefix caching off)",
            )
        if num_computed:
            return self._no(request, "prefix_cached", "part of the prompt was already computed")
        if len(tokens) > sched.max_num_batched_tokens:
            limit = sched.max_num_batched_tokens
            return self._no(request, "too_long", f"the prompt exceeds max_num_batched_tokens {limit}")
        spans = self.spans(cfg, tokens)
        if not spans:
            return self._no(request, "no_segments", "no segment found in the prompt")
        store = SegmentStore(cache.store, cache.namespace, payloads=cache.payloads)
        keys = [store.key(tokens[s:e]) for s, e in spans]
        found = cache.store.exists_many(keys, timeout=self.lookup_timeout)
        for f in found:
            metrics.BLEND_SEGMENTS.labels("hit" if f else "miss").inc()
        refs = [SegmentRef(s, e, k, f) for (s, e), k, f in zip(spans, keys, found, strict=True)]
        return BlendSpec(
            request.request_id, tokens, "", refs, cfg.strategy, dict(cfg.params), cfg.save, [], warm=cfg.warm
        )

    @staticmethod
    def _no(request: Any, reason: str, why: str) -> None:
        refuse(reason)
        log.warning("kvplug: request %s runs without blending: %s", request.request_id, why)
        return None


class BlendLoader:
    """Worker side (see the module docstring)."""

    def __init__(self, vllm_config: Any, block_size: int) -> None:
        self.hf_config = vllm_config.model_config.hf_config
        self.block_size = block_size
        self._ropes: dict[int, Any] = {}

    def _rope(self, layer: int) -> Any:
        if layer not in self._ropes:
            self._ropes[layer] = rope_for_layer(self.hf_config, layer)
        return self._ropes[layer]

    def load(self, spec: BlendSpec, cache: KVCache, dtype: torch.dtype) -> BlendPlan:
        """Fetch the found segments (a refused one becomes a miss) and move their keys to the new positions."""
        store = SegmentStore(cache.store, cache.namespace, payloads=cache.payloads)
        segs: list[LoadedSegment] = []
        for ref in spec.segments:
            kv = None
            meta: dict[str, Any] = {}
            if ref.found and not spec.warm:
                seg = store.get(spec.prompt[ref.start : ref.end])
                if seg is None:
                    metrics.BLEND_SEGMENTS.labels("refused").inc()
                else:
                    kv, meta = self._move(seg, ref.start, dtype), seg.meta
            segs.append(LoadedSegment(ref.start, ref.end, kv, meta, ref.key))
        strategy = BlendConfig(strategy=spec.strategy, params=spec.params).build_strategy()
        return BlendPlan(spec.req_id, spec.prompt, segs, strategy)

    def _move(self, seg: SegmentKV, start: int, dtype: torch.dtype) -> torch.Tensor:
        """The segment's KV with keys re-rotated from the positions it was computed at to ``start``..."""
        kv = seg.kv.clone()
        new_pos = torch.arange(start, start + seg.num_tokens)
        if not torch.equal(seg.positions, new_pos):
            for layer in range(kv.shape[0]):
                k = kv[layer, 0].transpose(0, 1)  # [H, T, D]
                kv[layer, 0] = rerotate(k, seg.positions, new_pos, self._rope(layer)).transpose(0, 1).to(kv.dtype)
        return kv.to(dtype)

    def store_missing(
        self, spec: BlendSpec, plan: BlendPlan | None, cache: KVCache, read: Callable[[torch.Tensor], torch.Tensor]
    ) -> list[SegmentKV]:
        """The segments computed in place this step (not found, or a warm request), read from the paged cache:
        ``read(slots)`` gives ``[layers, 2, T, H, D]`` at token slots."""
        if not spec.save:
            return []
        out = []
        ids = torch.tensor(spec.block_ids, dtype=torch.long)
        for ref in spec.segments:
            if ref.found:
                continue
            t = torch.arange(ref.start, ref.end)
            slots = ids[t // self.block_size] * self.block_size + t % self.block_size
            meta = {"computed": "isolation" if spec.warm else "in place"}
            out.append(SegmentKV(spec.prompt[ref.start : ref.end], read(slots), t.clone(), meta=meta))
        return out
