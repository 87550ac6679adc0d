"""One payload path for every engine: frame a tensor under a store key, and verify it back.

:class:`Payloads` binds a store, a codec and the optional MAC key (from the operator's secret). A payload that
fails verification for any reason (checksum or MAC, format version, codec, key, shape, dtype, a body the decoder
rejects, a decoder that runs out of memory) is a miss: it is counted in ``kvplug_payload_errors{kind}`` and in
:attr:`Payloads.errors`, logged once with the first characters of its key, and deleted from the store so the next
request recomputes and rewrites it. Nothing here raises on a bad payload. The vLLM connector (through
:class:`kvplug.cache.KVCache`) and the SGLang HiCache backend both use this class, so every hardening lands once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch

from kvplug import metrics
from kvplug.codec import Codec
from kvplug.codec.frame import Frame, MacKey
from kvplug.connectors.base import ChunkStore
from kvplug.errors import PayloadError

log = logging.getLogger("kvplug.payload")


def mac_key_of(secret: str | bytes | None) -> MacKey | None:
    """The MAC key for an operator secret (None: payloads carry an unkeyed checksum)."""
    return MacKey.from_secret(secret) if secret else None


class Payloads:
    """Encode and verify framed tensors of one store (see the module docstring)."""

    def __init__(self, store: ChunkStore, codec: Codec, mac_key: MacKey | None = None) -> None:
        self.store = store
        self.codec = codec
        self.mac_key = mac_key
        self.errors: dict[str, int] = {}
        self._lock = threading.Lock()

    def encode(self, key: str, t: torch.Tensor, extra: dict[str, Any] | None = None) -> bytes:
        return self.codec.encode(t, key=key, mac_key=self.mac_key, extra=extra)

    def verify(
        self,
        key: str,
        payload: bytes | bytearray | memoryview,
        shape: Sequence[int] | None,
        dtype: torch.dtype | None,
        owned: bool = True,
    ) -> tuple[torch.Tensor, Frame] | None:
        """Decode one payload; a refusal is counted and reported as None (the caller deletes via :meth:`refuse`).
        ``owned=False``: the tensor may be a read-only view of ``payload`` (see :meth:`Codec.decode_frame`)."""
        try:
            return self.codec.decode_frame(
                payload, key=key, shape=shape, dtype=dtype, mac_key=self.mac_key, owned=owned
            )
        except PayloadError as e:
            self._count(key, e)
            return None

    def decode(
        self,
        key: str,
        payload: bytes | bytearray | memoryview,
        shape: Sequence[int] | None,
        dtype: torch.dtype | None,
        owned: bool = True,
    ) -> torch.Tensor | None:
        """Decode one payload; a refused one is counted, deleted and reported as None."""
        got = self.verify(key, payload, shape, dtype, owned)
        if got is None:
            self.refuse([key])
            return None
        return got[0]

    def refuse(self, keys: Sequence[str]) -> None:
        """Delete refused entries (a store failure here is counted by the store, never raised)."""
        if keys:
            self.store.delete(list(keys))

    def _count(self, key: str, e: PayloadError) -> None:
        with self._lock:
            self.errors[e.kind] = self.errors.get(e.kind, 0) + 1
        metrics.PAYLOAD_ERRORS.labels(e.kind).inc()
        log.warning("kvplug: refused stored payload %s… (%s); treated as a miss", key[:12], e)
