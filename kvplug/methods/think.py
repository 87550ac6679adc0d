"""ThinK: prune the key channels that matter least to the observation-window queries."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.attention import grouped
from kvplug.methods.base import CompressedLayer, LayerKV, Transform, slots, visible_lengths
from kvplug.methods.registry import register


@register("think")
@dataclass
class ThinK(Transform):
    """ThinK (Xu et al., arXiv 2407.21018): per KV head, drop the ``key_channel_ratio`` of key channels
    with the lowest ``mean_w(q^2) * mean_n(k^2)`` (window queries, GQA mean); the last ``recent_size`` keys
    stay whole. Pruned channels come back as zeros; ``nbytes`` counts the kept channels plus a channel mask."""

    key_channel_ratio: float = 0.4
    window_size: int = 32
    recent_size: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.key_channel_ratio < 1.0:
            raise ConfigError(f"think: key_channel_ratio must be in [0, 1), got {self.key_channel_ratio}")
        if self.window_size < 1 or self.recent_size < 0:
            raise ConfigError("think: window_size must be >= 1 and recent_size >= 0")

    @property
    def query_window(self) -> int | None:
        return self.window_size

    def pruned_channels(self, layer: LayerKV, keep: Tensor | None = None) -> Tensor:
        """Bool ``[B, H, D]``: the channels pruned in each head."""
        if layer.queries is None:
            raise ValueError("think: needs the window queries (layer.queries)")
        d = layer.head_dim
        count = int(d * self.key_channel_ratio)  # as the official code: int(head_dim * ratio)
        q = grouped(layer.queries[:, :, -self.window_size :], layer.heads).float()
        q2 = q.pow(2).mean(dim=(2, 3))  # [B, H, D]
        k2 = layer.keys.float().pow(2)
        if keep is not None:
            k2 = k2 * keep.unsqueeze(-1)
        k2 = k2.sum(2) / visible_lengths(layer, keep).clamp_min(1).unsqueeze(-1)
        score = q2 * k2
        lowest = torch.sort(score, dim=-1, stable=True).indices[..., :count]
        mask = torch.zeros_like(score, dtype=torch.bool)
        return mask.scatter(-1, lowest, True)

    def apply(self, layer: LayerKV, keep: Tensor | None = None) -> CompressedLayer:
        layer.check()
        lengths = visible_lengths(layer, keep)  # [B, H]
        pruned = self.pruned_channels(layer, keep)  # [B, H, D]
        old = slots(layer) < (lengths - self.recent_size).unsqueeze(-1)  # [B, H, N] tokens whose keys are pruned
        zero = old.unsqueeze(-1) & pruned.unsqueeze(2)
        keys = layer.keys.masked_fill(zero, 0)
        d, ek, ev = layer.head_dim, layer.keys.element_size(), layer.values.element_size()
        n_old = int(old.sum())
        n_vis = int(lengths.sum())
        kept_channels = d - int(pruned[0, 0].sum()) if pruned.numel() else d
        key_bytes = n_old * kept_channels * ek + (n_vis - n_old) * d * ek
        mask_bytes = layer.batch * layer.heads * math.ceil(d / 8)
        nbytes = key_bytes + mask_bytes + n_vis * d * ev
        return CompressedLayer(keys, layer.values, keep, nbytes, None)
