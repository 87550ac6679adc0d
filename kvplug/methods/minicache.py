"""MiniCache: merge adjacent layers' KV from the middle of the model on (shared direction, own magnitudes)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.base import INDEX_BYTES, CompressedLayer, KVMethod, LayerKV, _checked, raw_bytes, same_length
from kvplug.methods.registry import register

EPS = 1e-8


def slerp(u1: Tensor, u2: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """Spherical interpolation of unit vectors ``[..., D]`` at ``t`` (0 = u1); also returns the angle."""
    cos = (u1 * u2).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    near = sin < 1e-6
    safe = torch.where(near, torch.ones_like(sin), sin)
    a = torch.where(near, torch.full_like(sin, 1 - t), torch.sin((1 - t) * omega) / safe)
    b = torch.where(near, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    e = a * u1 + b * u2
    return e / e.norm(dim=-1, keepdim=True).clamp_min(EPS), omega.squeeze(-1)


@register("minicache")
@dataclass
class MiniCache(KVMethod):
    """MiniCache (Liu et al., NeurIPS'24, arXiv 2405.14366): from ``start_layer`` (default L/2) on, layers are
    merged in adjacent pairs: one SLERP direction (``interpolation`` t) per token, each layer keeps its own
    magnitudes; the ``retention_ratio`` of tokens with the widest angle stay unmerged in both layers. The merge
    rests on adjacent layers' KV being similar: a pair's keys (values) are merged only when their mean per-token
    cosine similarity is at least ``min_similarity`` (-1 merges everything, as the paper's fixed schedule)."""

    start_layer: int | None = None
    interpolation: float = 0.6
    retention_ratio: float = 0.05
    min_similarity: float = 0.5
    whole_model = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.interpolation <= 1.0:
            raise ConfigError(f"minicache: interpolation must be in [0, 1], got {self.interpolation}")
        if not 0.0 <= self.retention_ratio <= 1.0:
            raise ConfigError(f"minicache: retention_ratio must be in [0, 1], got {self.retention_ratio}")
        if self.start_layer is not None and self.start_layer < 0:
            raise ConfigError(f"minicache: start_layer must be >= 0, got {self.start_layer}")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ConfigError(f"minicache: min_similarity must be in [-1, 1], got {self.min_similarity}")

    def pairs(self, num_layers: int) -> list[tuple[int, int]]:
        """Positions (in the layers passed to ``compress``) merged together."""
        start = num_layers // 2 if self.start_layer is None else self.start_layer
        return [(i, i + 1) for i in range(start, num_layers - 1, 2)]

    def compress(self, layers: Sequence[LayerKV]) -> list[CompressedLayer]:
        layers = _checked(layers)
        n = same_length(self.name, layers)
        out: list[CompressedLayer | None] = [None] * len(layers)
        for a, b in self.pairs(len(layers)):
            la, lb = layers[a], layers[b]
            if la.keys.shape != lb.keys.shape:
                raise ValueError(f"minicache: layers {a} and {b} differ in shape")
            ka, kb, kbytes = self.merge_if_similar(la.keys, lb.keys)
            va, vb, vbytes = self.merge_if_similar(la.values, lb.values)
            total = kbytes + vbytes
            out[a] = CompressedLayer(ka, va, None, (total + 1) // 2, None)
            out[b] = CompressedLayer(kb, vb, None, total // 2, None)
        for i, la in enumerate(layers):
            if out[i] is None:
                whole = raw_bytes(la.keys, la.values, la.batch * la.heads * n)
                out[i] = CompressedLayer(la.keys, la.values, None, whole, None)
        return [c for c in out if c is not None]

    @staticmethod
    def similarity(x1: Tensor, x2: Tensor) -> float:
        """Mean per-token cosine similarity of two layers' ``[B, H, N, D]`` keys (or values)."""
        return float(torch.nn.functional.cosine_similarity(x1.float(), x2.float(), dim=-1).mean())

    def merge_if_similar(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, int]:
        """:meth:`merge` when the pair passes the ``min_similarity`` gate, else both unchanged (full bytes)."""
        if self.similarity(x1, x2) >= self.min_similarity:
            return self.merge(x1, x2)
        return x1, x2, 2 * x1.numel() * x1.element_size()

    def merge(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, int]:
        """Merged ``x1, x2 [B, H, N, D]`` and the stored bytes of the pair (shared directions, both magnitudes,
        retained tokens of both layers and their indices)."""
        f1, f2 = x1.float(), x2.float()
        m1, m2 = f1.norm(dim=-1, keepdim=True), f2.norm(dim=-1, keepdim=True)
        e, omega = slerp(f1 / m1.clamp_min(EPS), f2 / m2.clamp_min(EPS), self.interpolation)
        y1, y2 = m1 * e, m2 * e
        b, h, n, d = x1.shape
        r = min(n, math.floor(self.retention_ratio * n + 0.5))
        if r:
            widest = torch.sort(omega.flip(-1), dim=-1, descending=True, stable=True).indices[..., :r]
            keep = torch.zeros_like(omega, dtype=torch.bool).scatter(-1, (n - 1) - widest, True).unsqueeze(-1)
            y1, y2 = torch.where(keep, f1, y1), torch.where(keep, f2, y2)
        elt = x1.element_size()
        merged = b * h * (n - r)
        retained = b * h * r
        nbytes = merged * (d + 2) * elt + retained * (2 * d * elt + INDEX_BYTES)
        return y1.to(x1.dtype), y2.to(x2.dtype), nbytes
