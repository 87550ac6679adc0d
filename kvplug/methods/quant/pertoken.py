"""Per-token quantizers: symmetric int8 and fp8 e4m3, one scale per (token, head) vector."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.codec.quant import FP8_MAX, round_scales
from kvplug.methods.base import CompressedLayer, LayerKV, Quantizer, visible_lengths
from kvplug.methods.registry import register

INT8_MAX = 127.0


def int8_dequant(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Symmetric per-vector int8 of ``x [..., D]``: (dequantized float32, the scales ``[..., 1]``, scale bytes).
    The range is widened by 2**-9 so the fp16-rounded scale never clips: error <= scale / 2."""
    f = x.float()
    amax = f.abs().amax(dim=-1, keepdim=True)
    tag, s = round_scales(torch.where(amax > 0, amax * (1 + 2**-9) / INT8_MAX, torch.ones_like(amax)))
    q = (f / s).round().clamp(-INT8_MAX, INT8_MAX)
    return q * s, s, 2 if tag == "f16" else 4


def fp8_dequant(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-vector scaled float8 e4m3 (scale = amax / 448, as the fp8 codec): (dequantized, scales, scale bytes)."""
    f = x.float()
    amax = f.abs().amax(dim=-1, keepdim=True)
    tag, s = round_scales(torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)))
    q = (f / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return q * s, s, 2 if tag == "f16" else 4


class _PerToken(Quantizer):
    def _dequant(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        raise NotImplementedError

    def apply(self, layer: LayerKV, keep: Tensor | None = None) -> CompressedLayer:
        layer.check()
        kq, _, sbk = self._dequant(layer.keys)
        vq, _, sbv = self._dequant(layer.values)
        entries = int(visible_lengths(layer, keep).sum())
        nbytes = entries * (2 * layer.head_dim + sbk + sbv)
        return CompressedLayer(kq.to(layer.keys.dtype), vq.to(layer.values.dtype), keep, nbytes, None)


@register("int8")
@dataclass
class Int8(_PerToken):
    """Per-token int8: symmetric, one fp16 scale per (token, head) vector of K and of V (as in vLLM/TensorRT-LLM
    int8 KV caches)."""

    def _dequant(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        return int8_dequant(x)


@register("fp8")
@dataclass
class Fp8(_PerToken):
    """Per-token fp8: float8 e4m3 with one fp16 scale (amax / 448) per (token, head) vector of K and of V."""

    def _dequant(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        return fp8_dequant(x)
