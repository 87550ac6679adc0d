"""Codec size ratio, reconstruction error and encode/decode throughput, on a KV tensor."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from kvplug.codec import CODEC_NAMES, get_codec
from kvplug.codec.frame import MacKey


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
    mac_names: tuple[str, ...] = (),
) -> list[CodecResult]:
    """Measure each codec on ``kv`` ``[layers, 2, tokens, heads, dim]`` (best of ``repeats`` timings); the codecs
    in ``mac_names`` are measured a second time with an authenticated frame (keyed BLAKE3 MAC)."""
    nbytes = kv.numel() * kv.element_size()
    x = kv.float()
    out: list[CodecResult] = []
    mac = MacKey.from_secret("benchmark secret, not a real one")
    for name, mac_key in [(n, None) for n in names] + [(n, mac) for n in mac_names]:
        codec = get_codec(name)
        enc = dec = float("inf")
        payload = b""
        y = kv
        for _ in range(repeats):
            t0 = time.perf_counter()
            payload = codec.encode(kv, key="0" * 64, mac_key=mac_key)
            t1 = time.perf_counter()
            y = codec.decode(payload, key="0" * 64, mac_key=mac_key)
            t2 = time.perf_counter()
            enc, dec = min(enc, t1 - t0), min(dec, t2 - t1)
        yf = y.float()
        out.append(
            CodecResult(
                codec=codec.spec + (" + MAC" if mac_key else ""),
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


def integrity_gbps(nbytes: int = 64 << 20, repeats: int = 5) -> dict[str, float]:
    """GB/s of the integrity functions over one buffer: the unkeyed checksum and the keyed alternatives."""
    import hashlib
    import hmac
    import os

    import blake3
    import xxhash

    data = os.urandom(nbytes)
    key = b"k" * 32
    fns: dict[str, Callable[[], object]] = {
        "xxh3-64 (checksum, default)": lambda: xxhash.xxh3_64_digest(data),
        "BLAKE3 keyed (MAC, with a secret)": lambda: blake3.blake3(data, key=key).digest(),
        "HMAC-SHA256 (for comparison)": lambda: hmac.new(key, data, "sha256").digest(),
        "BLAKE2b keyed (for comparison)": lambda: hashlib.blake2b(data, key=key, digest_size=32).digest(),
    }
    out = {}
    for name, fn in fns.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = nbytes / best / 1e9
    return out
