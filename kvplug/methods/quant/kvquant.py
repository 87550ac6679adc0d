"""KVQuant-lite: pre-RoPE per-channel keys, per-token values, dense-and-sparse outliers, first token(s) kept."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.base import INDEX_BYTES, CompressedLayer, LayerKV, Quantizer, slots, visible_lengths
from kvplug.methods.quant.common import asym_dequant, packed_bytes
from kvplug.methods.registry import register


def top_count(absx: Tensor, count: Tensor, dim: int) -> Tensor:
    """Bool mask of the ``count`` largest entries along ``dim`` (count broadcastable; ties: lower index first)."""
    order = torch.sort(absx, dim=dim, descending=True, stable=True).indices
    ranks = order.argsort(dim=dim)
    return ranks < count


def masked_asym(x: Tensor, dense: Tensor, dim: int, bits: int) -> tuple[Tensor, int]:
    """Quantize ``x`` along ``dim`` with the range of its ``dense`` entries only (others take a neutral value)."""
    big = torch.finfo(torch.float32).max
    lo = x.masked_fill(~dense, big).amin(dim=dim, keepdim=True)
    lo = torch.where(lo == big, torch.zeros_like(lo), lo)  # a slice with no dense entry
    return asym_dequant(torch.where(dense, x, lo.expand_as(x)), dim, bits)


@register("kvquant")
@dataclass
class KVQuant(Quantizer):
    """KVQuant-lite (Hooper et al., NeurIPS'24, arXiv 2401.18079): keys quantized per channel before RoPE, values
    per token, ``outlier_fraction`` of each vector kept exact (dense-and-sparse), the first ``first_few_fp16``
    tokens unquantized. Uniform (not NUQ) levels, outliers found online (not calibrated)."""

    bits: int = 4
    outlier_fraction: float = 0.01
    first_few_fp16: int = 1
    pre_rope: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"kvquant: bits must be 2, 3, 4 or 8, got {self.bits}")
        if not 0.0 <= self.outlier_fraction < 1.0:
            raise ConfigError(f"kvquant: outlier_fraction must be in [0, 1), got {self.outlier_fraction}")
        if self.first_few_fp16 < 0:
            raise ConfigError(f"kvquant: first_few_fp16 must be >= 0, got {self.first_few_fp16}")

    def apply(self, layer: LayerKV, keep: Tensor | None = None) -> CompressedLayer:
        layer.check()
        if self.pre_rope and layer.rope is None:
            raise ValueError("kvquant: pre_rope needs layer.rope (or set pre_rope=False)")
        b, h, n, d = layer.keys.shape
        lengths = visible_lengths(layer, keep)
        quant = (slots(layer) >= self.first_few_fp16) & (slots(layer) < lengths.unsqueeze(-1))  # [B, H, N]
        pos = layer.key_positions().clamp_min(0)
        k = layer.rope.invert(layer.keys, pos) if self.pre_rope and layer.rope else layer.keys.float()
        # keys: per channel over the head's quantized tokens; the largest |k| per channel stay exact
        nq = quant.sum(-1)  # [B, H]
        kcount = torch.floor(nq.float() * self.outlier_fraction + 0.5).long().view(b, h, 1, 1)
        kout = top_count(k.abs().masked_fill(~quant.unsqueeze(-1), -1.0), kcount, dim=2) & quant.unsqueeze(-1)
        kdense = quant.unsqueeze(-1) & ~kout
        kq, sbk = masked_asym(k, kdense, 2, self.bits)
        kpre = torch.where(kdense, kq, k)
        krot = layer.rope.apply(kpre, pos) if self.pre_rope and layer.rope else kpre
        keys = torch.where(quant.unsqueeze(-1), krot, layer.keys.float()).to(layer.keys.dtype)
        # values: per token; the largest |v| of each token stay exact
        v = layer.values.float()
        vcount = math.floor(d * self.outlier_fraction + 0.5)
        vout = top_count(v.abs(), torch.tensor(vcount, device=v.device), dim=3) & quant.unsqueeze(-1)
        vdense = quant.unsqueeze(-1) & ~vout
        vq, sbv = masked_asym(v, vdense, 3, self.bits)
        values = torch.where(vdense, vq, v).to(layer.values.dtype)
        ek, ev = layer.keys.element_size(), layer.values.element_size()
        dense_counts = kdense.sum(dim=(2, 3)) + vdense.sum(dim=(2, 3))
        nbytes = packed_bytes(dense_counts, self.bits)
        nbytes += int((nq > 0).sum()) * d * 2 * sbk + int(nq.sum()) * 2 * sbv  # key channel / value token scales
        nbytes += int(kout.sum()) * (ek + INDEX_BYTES) + int(vout.sum()) * (ev + INDEX_BYTES)
        nbytes += int((lengths - nq).sum()) * d * (ek + ev)  # first tokens in full precision
        return CompressedLayer(keys, values, keep, nbytes, None)
