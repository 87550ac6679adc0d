"""The cache document as stored in Redis: one hash per entry, JSON metadata plus a raw embedding, no pickle.

Key ``<prefix>doc:<category>:<id as 16 hex digits>``. Fields:

- ``meta``: UTF-8 JSON: prompt, category, scope, model, endpoint, created, ttl, max_ttl, embedder, response.
- ``emb``: the embedding: format version byte (1), dimension (uint16 LE), float32 LE values, xxh3_64 of the
  preceding bytes (8 bytes).
- ``sum``: xxh3_64 hex of ``meta`` + ``emb``: a document that does not match is refused (a miss) and deleted.
- ``hits``, ``last``: hit count and last hit time (mutable, outside the checksum).

Anything unexpected raises :class:`kvplug.errors.PayloadError`; callers count it and treat it as a miss.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from kvplug.errors import PayloadError

EMB_VERSION = 1
_EMB_HEADER = struct.Struct("<BH")
_DIGEST = 8


def encode_embedding(vec: np.ndarray) -> bytes:
    v = np.ascontiguousarray(vec, dtype="<f4").reshape(-1)
    if not 0 < v.size < 65536:
        raise ValueError(f"embedding dimension {v.size} out of range")
    body = _EMB_HEADER.pack(EMB_VERSION, v.size) + v.tobytes()
    return body + xxhash.xxh3_64_digest(body)


def decode_embedding(blob: bytes) -> np.ndarray:
    if len(blob) < _EMB_HEADER.size + _DIGEST:
        raise PayloadError("truncated", f"embedding of {len(blob)} bytes")
    version, dim = _EMB_HEADER.unpack_from(blob)
    if version != EMB_VERSION:
        raise PayloadError("version", f"embedding format {version}, expected {EMB_VERSION}")
    if len(blob) != _EMB_HEADER.size + 4 * dim + _DIGEST:
        raise PayloadError("truncated", f"embedding of {len(blob)} bytes for dimension {dim}")
    body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
    if xxhash.xxh3_64_digest(body) != digest:
        raise PayloadError("checksum", "embedding checksum mismatch")
    vec = np.frombuffer(body, dtype="<f4", offset=_EMB_HEADER.size).astype(np.float32)
    if not np.all(np.isfinite(vec)):
        raise PayloadError("value", "embedding has non-finite values")
    return vec


def doc_key(prefix: str, category: str, doc_id: int) -> str:
    return f"{prefix}doc:{category}:{doc_id:016x}"


def parse_doc_key(prefix: str, key: str) -> tuple[str, int] | None:
    """``(category, id)`` of a document key under ``prefix``, or None."""
    if not key.startswith(prefix + "doc:"):
        return None
    category, _, hexid = key[len(prefix) + 4 :].rpartition(":")
    if not category or len(hexid) != 16:
        return None
    try:
        return category, int(hexid, 16)
    except ValueError:
        return None


_META_KEYS = ("prompt", "category", "scope", "model", "endpoint", "created", "ttl", "max_ttl", "embedder", "response")


@dataclass
class CacheDocument:
    doc_id: int
    category: str
    scope: str
    prompt: str
    model: str
    endpoint: str  # "chat" or "completions"
    created: float
    ttl: float  # the effective TTL when stored (informational; hits are checked against the current one)
    max_ttl: float  # Redis expiry
    embedder: str
    response: dict[str, Any]  # {"choices": [...], "model": upstream model name, "usage": upstream usage}
    embedding: np.ndarray | None = field(default=None, repr=False)
    hits: int = 0
    last_hit: float = 0.0

    def meta_json(self) -> bytes:
        return json.dumps({k: getattr(self, k) for k in _META_KEYS}, separators=(",", ":")).encode()

    def to_fields(self) -> dict[str, bytes]:
        if self.embedding is None:
            raise ValueError("document without embedding")
        meta = self.meta_json()
        emb = encode_embedding(self.embedding)
        return {
            "meta": meta,
            "emb": emb,
            "sum": xxhash.xxh3_64_hexdigest(meta + emb).encode(),
            "hits": str(self.hits).encode(),
            "last": repr(self.last_hit or self.created).encode(),
        }

    @classmethod
    def from_fields(cls, doc_id: int, category: str, raw: dict[Any, Any]) -> CacheDocument:
        f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
        meta_b, emb_b, sum_b = f.get("meta"), f.get("emb"), f.get("sum")
        if not isinstance(meta_b, bytes) or not isinstance(emb_b, bytes) or not isinstance(sum_b, bytes):
            raise PayloadError("truncated", "document without meta/emb/sum")
        if xxhash.xxh3_64_hexdigest(meta_b + emb_b).encode() != sum_b:
            raise PayloadError("checksum", "document checksum mismatch")
        try:
            meta = json.loads(meta_b)
        except ValueError:
            raise PayloadError("format", "document metadata is not JSON") from None
        if not isinstance(meta, dict) or any(k not in meta for k in _META_KEYS):
            raise PayloadError("format", "document metadata lacks fields")
        if meta["category"] != category:
            raise PayloadError("format", f"document category {meta['category']!r} under key of {category!r}")
        if not isinstance(meta["response"], dict) or not isinstance(meta["response"].get("choices"), list):
            raise PayloadError("format", "document response lacks choices")
        try:
            hits = int(f.get("hits") or 0)
            last = float(f.get("last") or 0.0)
        except ValueError:
            hits, last = 0, 0.0
        return cls(
            doc_id=doc_id,
            embedding=decode_embedding(emb_b),
            hits=hits,
            last_hit=last,
            **{k: meta[k] for k in _META_KEYS},
        )

    @property
    def nbytes(self) -> int:
        """Stored size (metadata + embedding), what ``max_bytes`` quotas count."""
        dim = 0 if self.embedding is None else int(np.asarray(self.embedding).size)
        return len(self.meta_json()) + _EMB_HEADER.size + 4 * dim + _DIGEST + 16
