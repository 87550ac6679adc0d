"""Lossy codecs for stored KV: fp8 (e4m3) and KIVI-grouped int8/int4/int2.

All work on the KV layout ``[layers, 2, tokens, kv_heads, head_dim]`` (fp8 works on any shape). Scales and
zero points are stored in fp16 when that is exact enough, else fp32; quantization uses the stored (rounded)
values so decode reproduces exactly what encode assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvplug.codec.base import Body, Codec, check_kv_shape, tensor_bytes

FP8_MAX = 448.0


def round_scales(s: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Round float32 scales to fp16 where that keeps 1e-3 relative accuracy, else keep fp32."""
    h = s.to(torch.float16)
    hf = h.float()
    if torch.isfinite(hf).all() and ((hf - s).abs() <= 1e-3 * s.abs()).all():
        return "f16", hf
    return "f32", s


def scale_bytes(tag: str, s: torch.Tensor) -> memoryview:
    return tensor_bytes(s.to(torch.float16 if tag == "f16" else torch.float32))


class Reader:
    """Sequential reader of fixed-size sections of a body."""

    def __init__(self, body: memoryview) -> None:
        self.body = body
        self.off = 0

    def take(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        size = n * torch.empty((), dtype=dtype).element_size()
        if self.off + size > self.body.nbytes:
            raise ValueError("body shorter than its sections")
        chunk = bytearray(self.body[self.off : self.off + size])
        self.off += size
        return torch.frombuffer(chunk, dtype=torch.uint8).view(dtype) if size else torch.empty(0, dtype=dtype)

    def scales(self, tag: str, n: int) -> torch.Tensor:
        if tag not in ("f16", "f32"):
            raise ValueError(f"unknown scale dtype {tag!r}")
        return self.take(torch.float16 if tag == "f16" else torch.float32, n).float()

    def done(self) -> None:
        if self.off != self.body.nbytes:
            raise ValueError(f"{self.body.nbytes - self.off} trailing bytes in body")


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 values < 2**bits, 8//bits per byte (little end first)."""
    q = q.reshape(-1).to(torch.uint8)
    per = 8 // bits
    if per == 1:
        return q
    pad = (-q.numel()) % per
    if pad:
        q = torch.cat([q, q.new_zeros(pad)])
    q = q.view(-1, per)
    out = torch.zeros(q.shape[0], dtype=torch.uint8)
    for i in range(per):
        out |= q[:, i] << (bits * i)
    return out


def unpack_bits(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 8 // bits
    if per == 1:
        return p[:n]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return ((p.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]


@dataclass
class Fp8Codec(Codec):
    """FP8 e4m3 with one scale per last-dim vector (per token and head for KV)."""

    name = "fp8"
    codec_id = 4

    def encode_body(self, t: torch.Tensor) -> tuple[dict[str, Any], Body]:
        if not t.is_floating_point() or t.ndim == 0:
            raise ValueError(f"fp8: expects a floating-point tensor with >= 1 dim, got {t.dtype} {tuple(t.shape)}")
        x = t.detach().cpu().float()
        amax = x.abs().amax(dim=-1, keepdim=True)
        tag, scale = round_scales(torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)))
        q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"scale": tag}, [tensor_bytes(q), scale_bytes(tag, scale)]

    def decode_body(
        self, meta: dict[str, Any], body: memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        n = torch.Size(shape).numel()
        rows = n // shape[-1] if shape[-1] else 0
        r = Reader(body)
        q = r.take(torch.float8_e4m3fn, n).float().reshape(shape)
        s = r.scales(meta["scale"], rows).reshape(*shape[:-1], 1)
        r.done()
        return (q * s).to(dtype)


def _asym(x: torch.Tensor, dim: int, bits: int) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/scale quantization of ``x`` with groups along ``dim``."""
    levels = (1 << bits) - 1
    mn = x.amin(dim=dim, keepdim=True)
    mx = x.amax(dim=dim, keepdim=True)
    tag_m, mn = round_scales(mn)
    rng = (mx - mn).clamp_min(0) * (1 + 2**-9)
    tag_s, scale = round_scales(torch.where(rng > 0, rng / levels, torch.ones_like(rng)))
    tag = "f32" if "f32" in (tag_m, tag_s) else "f16"
    if tag == "f32":
        mn, scale = mn.float(), scale.float()
    q = ((x - mn) / scale).round().clamp(0, levels).to(torch.uint8)
    return tag, q, scale, mn


@dataclass
class KiviCodec(Codec):
    """KIVI grouping (Liu et al., ICML'24, arXiv 2402.02750): keys per channel over token groups,
    values per token over channel groups, asymmetric ``bits``-bit, group size 32."""

    name = "kivi"
    codec_id = 5
    bits: int = 4
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"kivi: bits must be 2, 4 or 8, got {self.bits}")
        if self.group_size <= 0:
            raise ValueError(f"kivi: group_size must be > 0, got {self.group_size}")

    def params(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size}

    def _groups(self, shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        L, _, T, H, D = shape
        g = self.group_size
        return L, T, H * D, -(-T // g), -(-(H * D) // g)

    def encode_body(self, t: torch.Tensor) -> tuple[dict[str, Any], Body]:
        check_kv_shape(self.name, t)
        x = t.detach().cpu().float()
        L, T, C, tg, cg = self._groups(tuple(t.shape))
        g = self.group_size
        k = x[:, 0].reshape(L, T, C)
        v = x[:, 1].reshape(L, T, C)
        # Pad by repeating the edge so padding never widens a group's range.
        kp = torch.cat([k, k[:, -1:].expand(L, tg * g - T, C)], 1) if tg * g > T else k
        vp = torch.cat([v, v[..., -1:].expand(L, T, cg * g - C)], 2) if cg * g > C else v
        tag_k, qk, sk, mk = _asym(kp.reshape(L, tg, g, C), 2, self.bits)
        tag_v, qv, sv, mv = _asym(vp.reshape(L, T, cg, g), 3, self.bits)
        body: Body = [tensor_bytes(pack_bits(qk, self.bits)), scale_bytes(tag_k, sk), scale_bytes(tag_k, mk)]
        body += [tensor_bytes(pack_bits(qv, self.bits)), scale_bytes(tag_v, sv), scale_bytes(tag_v, mv)]
        return {"k": tag_k, "v": tag_v}, body

    def decode_body(
        self, meta: dict[str, Any], body: memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        if len(shape) != 5 or shape[1] != 2:
            raise ValueError(f"kivi: bad shape {shape}")
        L, T, C, tg, cg = self._groups(shape)
        g, b = self.group_size, self.bits
        r = Reader(body)
        nk, nv = L * tg * g * C, L * T * cg * g
        qk = unpack_bits(r.take(torch.uint8, -(-nk * b // 8)), b, nk).reshape(L, tg, g, C).float()
        sk = r.scales(meta["k"], L * tg * C).reshape(L, tg, 1, C)
        mk = r.scales(meta["k"], L * tg * C).reshape(L, tg, 1, C)
        qv = unpack_bits(r.take(torch.uint8, -(-nv * b // 8)), b, nv).reshape(L, T, cg, g).float()
        sv = r.scales(meta["v"], L * T * cg).reshape(L, T, cg, 1)
        mv = r.scales(meta["v"], L * T * cg).reshape(L, T, cg, 1)
        r.done()
        k = (qk * sk + mk).reshape(L, tg * g, C)[:, :T]
        v = (qv * sv + mv).reshape(L, T, cg * g)[..., :C]
        return torch.stack([k, v], 1).reshape(shape).to(dtype)
