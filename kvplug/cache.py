"""KV chunks by token prefix: chunk keys + codec + store. Any doubt about a stored payload is a miss.

This is the layer the engine integrations use. A payload that fails verification (checksum, version,
codec, key, shape, dtype) is deleted from the store, counted in ``kvplug_payload_errors{kind}`` and
reported as a miss; it never raises and never returns a wrong tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from kvplug import metrics
from kvplug.chunks import Chunk, ChunkKeyer, Namespace, PartialPolicy
from kvplug.codec import Codec, get_codec
from kvplug.connectors.base import ChunkStore
from kvplug.errors import ConfigError, PayloadError

log = logging.getLogger(__name__)
Tokens = Sequence[int] | np.ndarray


class KVCache:
    """Stores and loads KV chunks ``[layers, 2, chunk_tokens, kv_heads, head_dim]`` for token sequences."""

    def __init__(self, store: ChunkStore, namespace: Namespace, partial: PartialPolicy = "drop") -> None:
        self.store = store
        self.codec: Codec = get_codec(namespace.codec, **dict(namespace.codec_params))
        # Key on the codec's effective parameters (defaults included), so a changed default changes keys.
        self.namespace = replace(namespace, codec_params=Namespace.items(self.codec.params()))
        self.keyer = ChunkKeyer(namespace, partial)
        self.payload_errors: dict[str, int] = {}

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        ns = self.namespace
        return (ns.num_layers, 2, num_tokens, ns.num_kv_heads, ns.head_dim)

    @property
    def dtype(self) -> torch.dtype:
        dt = getattr(torch, self.namespace.dtype, None)
        if not isinstance(dt, torch.dtype):
            raise ConfigError(f"namespace dtype {self.namespace.dtype!r} is not a torch dtype")
        return dt

    def chunks(self, tokens: Tokens) -> list[Chunk]:
        return self.keyer.chunks(tokens)

    def lookup(self, tokens: Tokens) -> int:
        """Number of leading tokens whose chunks are all stored (one batched ``contains``)."""
        chunks = self.chunks(tokens)
        n = self.store.contains([c.prefix_key for c in chunks])
        return chunks[n - 1].end if n else 0

    def put(self, tokens: Tokens, kv: torch.Tensor, start_chunk: int = 0, skip_existing: bool = True) -> int:
        """Encode and store the chunks of ``kv`` (covering ``tokens``) from ``start_chunk``; returns how many."""
        chunks = self.chunks(tokens)[start_chunk:]
        expected = self.chunk_shape(len(tokens))
        if (
            tuple(kv.shape[:2]) != expected[:2]
            or tuple(kv.shape[3:]) != expected[3:]
            or kv.shape[2] < (chunks[-1].end if chunks else 0)
        ):
            raise ValueError(f"kv shape {tuple(kv.shape)} does not cover {len(tokens)} tokens of layout {expected}")
        if kv.dtype != self.dtype:
            raise ValueError(f"kv dtype {kv.dtype} != namespace dtype {self.dtype}")
        if skip_existing and chunks:
            present = self.store.exists_many([c.prefix_key for c in chunks])
            chunks = [c for c, p in zip(chunks, present, strict=True) if not p]
        return self.put_chunks([(c, kv[:, :, c.start : c.end]) for c in chunks])

    def put_chunks(self, pairs: Sequence[tuple[Chunk, torch.Tensor]]) -> int:
        """Encode and store given chunks (``[L, 2, chunk_tokens, H, D]`` each); returns how many were stored."""
        items = []
        for c, kv in pairs:
            if tuple(kv.shape) != self.chunk_shape(c.num_tokens) or kv.dtype != self.dtype:
                raise ValueError(
                    f"chunk {c.index}: kv {tuple(kv.shape)} {kv.dtype}, expected "
                    f"{self.chunk_shape(c.num_tokens)} {self.dtype}"
                )
            items.append((c.prefix_key, self.codec.encode(kv, key=c.prefix_key)))
        return self.store.put_many(items)

    def get(self, tokens: Tokens, num_chunks: int | None = None) -> list[torch.Tensor | None]:
        """Decoded chunks for ``tokens`` (first ``num_chunks``); ``None`` for each miss or refused payload."""
        chunks = self.chunks(tokens)[:num_chunks]
        return self.get_chunks(chunks)

    def get_chunks(self, chunks: Sequence[Chunk]) -> list[torch.Tensor | None]:
        keys = [c.prefix_key for c in chunks]
        payloads = self.store.get_many(keys)
        out: list[torch.Tensor | None] = []
        bad: list[str] = []
        for c, key, p in zip(chunks, keys, payloads, strict=True):
            if p is None:
                out.append(None)
                continue
            try:
                out.append(self.codec.decode(p, key=key, shape=self.chunk_shape(c.num_tokens), dtype=self.dtype))
            except PayloadError as e:
                self.payload_errors[e.kind] = self.payload_errors.get(e.kind, 0) + 1
                metrics.PAYLOAD_ERRORS.labels(e.kind).inc()
                log.warning("kvplug: refused stored chunk %s… (%s); treated as a miss", key[:12], e)
                bad.append(key)
                out.append(None)
        if bad:
            self.store.delete(bad)
        return out

    def prefix(self, tokens: Tokens) -> tuple[int, torch.Tensor | None]:
        """Load the longest stored prefix: (tokens covered, KV ``[L, 2, n, H, D]`` or None)."""
        n = self.store.contains(self.keyer.prefix_keys(tokens))
        if not n:
            return 0, None
        got = self.get(tokens, n)
        good: list[torch.Tensor] = []
        for t in got:
            if t is None:
                break
            good.append(t)
        if not good:
            return 0, None
        return sum(t.shape[2] for t in good), torch.cat(good, dim=2)
