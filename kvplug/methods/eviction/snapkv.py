"""Observation-window scoring: SnapKV, and PyramidKV's layer budgets on top of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.attention import layer_window_attention
from kvplug.methods.base import Evictor, LayerKV, same_length
from kvplug.methods.budget import pyramid_budgets
from kvplug.methods.eviction.baselines import last
from kvplug.methods.registry import register


def pool(scores: Tensor, kernel: int, how: str) -> Tensor:
    """1-D pooling over the last axis, same length, stride 1 (``how``: "max" or "avg", zero padding counted)."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    fn = F.max_pool1d if how == "max" else F.avg_pool1d
    return fn(x, kernel_size=kernel, stride=1, padding=kernel // 2)[..., : shape[-1]].reshape(shape)


@register("snapkv")
@dataclass
class SnapKV(Evictor):
    """SnapKV (Li et al., NeurIPS'24, arXiv 2404.14469): attention of the last ``window_size`` queries, summed and
    pooled over positions, mean over each GQA group; the window itself is always kept."""

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"

    def __post_init__(self) -> None:
        if self.window_size < 1 or self.kernel_size < 1:
            raise ConfigError(f"{self.name}: window_size and kernel_size must be >= 1")
        if self.pooling not in ("max", "avg"):
            raise ConfigError(f"{self.name}: pooling must be 'max' or 'avg', got {self.pooling!r}")
        super().__post_init__()

    def forced_keeps(self) -> tuple[int, str]:
        return self.window_size, "the observation window"

    @property
    def query_window(self) -> int | None:
        return self.window_size

    def score(self, layer: LayerKV) -> Tensor:
        probs = layer_window_attention(layer, self.window_size)  # [B, H, G, W, N]
        n = layer.length
        prefix = n - min(self.window_size, n)
        out = torch.zeros(layer.batch, layer.heads, n, device=probs.device)
        if prefix:
            s = pool(probs[..., :prefix].sum(dim=3), self.kernel_size, self.pooling)
            out[..., :prefix] = s.mean(dim=2)
        return out

    def protected(self, n: int, budget: int, device: torch.device) -> Tensor:
        return last(n, min(self.window_size, budget), device)


@register("pyramidkv")
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., arXiv 2406.02069): SnapKV scores, layer budgets decreasing linearly with depth
    (``beta`` sets the top/bottom ratio), total equal to the uniform budget. ``schedule="factory"`` is the
    official code's (KVCache-Factory: the pyramid splits the budget minus the window, every layer adds the
    window); ``"kvpress"`` is kvpress 0.5.5's (the window inside each layer's budget; uniform SnapKV whenever the
    top layer's budget would fall below the window)."""

    beta: float = 20.0
    schedule: str = "factory"

    def __post_init__(self) -> None:
        if self.beta < 1:
            raise ConfigError(f"pyramidkv: beta must be >= 1, got {self.beta}")
        if self.schedule not in ("factory", "kvpress"):
            raise ConfigError(f"pyramidkv: schedule must be 'factory' or 'kvpress', got {self.schedule!r}")
        super().__post_init__()

    def layer_budgets(self, num_layers: int, n: int) -> list[int]:
        """Tokens kept per head in each of ``num_layers`` layers for a prompt of ``n``."""
        if self.schedule == "factory":
            return [int(b) for b in pyramid_budgets(num_layers, self.budget(n), self.window_size, n, self.beta)]
        kept = n * (1 - self.compression_ratio) if self.token_budget is None else float(min(n, self.token_budget))
        w = self.window_size
        lo = kept / self.beta
        hi = 2 * kept - lo
        if hi >= n - w:
            hi = n - w
            lo = 2 * kept - hi
        if not n >= hi >= lo >= w:
            return [max(1, round(kept))] * num_layers
        steps = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
        return [round(hi - i * steps) for i in range(num_layers)]

    def head_budgets(self, layers: Sequence[LayerKV], scores: Sequence[Tensor]) -> list[Tensor]:
        n = same_length(self.name, layers)
        if len(layers) == 1:  # a per-layer hook: place it by layer_idx among num_layers
            la = layers[0]
            return [torch.full((la.heads,), self.layer_budgets(la.num_layers, n)[la.layer_idx], dtype=torch.long)]
        per_layer = self.layer_budgets(len(layers), n)
        return [torch.full((la.heads,), b, dtype=torch.long) for la, b in zip(layers, per_layer, strict=True)]
