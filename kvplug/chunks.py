"""Token chunking and chunk keys.

A chunk is ``chunk_size`` consecutive tokens. Two key kinds exist:

* prefix keys, chained: ``h_0 = namespace digest``, ``h_i = sha256(h_{i-1} || tokens_i)``. A hit on
  ``h_i`` means the whole prefix up to chunk ``i`` is identical, in the same namespace;
* blend keys, position-independent: ``sha256(b"blend" || namespace digest || tokens_i)``.

The namespace digest covers everything that changes the stored bytes (model, revision, dtype, KV layout,
tensor-parallel rank/size, codec and parameters, rotary settings, tenant salt, payload MAC key id). Hashing uses
sha256 over a canonical encoding only: never Python's ``hash()``, whose seed differs per process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from kvplug.errors import ConfigError

KEY_FORMAT_VERSION = 1
PartialPolicy = Literal["drop", "keep"]


@dataclass(frozen=True)
class Namespace:
    """Everything that changes the bytes of a stored chunk. Two namespaces share no key."""

    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    revision: str = ""
    layout: str = "layers,kv,tokens,heads,dim"
    tp_rank: int = 0
    tp_size: int = 1
    codec: str = "raw"
    codec_params: tuple[tuple[str, Any], ...] = ()
    rope: tuple[tuple[str, Any], ...] = ()
    tenant_salt: str = ""
    auth: str = ""  # id of the payload MAC key ("" when payloads are not authenticated); never the secret
    chunk_size: int = 256
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("namespace: model must be a non-empty string")
        for name in ("num_layers", "num_kv_heads", "head_dim", "tp_size", "chunk_size"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"namespace: {name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError(f"namespace: tp_rank {self.tp_rank} outside [0, {self.tp_size})")

    @staticmethod
    def items(mapping: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
        """Freeze a dict into the sorted tuple form the namespace fields take."""
        return tuple(sorted((mapping or {}).items()))

    def canonical(self) -> bytes:
        """Canonical JSON of all fields (sorted keys, no whitespace)."""
        body = asdict(self)
        body["key_format"] = KEY_FORMAT_VERSION
        return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()

    @cached_property
    def digest(self) -> bytes:
        """32-byte sha256 of :meth:`canonical`: the seed of every key in this namespace."""
        return hashlib.sha256(b"kvplug-namespace\x00" + self.canonical()).digest()

    def scoped_key(self, external_key: str) -> str:
        """A store key for a key made by someone else (an engine's page hash) in this namespace:
        ``sha256(namespace digest || key)`` as hex, so two namespaces never share an entry."""
        return hashlib.sha256(self.digest + external_key.encode()).hexdigest()


def token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Canonical little-endian uint32 encoding of token ids."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must be in [0, 2**32)")
    return arr.astype("<u4", copy=False).tobytes()


@dataclass(frozen=True)
class Chunk:
    """One chunk of a token sequence: token span ``[start, end)`` and its keys."""

    index: int
    start: int
    end: int
    prefix_key: str
    blend_key: str

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class ChunkKeyer:
    """Splits token sequences into chunks and derives their keys in one namespace."""

    def __init__(self, namespace: Namespace, partial: PartialPolicy = "drop") -> None:
        if partial not in ("drop", "keep"):
            raise ConfigError(f"partial chunk policy must be 'drop' or 'keep', got {partial!r}")
        self.namespace = namespace
        self.chunk_size = namespace.chunk_size
        self.partial = partial
        self._seed = namespace.digest

    def spans(self, num_tokens: int) -> list[tuple[int, int]]:
        """Token spans of the chunks of a sequence of ``num_tokens`` tokens."""
        full = num_tokens // self.chunk_size
        spans = [(i * self.chunk_size, (i + 1) * self.chunk_size) for i in range(full)]
        if self.partial == "keep" and num_tokens % self.chunk_size:
            spans.append((full * self.chunk_size, num_tokens))
        return spans

    def chunks(self, tokens: Sequence[int] | np.ndarray) -> list[Chunk]:
        """All chunks of ``tokens`` with chained prefix keys and position-independent blend keys."""
        data = token_bytes(tokens)
        out: list[Chunk] = []
        parent = self._seed
        for i, (s, e) in enumerate(self.spans(len(data) // 4)):
            body = data[4 * s : 4 * e]
            parent = hashlib.sha256(parent + body).digest()
            blend = hashlib.sha256(b"blend\x00" + self._seed + body).hexdigest()
            out.append(Chunk(i, s, e, parent.hex(), blend))
        return out

    def prefix_keys(self, tokens: Sequence[int] | np.ndarray) -> list[str]:
        return [c.prefix_key for c in self.chunks(tokens)]

    def blend_keys(self, tokens: Sequence[int] | np.ndarray) -> list[str]:
        return [c.blend_key for c in self.chunks(tokens)]
