"""Shared pieces of the quantizers: fake quantization with the codec's asymmetric quantizer, edge filling."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvplug.codec.quant import _asym  # the stored-payload codec's quantizer: same rounding, same scales
from kvplug.methods.base import LayerKV, gather_tokens, slots


def asym_dequant(x: Tensor, dim: int, bits: int) -> tuple[Tensor, int]:
    """Asymmetric ``bits``-bit min/scale quantization of ``x`` along ``dim`` (float32 out), and the bytes of one
    stored scale or zero point (2 when fp16 holds them to 1e-3, else 4)."""
    tag, q, scale, mn = _asym(x.float(), dim, bits)
    return q.float() * scale + mn, 2 if tag == "f16" else 4


def edge_filled(layer: LayerKV, x: Tensor, lengths: Tensor) -> Tensor:
    """``x [B, H, N, D]`` with each head's padding slots (>= its length) replaced by its last visible token, so
    padding never widens a quantization range."""
    src = torch.minimum(slots(layer).expand(layer.batch, layer.heads, -1), (lengths - 1).clamp_min(0).unsqueeze(-1))
    return gather_tokens(x, src)


def packed_bytes(counts: Tensor, bits: int) -> int:
    """Bytes of ``bits``-bit codes, packed per (batch, head): ``sum(ceil(count * bits / 8))``."""
    return int(sum(math.ceil(c * bits / 8) for c in counts.reshape(-1).tolist()))
