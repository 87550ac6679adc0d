"""Codec size ratio, reconstruction error and encode/decode throughput, on a KV tensor."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from kvplug.codec import CODEC_NAMES, get_codec


@dataclass
class CodecResult:
    codec: str
    ratio: float  # original bytes / framed bytes
    rel_l2: float  # ||x - x'|| / ||x||
    max_abs: float
    k_rel_l2: float
    v_rel_l2: float
    encode_gbps: float
    decode_gbps: float

    def row(self) -> dict[str, object]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def bench_codecs(
    kv: torch.Tensor,
    names: tuple[str, ...] = tuple(n for n in CODEC_NAMES if n != "kivi"),
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[CodecResult]:
    """Measure each codec on ``kv`` ``[layers, 2, tokens, heads, dim]`` (best of ``repeats`` timings)."""
    nbytes = kv.numel() * kv.element_size()
    x = kv.float()
    out: list[CodecResult] = []
    for name in names:
        codec = get_codec(name)
        enc = dec = float("inf")
        payload = b""
        y = kv
        for _ in range(repeats):
            t0 = time.perf_counter()
            payload = codec.encode(kv, key="0" * 64)
            t1 = time.perf_counter()
            y = codec.decode(payload, key="0" * 64)
            t2 = time.perf_counter()
            enc, dec = min(enc, t1 - t0), min(dec, t2 - t1)
        yf = y.float()
        out.append(
            CodecResult(
                codec=codec.spec,
                ratio=nbytes / len(payload),
                rel_l2=_rel(yf, x),
                max_abs=float((yf - x).abs().max()),
                k_rel_l2=_rel(yf[:, 0], x[:, 0]),
                v_rel_l2=_rel(yf[:, 1], x[:, 1]),
                encode_gbps=nbytes / enc / 1e9,
                decode_gbps=nbytes / dec / 1e9,
            )
        )
        if progress:
            progress(name)
    return out
