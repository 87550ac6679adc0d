"""CAKE: layer budgets from each layer's attention dispersion and shift, eviction by mean + gamma * variance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.attention import layer_window_attention
from kvplug.methods.base import CompressedLayer, Evictor, LayerKV, _checked, full_layer, same_length
from kvplug.methods.budget import allocate
from kvplug.methods.eviction.baselines import last
from kvplug.methods.eviction.snapkv import pool
from kvplug.methods.registry import register


@register("cake")
@dataclass
class CAKE(Evictor):
    """CAKE (Qin et al., ICLR'25, arXiv 2503.12491): layer preference ``H^(1/tau1) * V^(1/tau2)`` (entropy and
    variance of window attention) splits the model's budget; tokens ranked by mean + gamma * variance."""

    window_size: int = 32
    kernel_size: int = 5
    whole_model = True
    gamma: float = 200.0
    tau1: float = 1.0
    tau2: float = 1.0

    def __post_init__(self) -> None:
        if self.window_size < 1 or self.kernel_size < 1:
            raise ConfigError("cake: window_size and kernel_size must be >= 1")
        if self.tau1 <= 0 or self.tau2 <= 0 or self.gamma < 0:
            raise ConfigError("cake: tau1 and tau2 must be > 0, gamma >= 0")
        super().__post_init__()

    def forced_keeps(self) -> tuple[int, str]:
        return self.window_size, "the observation window"

    @property
    def query_window(self) -> int | None:
        return self.window_size

    def stats(self, layer: LayerKV) -> tuple[Tensor, float]:
        """(eviction indicator ``[B, H, N]``, layer preference)."""
        probs = layer_window_attention(layer, self.window_size)  # [B, H, G, W, N]
        n, w = layer.length, probs.shape[3]
        prefix = n - min(self.window_size, n)
        pre = probs[..., :prefix]
        dispersion = float(-(pre * torch.log(pre + 1e-10)).sum())
        var = probs.var(dim=3) if w > 1 else torch.zeros_like(probs[:, :, :, 0])
        shift = float(var[..., :prefix].sum())
        pref = dispersion ** (1 / self.tau1) * shift ** (1 / self.tau2)
        indicator = torch.zeros(layer.batch, layer.heads, n, device=probs.device)
        if prefix:
            ind = probs.mean(dim=3)[..., :prefix] + self.gamma * var[..., :prefix]
            indicator[..., :prefix] = pool(ind, self.kernel_size, "avg").mean(dim=2)
        return indicator, pref

    def score(self, layer: LayerKV) -> Tensor:
        return self.stats(layer)[0]

    def protected(self, n: int, budget: int, device: torch.device) -> Tensor:
        return last(n, min(self.window_size, budget), device)

    def layer_budgets(self, n: int, prefs: Sequence[float]) -> Tensor:
        """Per-layer budgets: the window in every layer, the rest of ``L * budget`` split by preference."""
        k = self.budget(n)
        w = min(self.window_size, k)
        num = len(prefs)
        return w + allocate(prefs, num * (k - w), [n - w] * num)

    def compress(self, layers: Sequence[LayerKV]) -> list[CompressedLayer]:
        layers = _checked(layers)
        n = same_length(self.name, layers)
        if self.budget(n) >= n:
            return [full_layer(la) for la in layers]
        stats = [self.stats(la) for la in layers]
        budgets = self.layer_budgets(n, [p for _, p in stats])
        return [
            self.select(la, s, torch.full((la.heads,), int(b), dtype=torch.long))
            for la, (s, _), b in zip(layers, stats, budgets, strict=True)
        ]
