"""Baselines that need no attention: StreamingLLM, recent-only, random, key norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.base import DecodeState, Evictor, LayerKV
from kvplug.methods.registry import register


def recency(layer: LayerKV) -> Tensor:
    """Scores that keep the most recent tokens: the slot index, ``[B, H, N]``."""
    n = layer.length
    return torch.arange(n, device=layer.keys.device, dtype=torch.float32).expand(layer.batch, layer.heads, n)


def first(n: int, count: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device) < count


def last(n: int, count: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device) >= n - count


@register("streamingllm")
@dataclass
class StreamingLLM(Evictor):
    """StreamingLLM (Xiao et al., ICLR'24, arXiv 2309.17453): attention sinks plus the most recent tokens."""

    num_sinks: int = 4
    supports_decode = True

    def __post_init__(self) -> None:
        if self.num_sinks < 0:
            raise ConfigError(f"streamingllm: num_sinks must be >= 0, got {self.num_sinks}")
        super().__post_init__()

    def forced_keeps(self) -> tuple[int, str]:
        return self.num_sinks + 1, f"{self.num_sinks} sinks and the newest token"

    def score(self, layer: LayerKV) -> Tensor:
        return recency(layer)

    def protected(self, n: int, budget: int, device: torch.device) -> Tensor:
        return first(n, self.num_sinks, device)


@register("recent")
@dataclass
class Recent(Evictor):
    """Recent-only baseline (a sliding window): keeps the last ``budget`` tokens."""

    supports_decode = True

    def score(self, layer: LayerKV) -> Tensor:
        return recency(layer)


@register("random")
@dataclass
class Random(Evictor):
    """Random baseline (kvpress RandomPress): uniform scores from a generator seeded by (seed, layer, step)."""

    seed: int = 0
    supports_decode = True

    def score(self, layer: LayerKV) -> Tensor:
        return self._uniform(layer, 0)

    def decode_scores(self, layer: LayerKV, state: DecodeState) -> Tensor:
        return self._uniform(layer, state.step + 1)

    def _uniform(self, layer: LayerKV, step: int) -> Tensor:
        mixed = ((self.seed * 1_000_003 + layer.layer_idx) * 1_000_033 + step) % (2**63)
        g = torch.Generator().manual_seed(mixed)
        return torch.rand(layer.batch, layer.heads, layer.length, generator=g).to(layer.keys.device)


@register("knorm")
@dataclass
class Knorm(Evictor):
    """Knorm (Devoto et al., EMNLP'24, arXiv 2406.11430): keep the keys with the lowest L2 norm."""

    supports_decode = True

    def score(self, layer: LayerKV) -> Tensor:
        return -layer.keys.float().norm(dim=-1)


@register("keydiff")
@dataclass
class KeyDiff(Evictor):
    """KeyDiff (Park et al., arXiv 2504.15364): keep the keys least similar (cosine) to the head's mean key
    direction. One pass over the prompt, as kvpress's KeyDiffPress (the paper's block-wise streaming prefill is
    that ranking applied per block)."""

    supports_decode = True

    def score(self, layer: LayerKV) -> Tensor:
        k = layer.keys.float()
        anchor = torch.nn.functional.normalize(k, dim=-1).mean(dim=2, keepdim=True)
        return -torch.nn.functional.cosine_similarity(k, anchor, dim=-1)
