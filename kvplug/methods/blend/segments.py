"""Position-independent segment KV: what is stored for a reusable document, its key, and a verified store.

A segment is a run of prompt tokens (a document, a message) whose KV was computed once, in isolation or after a
shared prefix (a system prompt), at ``positions``. Its key is position-independent: ``sha256("blend-segment" ||
namespace digest || sha256(prefix tokens) || tokens)``. The namespace (:class:`kvplug.chunks.Namespace`) carries the
model, revision, dtype, KV layout, RoPE settings, codec and tenant salt, so a segment of another model or tenant has
another key and is never found; the prefix digest keeps KV computed after different system prompts apart.

:class:`SegmentStore` keeps segments in any :class:`~kvplug.connectors.base.ChunkStore` as framed payloads
(:class:`kvplug.payload.Payloads`: checksum or MAC, key binding, shape and dtype checks) with the positions, token
digest, namespace digest and strategy statistics in the frame's JSON ``extra``. Anything that does not verify is a
counted miss and is deleted; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kvplug.chunks import Namespace, token_bytes
from kvplug.codec import Codec, get_codec
from kvplug.connectors.base import ChunkStore
from kvplug.payload import Payloads


def tokens_digest(tokens: Sequence[int] | Tensor) -> str:
    """sha256 hex of the canonical token encoding."""
    if isinstance(tokens, Tensor):
        tokens = tokens.flatten().tolist()
    return hashlib.sha256(token_bytes(list(tokens))).hexdigest()


def segment_key(namespace: Namespace, tokens: Sequence[int] | Tensor, prefix: Sequence[int] | Tensor = ()) -> str:
    """The position-independent key of a segment computed after ``prefix`` (``()``: in isolation)."""
    if isinstance(tokens, Tensor):
        tokens = tokens.flatten().tolist()
    if isinstance(prefix, Tensor):
        prefix = prefix.flatten().tolist()
    if not len(tokens):
        raise ValueError("a segment needs at least one token")
    h = hashlib.sha256(b"blend-segment\x00" + namespace.digest)
    h.update(bytes.fromhex(tokens_digest(prefix)))
    h.update(token_bytes(list(tokens)))
    return h.hexdigest()


@dataclass
class SegmentKV:
    """A segment's KV: ``kv [layers, 2, N, kv_heads, head_dim]`` with keys post-RoPE at ``positions [N]``."""

    tokens: list[int]
    kv: Tensor
    positions: Tensor
    prefix_digest: str = ""  # tokens_digest of the prefix it was computed after
    meta: dict[str, Any] = field(default_factory=dict)  # strategy statistics (Cache-Craft's inter-attention)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if self.kv.ndim != 5 or self.kv.shape[1] != 2 or self.kv.shape[2] != n:
            raise ValueError(f"segment KV must be [layers, 2, {n}, heads, dim], got {tuple(self.kv.shape)}")
        self.positions = torch.as_tensor(self.positions, dtype=torch.long).flatten()
        if self.positions.numel() != n:
            raise ValueError(f"{self.positions.numel()} positions for {n} tokens")

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def keys(self, layer: int) -> Tensor:
        """``[N, H, D]`` keys of ``layer``."""
        return self.kv[layer, 0]

    def values(self, layer: int) -> Tensor:
        return self.kv[layer, 1]


class SegmentStore:
    """Segments in a :class:`ChunkStore`, verified on the way back (see the module docstring)."""

    def __init__(
        self, store: ChunkStore, namespace: Namespace, codec: Codec | None = None, payloads: Payloads | None = None
    ) -> None:
        self.namespace = namespace
        self.payloads = payloads or Payloads(store, codec or get_codec(namespace.codec, **dict(namespace.codec_params)))
        self.store = self.payloads.store
        self.hits = 0
        self.misses = 0
        self.refused = 0

    def key(self, tokens: Sequence[int] | Tensor, prefix: Sequence[int] | Tensor = ()) -> str:
        return segment_key(self.namespace, tokens, prefix)

    def _shape(self, n: int) -> tuple[int, ...]:
        ns = self.namespace
        return (ns.num_layers, 2, n, ns.num_kv_heads, ns.head_dim)

    def put(self, seg: SegmentKV, prefix: Sequence[int] | Tensor = ()) -> str:
        """Store ``seg`` (computed after ``prefix``); returns its key."""
        key = self.key(seg.tokens, prefix)
        if tuple(seg.kv.shape) != self._shape(seg.num_tokens):
            want = self._shape(seg.num_tokens)
            raise ValueError(f"segment KV {tuple(seg.kv.shape)} does not fit the namespace's {want}")
        pos = seg.positions
        contiguous = bool(torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + pos.numel())))
        extra = {
            "blend": 1,
            "namespace": self.namespace.digest.hex(),
            "tokens": tokens_digest(seg.tokens),
            "prefix": tokens_digest(prefix),
            "positions": {"start": int(pos[0])} if contiguous else {"list": pos.tolist()},
            "meta": seg.meta,
        }
        self.store.put(key, self.payloads.encode(key, seg.kv.contiguous(), extra=extra))
        return key

    def get(self, tokens: Sequence[int] | Tensor, prefix: Sequence[int] | Tensor = ()) -> SegmentKV | None:
        """The stored segment for ``tokens`` after ``prefix``, or None (absent, or refused: counted and deleted)."""
        if isinstance(tokens, Tensor):
            tokens = tokens.flatten().tolist()
        key = self.key(tokens, prefix)
        raw = self.store.get(key)
        if raw is None:
            self.misses += 1
            return None
        dtype = getattr(torch, self.namespace.dtype, None)
        dtype = dtype if isinstance(dtype, torch.dtype) else None
        got = self.payloads.verify(key, raw, self._shape(len(tokens)), dtype)
        extra = got[1].meta.get("extra", {}) if got is not None else {}
        ok = (
            got is not None
            and extra.get("namespace") == self.namespace.digest.hex()
            and extra.get("tokens") == tokens_digest(tokens)
            and extra.get("prefix") == tokens_digest(prefix)
        )
        if not ok or got is None:
            self.refused += 1
            self.misses += 1
            self.payloads.refuse([key])
            return None
        p = extra.get("positions", {})
        n = len(tokens)
        positions = torch.arange(int(p["start"]), int(p["start"]) + n) if "start" in p else torch.tensor(p["list"])
        self.hits += 1
        return SegmentKV(list(tokens), got[0], positions, tokens_digest(prefix), dict(extra.get("meta") or {}))
