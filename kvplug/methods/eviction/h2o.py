"""Accumulated-attention evictors: H2O (heavy hitters) and Scissorhands (persistence of importance)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.attention import accumulated_rows, layer_accumulated_attention, layer_window_attention
from kvplug.methods.base import CompressedLayer, DecodeState, Evictor, LayerKV
from kvplug.methods.eviction.baselines import last
from kvplug.methods.eviction.snapkv import pool
from kvplug.methods.registry import register


def _grow(t: Tensor | None, shape: tuple[int, ...], n: int, fill: float | bool = 0) -> Tensor | None:
    """Pad a token-aligned tensor on its last axis up to ``n`` tokens (the ones appended since last step)."""
    if t is None:
        return None
    if t.shape[-1] > n:
        raise ValueError(f"decode state covers {t.shape[-1]} tokens, the cache has {n}: apply each selection")
    if t.shape[-1] == n:
        return t
    pad = torch.full((*shape, n - t.shape[-1]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=-1)


@register("h2o")
@dataclass
class H2O(Evictor):
    """H2O (Zhang et al., NeurIPS'23, arXiv 2306.14048): heavy hitters by accumulated attention plus recent
    tokens; ``recent_ratio`` of the budget is the recent window (the paper's 10% + 10% is 0.5). At prefill the
    attention of every prompt query is accumulated; ``prefill_queries`` caps it to the last ones (cheaper).
    ``normalize`` divides each key's sum by the number of prompt queries that see it (kvpress's
    ObservedAttentionPress; the paper's plain sum favours early tokens, which more queries see); it changes the
    prefill choice only, decode steps accumulate as in the paper."""

    recent_ratio: float = 0.5
    prefill_queries: int | None = None
    normalize: bool = False
    supports_decode = True
    decode_needs_queries = True
    running_scores = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ConfigError(f"h2o: recent_ratio must be in [0, 1], got {self.recent_ratio}")
        if self.prefill_queries is not None and self.prefill_queries < 1:
            raise ConfigError(f"h2o: prefill_queries must be >= 1 or None, got {self.prefill_queries}")
        super().__post_init__()

    @property
    def query_window(self) -> int | None:
        return self.prefill_queries  # None: every prompt query's attention is accumulated

    def recent(self, budget: int) -> int:
        return min(budget, math.floor(budget * self.recent_ratio + 0.5))

    @property
    def uses_attention_sums(self) -> bool:  # type: ignore[override]
        return self.prefill_queries is None

    def seen_by(self, layer: LayerKV, positions: Tensor) -> Tensor:
        """How many of the accumulated prompt queries see each key at ``positions`` (causal)."""
        n = layer.length
        rows = accumulated_rows(layer, self.prefill_queries)
        return (n - positions).clamp(min=1, max=rows).float()

    def score(self, layer: LayerKV) -> Tensor:
        s = layer_accumulated_attention(layer, self.prefill_queries).mean(dim=2)
        if self.normalize:
            s = s / self.seen_by(layer, torch.arange(layer.length, device=s.device))
        return s

    def select(self, layer: LayerKV, scores: Tensor, budgets: Tensor) -> CompressedLayer:
        out = super().select(layer, scores, budgets)
        if self.normalize and out.scores is not None and out.indices is not None:  # decode seeds are plain sums
            out.scores = out.scores * self.seen_by(layer, out.indices.clamp_min(0))
        return out

    def protected(self, n: int, budget: int, device: torch.device) -> Tensor:
        return last(n, self.recent(budget), device)

    def decode_scores(self, layer: LayerKV, state: DecodeState) -> Tensor:
        b, h, n = layer.batch, layer.heads, layer.length
        now = layer_window_attention(layer, 1)[:, :, :, -1].mean(dim=2)  # [B, H, n]
        prev = _grow(state.scores.to(now.device).float() if state.scores is not None else None, (b, h), n)
        state.scores = now if prev is None else prev + now
        return state.scores


@register("scissorhands")
@dataclass
class Scissorhands(Evictor):
    """Scissorhands (Liu et al., NeurIPS'23, arXiv 2305.17118): keep the tokens that were important (attention
    at least the average 1/t) most often over the last ``history_window`` queries; a recent window is kept.
    The counts are max-pooled over ``kernel_size`` neighbouring positions (1 = off): without it, heads whose
    attention is spread flat rank a multi-token needle by noise and split it."""

    history_window: int = 32
    recent_window: int = 32
    kernel_size: int = 7
    supports_decode = True
    decode_needs_queries = True

    def __post_init__(self) -> None:
        if self.history_window < 1 or self.recent_window < 0 or self.kernel_size < 1:
            raise ConfigError("scissorhands: history_window and kernel_size must be >= 1 and recent_window >= 0")
        super().__post_init__()

    def forced_keeps(self) -> tuple[int, str]:
        return max(1, self.recent_window), "the recent window"

    @property
    def query_window(self) -> int | None:
        return self.history_window

    def score(self, layer: LayerKV) -> Tensor:
        probs = layer_window_attention(layer, self.history_window).mean(dim=2)  # [B, H, W, N]
        n, w = layer.length, probs.shape[2]
        visible = torch.arange(n - w + 1, n + 1, device=probs.device, dtype=torch.float32).view(1, 1, w, 1)
        return pool((probs >= 1.0 / visible).sum(dim=2).float(), self.kernel_size, "max")

    def protected(self, n: int, budget: int, device: torch.device) -> Tensor:
        return last(n, min(self.recent_window, budget), device)

    def decode_scores(self, layer: LayerKV, state: DecodeState) -> Tensor:
        b, h, n = layer.batch, layer.heads, layer.length
        p = layer_window_attention(layer, 1)[:, :, :, -1].mean(dim=2)  # [B, H, n]
        row = (p >= 1.0 / n).unsqueeze(2)
        hist = state.history
        if hist is not None:
            hist = _grow(hist.to(row.device), (b, h, hist.shape[2]), n, False)
            row = torch.cat([hist, row], dim=2)[:, :, -self.history_window :]
        state.history = row
        return pool(row.sum(dim=2).float(), self.kernel_size, "max")
