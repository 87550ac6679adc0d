"""Versioned, checksummed (or authenticated) binary frame around an encoded tensor. Never pickle.

Layout (little-endian)::

    magic "KVPL" | version u8 | codec id u8 | dtype id u8 | ndim u8 | flags u8 | 3 zero bytes | meta_len u32 |
    body_len u64 | key digest 32 bytes | shape ndim x u64 | meta (UTF-8 JSON) | body | trailer

The trailer covers everything before it: an xxh3-64 checksum (8 bytes) by default, or, with flag ``AUTH``, a
keyed BLAKE3 MAC (32 bytes) under a key derived from the operator's secret. A reader with a secret accepts only
frames that carry a valid MAC under that secret; a reader without one refuses authenticated frames (it cannot
check them). Any mismatch (magic, version, lengths, checksum/MAC, codec, key, shape, dtype) raises
:class:`PayloadError`, which the payload layer turns into a counted miss.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import blake3
import torch
import xxhash

from kvplug.errors import PayloadError

MAGIC = b"KVPL"
FORMAT_VERSION = 2
_HEADER = struct.Struct("<4sBBBBB3xIQ32s")
CHECKSUM_LEN = 8
MAC_LEN = 32
FLAG_AUTH = 0x01
MAX_NDIM = 8
MAX_META = 1 << 16
#: Largest tensor a frame may declare (decoders allocate at most this much, whatever the frame claims).
MAX_TENSOR_BYTES = 1 << 32
_MAC_CONTEXT = "kvplug 2026 payload MAC v2"
_KEY_ID_CONTEXT = "kvplug 2026 payload key id v2"

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
class MacKey:
    """A payload-authentication key derived from an operator secret. Its repr never shows the key."""

    key: bytes

    @classmethod
    def from_secret(cls, secret: str | bytes) -> MacKey:
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(raw) < 16:
            raise ValueError("the payload secret must be at least 16 bytes long")
        return cls(blake3.blake3(raw, derive_key_context=_MAC_CONTEXT).digest())

    @property
    def key_id(self) -> str:
        """A public identifier of the key (part of the namespace: two secrets never share store keys)."""
        return blake3.blake3(self.key, derive_key_context=_KEY_ID_CONTEXT).hexdigest()[:16]

    def mac(self, parts: Sequence[bytes | bytearray | memoryview]) -> bytes:
        h = blake3.blake3(key=self.key)
        for p in parts:
            h.update(p)
        return h.digest()

    def __repr__(self) -> str:
        return f"MacKey(id={self.key_id})"


@dataclass(frozen=True)
class Frame:
    """A parsed, verified frame. ``body`` is a view into the payload."""

    codec_id: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    key: bytes
    meta: dict[str, Any]
    body: memoryview
    authenticated: bool = False


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


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor (exact Python integers: no overflow on hostile shapes)."""
    return math.prod(int(s) for s in shape) * torch.empty((), dtype=dtype).element_size()


def pack(
    codec_id: int,
    dtype: torch.dtype,
    shape: Sequence[int],
    meta: dict[str, Any],
    body: Sequence[bytes | bytearray | memoryview],
    key: str | bytes | None = None,
    mac_key: MacKey | None = None,
) -> bytes:
    """Build a frame. ``body`` parts are hashed in place and joined once."""
    if dtype not in DTYPE_IDS:
        raise ValueError(f"unsupported dtype {dtype}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"at most {MAX_NDIM} dimensions, got {len(shape)}")
    if tensor_nbytes(shape, dtype) > MAX_TENSOR_BYTES:
        raise ValueError(f"tensor of {tensor_nbytes(shape, dtype)} bytes exceeds the frame limit {MAX_TENSOR_BYTES}")
    meta_b = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    if len(meta_b) > MAX_META:
        raise ValueError("codec metadata too large")
    body_len = sum(memoryview(p).nbytes for p in body)
    flags = FLAG_AUTH if mac_key is not None else 0
    head = _HEADER.pack(
        MAGIC, FORMAT_VERSION, codec_id, DTYPE_IDS[dtype], len(shape), flags, len(meta_b), body_len, key_digest(key)
    )
    shape_b = struct.pack(f"<{len(shape)}Q", *shape)
    parts: list[bytes | bytearray | memoryview] = [head, shape_b, meta_b, *body]
    if mac_key is not None:
        parts.append(mac_key.mac(parts))
    else:
        h = xxhash.xxh3_64()
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
    mac_key: MacKey | None = None,
) -> Frame:
    """Parse and verify a frame; raise :class:`PayloadError` on any doubt.

    With ``mac_key``, only frames authenticated under that key are accepted; without it, authenticated frames
    are refused (kind ``auth``) because nothing here can check them.
    """
    mv = memoryview(payload).cast("B")
    n = mv.nbytes
    if n < _HEADER.size + CHECKSUM_LEN:
        raise PayloadError("truncated", f"{n} bytes is shorter than a frame header")
    magic, version, cid, did, ndim, flags, meta_len, body_len, kd = _HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise PayloadError("foreign", "bad magic: not a kvplug payload")
    if version != FORMAT_VERSION:
        raise PayloadError("version", f"format version {version}, this kvplug reads {FORMAT_VERSION}")
    if ndim > MAX_NDIM or meta_len > MAX_META or flags & ~FLAG_AUTH:
        raise PayloadError("corrupt", "header fields out of range")
    auth = bool(flags & FLAG_AUTH)
    trailer = MAC_LEN if auth else CHECKSUM_LEN
    expected = _HEADER.size + 8 * ndim + meta_len + body_len + trailer
    if n != expected:
        kind = "truncated" if n < expected else "corrupt"
        raise PayloadError(kind, f"frame is {n} bytes, header says {expected}")
    if auth != (mac_key is not None):
        raise PayloadError(
            "auth",
            "authenticated payload, but no secret is configured here"
            if auth
            else "unauthenticated payload, but a secret is configured: only authenticated payloads are accepted",
        )
    if mac_key is not None:
        if not hmac.compare_digest(mac_key.mac([mv[: n - MAC_LEN]]), bytes(mv[n - MAC_LEN :])):
            raise PayloadError("auth", "payload MAC does not verify under the configured secret")
    elif xxhash.xxh3_64_digest(mv[: n - CHECKSUM_LEN]) != bytes(mv[n - CHECKSUM_LEN :]):
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
    if tensor_nbytes(fshape, fdtype) > MAX_TENSOR_BYTES:
        raise PayloadError("corrupt", f"declared tensor {fshape} exceeds {MAX_TENSOR_BYTES} bytes")
    try:
        meta = json.loads(bytes(mv[off : off + meta_len]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PayloadError("corrupt", f"metadata is not JSON: {type(e).__name__}") from None
    if not isinstance(meta, dict):
        raise PayloadError("corrupt", "metadata is not an object")
    off += meta_len
    return Frame(cid, fdtype, fshape, kd, meta, mv[off : off + body_len], auth)
