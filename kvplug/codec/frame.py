"""Versioned, checksummed binary frame around an encoded tensor. Never pickle.

Layout (little-endian)::

    magic "KVPL" | version u8 | codec id u8 | dtype id u8 | ndim u8 | meta_len u32 | body_len u64 |
    key digest 32 bytes | shape ndim x u64 | meta (UTF-8 JSON) | body | xxh3_64 of all before (8 bytes)

Any mismatch (magic, version, lengths, checksum, codec, key, shape, dtype) raises :class:`PayloadError`,
which the cache layer turns into a counted miss.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from kvplug.errors import PayloadError

MAGIC = b"KVPL"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBBBIQ32s")
_TRAILER = 8
MAX_NDIM = 8
MAX_META = 1 << 16

DTYPE_IDS: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5,
    torch.int8: 6,
    torch.uint8: 7,
    torch.int16: 8,
    torch.int32: 9,
    torch.int64: 10,
    torch.float64: 11,
}
DTYPES_BY_ID = {v: k for k, v in DTYPE_IDS.items()}


@dataclass(frozen=True)
class Frame:
    """A parsed, checksum-verified frame. ``body`` is a view into the payload."""

    codec_id: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    key: bytes
    meta: dict[str, Any]
    body: memoryview


def key_digest(key: str | bytes | None) -> bytes:
    """32-byte form of a chunk key (hex string of 64 chars, raw 32 bytes, or None for no binding)."""
    if key is None:
        return bytes(32)
    if isinstance(key, bytes):
        if len(key) != 32:
            raise ValueError(f"binary key must be 32 bytes, got {len(key)}")
        return key
    if len(key) == 64:
        try:
            return bytes.fromhex(key)
        except ValueError:
            pass
    return hashlib.sha256(key.encode()).digest()


def pack(
    codec_id: int,
    dtype: torch.dtype,
    shape: Sequence[int],
    meta: dict[str, Any],
    body: Sequence[bytes | bytearray | memoryview],
    key: str | bytes | None = None,
) -> bytes:
    """Build a frame. ``body`` parts are concatenated without an intermediate copy."""
    if dtype not in DTYPE_IDS:
        raise ValueError(f"unsupported dtype {dtype}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"at most {MAX_NDIM} dimensions, got {len(shape)}")
    meta_b = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    if len(meta_b) > MAX_META:
        raise ValueError("codec metadata too large")
    body_len = sum(memoryview(p).nbytes for p in body)
    head = _HEADER.pack(
        MAGIC, FORMAT_VERSION, codec_id, DTYPE_IDS[dtype], len(shape), len(meta_b), body_len, key_digest(key)
    )
    shape_b = struct.pack(f"<{len(shape)}Q", *shape)
    h = xxhash.xxh3_64()
    parts: list[bytes | bytearray | memoryview] = [head, shape_b, meta_b, *body]
    for p in parts:
        h.update(p)
    parts.append(h.digest())
    return b"".join(parts)


def unpack(
    payload: bytes | bytearray | memoryview,
    *,
    codec_id: int | None = None,
    key: str | bytes | None = None,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> Frame:
    """Parse and verify a frame; raise :class:`PayloadError` on any doubt."""
    mv = memoryview(payload).cast("B")
    n = mv.nbytes
    if n < _HEADER.size + _TRAILER:
        raise PayloadError("truncated", f"{n} bytes is shorter than a frame header")
    magic, version, cid, did, ndim, meta_len, body_len, kd = _HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise PayloadError("foreign", "bad magic: not a kvplug payload")
    if version != FORMAT_VERSION:
        raise PayloadError("version", f"format version {version}, this kvplug reads {FORMAT_VERSION}")
    if ndim > MAX_NDIM or meta_len > MAX_META:
        raise PayloadError("corrupt", "header fields out of range")
    expected = _HEADER.size + 8 * ndim + meta_len + body_len + _TRAILER
    if n != expected:
        kind = "truncated" if n < expected else "corrupt"
        raise PayloadError(kind, f"frame is {n} bytes, header says {expected}")
    if xxhash.xxh3_64_digest(mv[: n - _TRAILER]) != bytes(mv[n - _TRAILER :]):
        raise PayloadError("checksum", "body checksum mismatch")
    if did not in DTYPES_BY_ID:
        raise PayloadError("corrupt", f"unknown dtype id {did}")
    if codec_id is not None and cid != codec_id:
        raise PayloadError("codec", f"payload codec id {cid}, expected {codec_id}")
    if key is not None and kd != key_digest(key):
        raise PayloadError("key", "payload belongs to another key")
    off = _HEADER.size
    fshape = struct.unpack_from(f"<{ndim}Q", mv, off)
    off += 8 * ndim
    if shape is not None and tuple(shape) != fshape:
        raise PayloadError("shape", f"payload shape {fshape}, expected {tuple(shape)}")
    fdtype = DTYPES_BY_ID[did]
    if dtype is not None and dtype != fdtype:
        raise PayloadError("dtype", f"payload dtype {fdtype}, expected {dtype}")
    try:
        meta = json.loads(bytes(mv[off : off + meta_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PayloadError("corrupt", f"metadata is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise PayloadError("corrupt", "metadata is not an object")
    off += meta_len
    return Frame(cid, fdtype, fshape, kd, meta, mv[off : off + body_len])
