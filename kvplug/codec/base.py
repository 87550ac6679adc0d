"""The codec interface: a tensor in, framed bytes out, and back."""

from __future__ import annotations

import warnings
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


def tensor_from(
    buf: bytes | bytearray | memoryview, dtype: torch.dtype, shape: Sequence[int], owned: bool = True
) -> torch.Tensor:
    """A tensor from bytes: a fresh, owned copy by default (callers may modify it without touching the store);
    with ``owned=False`` a zero-copy view that callers must only read (the load path, which copies it once
    into the engine's cache)."""
    if owned:
        raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: this view is never written
            raw = torch.frombuffer(buf, dtype=torch.uint8)
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

    def decode_view(
        self, meta: dict[str, Any], body: memoryview, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor | None:
        """A zero-copy, read-only decode where the codec can do one (None: use :meth:`decode_body`)."""
        return None

    def encode(
        self,
        t: torch.Tensor,
        key: str | bytes | None = None,
        mac_key: frame.MacKey | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bytes:
        """Frame ``t`` (any supported dtype) into bytes bound to ``key``, authenticated when ``mac_key`` is given.
        ``extra`` is small JSON metadata stored beside the codec's (e.g. the positions of blendable KV)."""
        if t.dtype not in frame.DTYPE_IDS:
            raise ValueError(f"{self.name}: unsupported dtype {t.dtype}")
        meta, body = self.encode_body(t)
        if extra:
            meta = {**meta, "extra": extra}
        return frame.pack(self.codec_id, t.dtype, t.shape, {"params": self.params(), **meta}, body, key, mac_key)

    def decode(
        self,
        payload: bytes | bytearray | memoryview,
        key: str | bytes | None = None,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        mac_key: frame.MacKey | None = None,
    ) -> torch.Tensor:
        """Verify and decode a payload; any doubt raises :class:`PayloadError`."""
        return self.decode_frame(payload, key, shape, dtype, mac_key)[0]

    def decode_frame(
        self,
        payload: bytes | bytearray | memoryview,
        key: str | bytes | None = None,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        mac_key: frame.MacKey | None = None,
        owned: bool = True,
    ) -> tuple[torch.Tensor, frame.Frame]:
        """:meth:`decode`, also returning the verified frame (for its ``meta["extra"]``). With ``owned=False``
        the tensor may be a read-only view of ``payload`` (zero-copy for the raw codec): read it, never write it."""
        f = frame.unpack(payload, codec_id=self.codec_id, key=key, shape=shape, dtype=dtype, mac_key=mac_key)
        if f.meta.get("params") != self.params():
            raise PayloadError("codec", f"payload codec parameters {f.meta.get('params')} != {self.params()}")
        try:
            out = self.decode_view(f.meta, f.body, f.shape, f.dtype) if not owned else None
            if out is None:
                out = self.decode_body(f.meta, f.body, f.shape, f.dtype)
        except PayloadError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure (zstd, lz4, memory, overflow) is a refusal
            raise PayloadError("corrupt", f"{self.name} body does not decode: {type(e).__name__}: {e}") from None
        if tuple(out.shape) != f.shape or out.dtype != f.dtype:
            raise PayloadError("corrupt", f"{self.name} decoded {tuple(out.shape)} {out.dtype}")
        return out, f


def check_kv_shape(name: str, t: torch.Tensor) -> None:
    """Quantizing codecs need the KV layout ``[layers, 2, tokens, kv_heads, head_dim]``."""
    if t.ndim != 5 or t.shape[1] != 2:
        raise ValueError(f"{name}: expects a KV tensor [layers, 2, tokens, heads, dim], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expects a floating-point tensor, got {t.dtype}")
