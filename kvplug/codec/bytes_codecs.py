"""Lossless codecs: raw bytes, zstd and lz4 (with byte shuffling, which helps on float data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lz4.frame
import torch
import zstandard

from kvplug.codec.base import Body, Codec, tensor_bytes, tensor_from


def shuffle(t: torch.Tensor) -> memoryview:
    """Group the i-th byte of every element together (exponent bytes compress well)."""
    t = t.detach().contiguous().cpu()
    b = t.view(torch.uint8).reshape(-1, t.element_size())
    return memoryview(b.t().contiguous().reshape(-1).numpy())


def unshuffle(buf: bytes | bytearray | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    b = torch.frombuffer(bytearray(buf), dtype=torch.uint8).reshape(size, -1)
    return b.t().contiguous().view(dtype).reshape(shape)


@dataclass
class RawCodec(Codec):
    """The tensor's bytes as they are."""

    name = "raw"
    codec_id = 1

    def encode_body(self, t: torch.Tensor) -> tuple[dict[str, Any], Body]:
        return {}, [tensor_bytes(t)]

    def decode_body(
        self, meta: dict[str, Any], body: memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        return tensor_from(body, dtype, shape)


@dataclass
class ZstdCodec(Codec):
    """Zstandard over (optionally byte-shuffled) tensor bytes."""

    name = "zstd"
    codec_id = 2
    level: int = 3
    shuffle: bool = True

    def params(self) -> dict[str, Any]:
        return {"level": self.level, "shuffle": self.shuffle}

    def encode_body(self, t: torch.Tensor) -> tuple[dict[str, Any], Body]:
        data = shuffle(t) if self.shuffle else tensor_bytes(t)
        return {}, [zstandard.ZstdCompressor(level=self.level).compress(data)]

    def decode_body(
        self, meta: dict[str, Any], body: memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=n)
        if len(raw) != n:
            raise ValueError(f"decompressed {len(raw)} bytes, expected {n}")
        return unshuffle(raw, dtype, shape) if self.shuffle else tensor_from(raw, dtype, shape)


@dataclass
class Lz4Codec(Codec):
    """LZ4 frame over (optionally byte-shuffled) tensor bytes: faster, weaker than zstd."""

    name = "lz4"
    codec_id = 3
    shuffle: bool = True

    def params(self) -> dict[str, Any]:
        return {"shuffle": self.shuffle}

    def encode_body(self, t: torch.Tensor) -> tuple[dict[str, Any], Body]:
        data = shuffle(t) if self.shuffle else tensor_bytes(t)
        return {}, [lz4.frame.compress(data, store_size=True)]

    def decode_body(
        self, meta: dict[str, Any], body: memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        raw = lz4.frame.decompress(body)
        if len(raw) != n:
            raise ValueError(f"decompressed {len(raw)} bytes, expected {n}")
        return unshuffle(raw, dtype, shape) if self.shuffle else tensor_from(raw, dtype, shape)
