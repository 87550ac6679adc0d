"""KIVI: keys per channel over token groups, values per token over channel groups, a full-precision residual."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.base import CompressedLayer, LayerKV, Quantizer, slots, visible_lengths
from kvplug.methods.quant.common import asym_dequant, edge_filled, packed_bytes
from kvplug.methods.registry import register


@register("kivi")
@dataclass
class KIVI(Quantizer):
    """KIVI (Liu et al., ICML'24, arXiv 2402.02750): asymmetric ``bits``-bit, keys per channel over groups of
    ``group_size`` tokens, values per token over groups of channels; as at prefill in the paper, keys keep the
    last ``N mod residual_length`` tokens and values the last ``residual_length`` tokens in full precision."""

    bits: int = 2
    group_size: int = 32
    residual_length: int = 128

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ConfigError(f"kivi: bits must be 2, 4 or 8, got {self.bits}")
        if self.group_size < 1:
            raise ConfigError(f"kivi: group_size must be >= 1, got {self.group_size}")
        if self.residual_length < 0 or self.residual_length % self.group_size:
            raise ConfigError(
                f"kivi: residual_length must be a multiple of group_size ({self.group_size}), "
                f"got {self.residual_length}"
            )

    def quantized_counts(self, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens quantized per head: keys ``L - L mod R`` (all when R = 0), values ``max(L - R, 0)``."""
        r = self.residual_length
        nk = lengths - lengths % r if r else lengths
        nv = (lengths - r).clamp_min(0)
        return nk, nv

    def apply(self, layer: LayerKV, keep: Tensor | None = None) -> CompressedLayer:
        layer.check()
        b, h, n, d = layer.keys.shape
        g, bits = self.group_size, self.bits
        lengths = visible_lengths(layer, keep)
        nk, nv = self.quantized_counts(lengths)
        # keys: per channel over groups of g tokens (pad tokens by repeating each head's last visible one)
        k = edge_filled(layer, layer.keys.float(), lengths)
        tpad = -n % g
        if tpad:
            k = torch.cat([k, k[:, :, -1:].expand(b, h, tpad, d)], dim=2)
        kq, sbk = asym_dequant(k.reshape(b, h, -1, g, d), 3, bits)
        kq = kq.reshape(b, h, -1, d)[:, :, :n]
        kmask = (slots(layer) < nk.unsqueeze(-1)).unsqueeze(-1)
        keys = torch.where(kmask, kq, layer.keys.float()).to(layer.keys.dtype)
        # values: per token over groups of g channels (pad channels by repeating the last one)
        v = layer.values.float()
        cpad = -d % g
        vp = torch.cat([v, v[..., -1:].expand(b, h, n, cpad)], dim=3) if cpad else v
        vq, sbv = asym_dequant(vp.reshape(b, h, n, -1, g), 4, bits)
        vq = vq.reshape(b, h, n, -1)[..., :d]
        vmask = (slots(layer) < nv.unsqueeze(-1)).unsqueeze(-1)
        values = torch.where(vmask, vq, v).to(layer.values.dtype)
        ek, ev = layer.keys.element_size(), layer.values.element_size()
        key_groups = int(sum(math.ceil(c / g) for c in nk.reshape(-1).tolist()))
        nbytes = packed_bytes(nk * d, bits) + key_groups * d * 2 * sbk + int((lengths - nk).sum()) * d * ek
        nbytes += packed_bytes(nv * d, bits) + int(nv.sum()) * math.ceil(d / g) * 2 * sbv
        nbytes += int((lengths - nv).sum()) * d * ev
        return CompressedLayer(keys, values, keep, nbytes, None)
