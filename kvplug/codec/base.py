"""The codec interface: a tensor in, framed bytes out, and back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from kvplug.codec import frame
from kvplug.errors import PayloadError

Body = list[bytes | bytearray | memoryview]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a contiguous CPU tensor."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def tensor_from(buf: bytes | bytearray | memoryview, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A fresh (writable, owned) tensor from bytes: callers may modify it without touching the store."""
    raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    return raw.view(dtype).reshape(tuple(shape))


class Codec(ABC):
    """Encodes a tensor into a frame body. Subclasses are small and keep their parameters as fields."""

    name: ClassVar[str]
    codec_id: ClassVar[int]

    def params(self) -> dict[str, Any]:
        """Parameters that change the bytes; part of the namespace and checked on decode."""
        return {}

    @property
    def spec(self) -> str:
        p = self.params()
        return self.name + ("?" + "&".join(f"{k}={v}" for k, v in sorted(p.items())) if p else "")

    @abstractmethod
    def encode_body(self, t: torch.Tensor) -> tuple[dict[str, Any], Body]:
        """Return (extra metadata, body parts) for tensor ``t``."""

    @abstractmethod
    def decode_body(
        self, meta: dict[str, Any], body: memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """Inverse of :meth:`encode_body`; may raise ``ValueError`` on inconsistent bodies."""

    def encode(self, t: torch.Tensor, key: str | bytes | None = None) -> bytes:
        """Frame ``t`` (any supported dtype) into bytes bound to ``key``."""
        if t.dtype not in frame.DTYPE_IDS:
            raise ValueError(f"{self.name}: unsupported dtype {t.dtype}")
        meta, body = self.encode_body(t)
        return frame.pack(self.codec_id, t.dtype, t.shape, {"params": self.params(), **meta}, body, key)

    def decode(
        self,
        payload: bytes | bytearray | memoryview,
        key: str | bytes | None = None,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Verify and decode a payload; any doubt raises :class:`PayloadError`."""
        f = frame.unpack(payload, codec_id=self.codec_id, key=key, shape=shape, dtype=dtype)
        if f.meta.get("params") != self.params():
            raise PayloadError("codec", f"payload codec parameters {f.meta.get('params')} != {self.params()}")
        try:
            out = self.decode_body(f.meta, f.body, f.shape, f.dtype)
        except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as e:
            raise PayloadError("corrupt", f"{self.name} body does not decode: {e}") from None
        if tuple(out.shape) != f.shape or out.dtype != f.dtype:
            raise PayloadError("corrupt", f"{self.name} decoded {tuple(out.shape)} {out.dtype}")
        return out


def check_kv_shape(name: str, t: torch.Tensor) -> None:
    """Quantizing codecs need the KV layout ``[layers, 2, tokens, kv_heads, head_dim]``."""
    if t.ndim != 5 or t.shape[1] != 2:
        raise ValueError(f"{name}: expects a KV tensor [layers, 2, tokens, heads, dim], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expects a floating-point tensor, got {t.dtype}")
