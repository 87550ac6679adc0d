"""KV chunks by token prefix: chunk keys + codec + store. Any doubt about a stored payload is a miss.

This is the layer the engine integrations use. A payload that fails verification (checksum or MAC, version,
codec, key, shape, dtype, a body its decoder rejects) is deleted from the store, counted in
``kvplug_payload_errors{kind}`` and reported as a miss; it never raises and never returns a wrong tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from kvplug.chunks import Chunk, ChunkKeyer, Namespace, PartialPolicy
from kvplug.codec import Codec, get_codec
from kvplug.codec.frame import MacKey
from kvplug.connectors.base import ChunkStore
from kvplug.errors import ConfigError
from kvplug.payload import Payloads, mac_key_of

Tokens = Sequence[int] | np.ndarray


class KVCache:
    """Stores and loads KV chunks ``[layers, 2, chunk_tokens, kv_heads, head_dim]`` for token sequences.

    ``secret`` (or a ready ``mac_key``) turns on payload authentication: payloads carry a keyed MAC, and only
    payloads authenticated under the same secret are accepted.
    """

    def __init__(
        self,
        store: ChunkStore,
        namespace: Namespace,
        partial: PartialPolicy = "drop",
        secret: str | bytes | None = None,
        mac_key: MacKey | None = None,
    ) -> None:
        self.store = store
        codec: Codec = get_codec(namespace.codec, **dict(namespace.codec_params))
        mac_key = mac_key or mac_key_of(secret)
        # Key on the codec's canonical name and effective parameters (defaults included), so "int4" and
        # "kivi?bits=4" share keys and a changed default changes keys; and on the MAC key's id, so readers with
        # another secret (or none) never fight over the same entries.
        self.namespace = replace(
            namespace,
            codec=codec.name,
            codec_params=Namespace.items(codec.params()),
            auth=mac_key.key_id if mac_key else "",
        )
        self.payloads = Payloads(store, codec, mac_key)
        self.keyer = ChunkKeyer(self.namespace, partial)

    @property
    def codec(self) -> Codec:
        return self.payloads.codec

    @property
    def payload_errors(self) -> dict[str, int]:
        return self.payloads.errors

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
            items.append((c.prefix_key, self.payloads.encode(c.prefix_key, kv)))
        return self.store.put_many(items)

    def get(self, tokens: Tokens, num_chunks: int | None = None) -> list[torch.Tensor | None]:
        """Decoded chunks for ``tokens`` (first ``num_chunks``); ``None`` for each miss or refused payload."""
        chunks = self.chunks(tokens)[:num_chunks]
        return self.get_chunks(chunks)

    def decode_chunk(
        self, c: Chunk, payload: bytes | bytearray | memoryview | None, owned: bool = True
    ) -> torch.Tensor | None:
        """One fetched payload to its KV (None for a miss; a refused payload is counted and deleted).
        ``owned=False``: the KV may be a read-only view of ``payload`` (the engine load path copies it once)."""
        if payload is None:
            return None
        return self.payloads.decode(c.prefix_key, payload, self.chunk_shape(c.num_tokens), self.dtype, owned)

    def get_chunks(self, chunks: Sequence[Chunk]) -> list[torch.Tensor | None]:
        payloads = self.store.get_many([c.prefix_key for c in chunks])
        return [self.decode_chunk(c, p) for c, p in zip(chunks, payloads, strict=True)]

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
