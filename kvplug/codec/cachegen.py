"""CacheGen-style codec (Liu et al., SIGCOMM'24, arXiv 2310.07240).

Layer-wise quantization (shallow layers get more bins), anchor tokens every ``anchor_interval`` tokens kept at
8 bits, the other tokens coded as the delta to their group's reconstructed anchor, per-token symmetric scale.
The symbols are laid out channel-major (each channel's token sequence contiguous) and entropy-coded with
zstd (FSE/Huffman). The paper's arithmetic coder with per-channel CDFs (torchac) is not used: zstd is the
well-kept library here, and the size gap is measured in ``bench/codecs.py``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import torch
import zstandard

from kvplug.codec.base import Body, Codec, check_kv_shape, tensor_bytes
from kvplug.codec.quant import Reader, round_scales, scale_bytes

ANCHOR_MAX = 127


def layer_bins(num_layers: int, quant_level: int) -> torch.Tensor:
    """Bins per (layer, k/v) from CacheGen's default table (Mistral-7B, 32 layers), scaled to depth.

    Keys: first 10/32 of the layers 32 bins, the rest 16. Values: first 2/32 of the layers 32, the rest 16.
    Level 1 halves the bins, level 3 doubles them.
    """
    depth = torch.arange(num_layers, dtype=torch.float32) / num_layers
    kb = torch.where(depth < 10 / 32, 32, 16)
    vb = torch.where(depth < 2 / 32, 32, 16)
    bins = torch.stack([kb, vb], 1)
    factor = {1: 0.5, 2: 1.0, 3: 2.0}[quant_level]
    return (bins * factor).to(torch.int64)


@dataclass
class CacheGenCodec(Codec):
    """CacheGen-style KV codec: layer-wise bins, anchor deltas, entropy coding (see module docstring)."""

    name = "cachegen"
    codec_id = 6
    quant_level: int = 2
    anchor_interval: int = 10
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if self.quant_level not in (1, 2, 3):
            raise ValueError(f"cachegen: quant_level must be 1, 2 or 3, got {self.quant_level}")
        if self.anchor_interval < 1:
            raise ValueError("cachegen: anchor_interval must be >= 1")

    def params(self) -> dict[str, Any]:
        return {"quant_level": self.quant_level, "anchor_interval": self.anchor_interval, "zstd_level": self.zstd_level}

    def _max_level(self, num_layers: int) -> torch.Tensor:
        return (layer_bins(num_layers, self.quant_level) // 2 - 1).float().reshape(num_layers, 2, 1, 1)

    def _anchor_index(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(T)
        return pos % self.anchor_interval == 0, pos // self.anchor_interval

    def encode_body(self, t: torch.Tensor) -> tuple[dict[str, Any], Body]:
        check_kv_shape(self.name, t)
        L, _, T, H, D = t.shape
        x = t.detach().cpu().float().reshape(L, 2, T, H * D)
        is_anchor, group = self._anchor_index(T)
        a = x[:, :, is_anchor]
        tag_a, sa = round_scales(_sym_scale(a, ANCHOR_MAX))
        qa = (a / sa).round().clamp(-ANCHOR_MAX, ANCHOR_MAX)
        ref = (qa * sa)[:, :, group]  # each token's reconstructed anchor
        delta = x - ref
        ml = self._max_level(L)
        tag_d, sd = round_scales(_sym_scale(delta, 1.0) / ml)
        q = (delta / sd).round().clamp(-ml, ml)
        q[:, :, is_anchor] = qa
        scales = sd.clone()
        scales[:, :, is_anchor] = sa
        tag = "f32" if "f32" in (tag_a, tag_d) else "f16"
        sym = q.to(torch.int8).permute(0, 1, 3, 2).contiguous()  # channel-major
        packed = zstandard.ZstdCompressor(level=self.zstd_level).compress(tensor_bytes(sym))
        return {"scale": tag}, [struct.pack("<Q", len(packed)), packed, scale_bytes(tag, scales)]

    def decode_body(
        self, meta: dict[str, Any], body: memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        if len(shape) != 5 or shape[1] != 2:
            raise ValueError(f"cachegen: bad shape {shape}")
        L, _, T, H, D = shape
        C = H * D
        if body.nbytes < 8:
            raise ValueError("body too short")
        (n,) = struct.unpack_from("<Q", body, 0)
        raw = zstandard.ZstdDecompressor().decompress(body[8 : 8 + n], max_output_size=L * 2 * T * C)
        if len(raw) != L * 2 * T * C:
            raise ValueError("symbol stream has the wrong length")
        q = torch.frombuffer(bytearray(raw), dtype=torch.int8).reshape(L, 2, C, T).permute(0, 1, 3, 2).float()
        r = Reader(body[8 + n :])
        s = r.scales(meta["scale"], L * 2 * T).reshape(L, 2, T, 1)
        r.done()
        is_anchor, group = self._anchor_index(T)
        x = q * s
        ref = x[:, :, is_anchor][:, :, group]
        x = torch.where(is_anchor.reshape(1, 1, T, 1), x, x + ref)
        return x.reshape(shape).to(dtype)


def _sym_scale(x: torch.Tensor, levels: float | torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(dim=-1, keepdim=True)
    return torch.where(amax > 0, amax / levels, torch.ones_like(amax))
