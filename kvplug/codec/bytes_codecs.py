"""Lossless codecs: raw bytes, zstd and lz4 (with byte shuffling, which helps on float data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lz4.frame
import torch
import zstandard

from kvplug.codec.base import Body, Codec, tensor_bytes, tensor_from
from kvplug.codec.frame import tensor_nbytes

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32}


def shuffle(t: torch.Tensor) -> memoryview:
    """Group the i-th byte of every element together (exponent bytes compress well).

    2- and 4-byte types use shifts and masks (several times faster than a uint8 transpose here).
    """
    t = t.detach().contiguous().cpu()
    size = t.element_size()
    if size in _INT_OF_SIZE:
        v = t.reshape(-1).view(_INT_OF_SIZE[size])
        planes = [((v >> (8 * i)) & 0xFF).to(torch.uint8) for i in range(size)]
        return memoryview(torch.cat(planes).numpy())
    b = t.view(torch.uint8).reshape(-1, size)
    return memoryview(b.t().contiguous().reshape(-1).numpy())


def unshuffle(buf: bytes | bytearray | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    b = torch.frombuffer(bytearray(buf), dtype=torch.uint8).reshape(size, -1)
    if size in _INT_OF_SIZE:
        it = _INT_OF_SIZE[size]
        v = b[0].to(it)
        for i in range(1, size):
            v |= b[i].to(it) << (8 * i)
        return v.view(dtype).reshape(shape)
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

    def decode_view(
        self, meta: dict[str, Any], body: memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        if body.nbytes != tensor_nbytes(shape, dtype):
            raise ValueError(f"raw body is {body.nbytes} bytes, the tensor {tensor_nbytes(shape, dtype)}")
        return tensor_from(body, dtype, shape, owned=False)


@dataclass
class ZstdCodec(Codec):
    """Zstandard over (optionally byte-shuffled) tensor bytes."""

    name = "zstd"
    codec_id = 2
    level: int = 1  # on bf16 KV, level 1 is ~3x faster than 3 and compresses as well (bench/codecs.py)
    shuffle: bool = True

    def params(self) -> dict[str, Any]:
        return {"level": self.level, "shuffle": self.shuffle}

    def encode_body(self, t: torch.Tensor) -> tuple[dict[str, Any], Body]:
        data = shuffle(t) if self.shuffle else tensor_bytes(t)
        return {}, [zstandard.ZstdCompressor(level=self.level).compress(data)]

    def decode_body(
        self, meta: dict[str, Any], body: memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        n = tensor_nbytes(shape, dtype)
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
        n = tensor_nbytes(shape, dtype)
        # Bounded by the frame's (already verified) shape: a body claiming more is refused before allocating.
        info = lz4.frame.get_frame_info(body)
        if info.get("content_size") not in (0, None, n):
            raise ValueError(f"lz4 frame declares {info['content_size']} bytes, the tensor has {n}")
        d = lz4.frame.LZ4FrameDecompressor()
        raw = d.decompress(body, max_length=n)
        if not d.eof or d.unused_data:
            raise ValueError("lz4 body is longer than its tensor or has trailing data")
        if len(raw) != n:
            raise ValueError(f"decompressed {len(raw)} bytes, expected {n}")
        return unshuffle(raw, dtype, shape) if self.shuffle else tensor_from(raw, dtype, shape)
