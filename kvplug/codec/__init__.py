"""Codecs: tensors to versioned, checksummed frames and back. ``get_codec("int4")`` and friends."""

from __future__ import annotations

from typing import Any

from kvplug.codec.base import Codec
from kvplug.codec.bytes_codecs import Lz4Codec, RawCodec, ZstdCodec
from kvplug.codec.cachegen import CacheGenCodec
from kvplug.codec.frame import FORMAT_VERSION, Frame
from kvplug.codec.quant import Fp8Codec, KiviCodec
from kvplug.errors import ConfigError

_FACTORIES: dict[str, tuple[type[Codec], dict[str, Any]]] = {
    "raw": (RawCodec, {}),
    "zstd": (ZstdCodec, {}),
    "lz4": (Lz4Codec, {}),
    "fp8": (Fp8Codec, {}),
    "int8": (KiviCodec, {"bits": 8}),
    "int4": (KiviCodec, {"bits": 4}),
    "int2": (KiviCodec, {"bits": 2}),
    "kivi": (KiviCodec, {}),
    "cachegen": (CacheGenCodec, {}),
}

CODEC_NAMES = tuple(_FACTORIES)


def get_codec(name: str, **params: Any) -> Codec:
    """Build a codec by name with optional parameters (``get_codec("int4", group_size=64)``)."""
    if name not in _FACTORIES:
        raise ConfigError(f"unknown codec {name!r}; known: {', '.join(CODEC_NAMES)}")
    cls, fixed = _FACTORIES[name]
    clash = set(fixed) & set(params)
    if clash:
        raise ConfigError(f"codec {name!r} fixes {sorted(clash)}; use 'kivi' to set them")
    try:
        return cls(**fixed, **params)
    except TypeError as e:
        raise ConfigError(f"codec {name!r}: bad parameters {params}: {e}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None


__all__ = [
    "CODEC_NAMES",
    "FORMAT_VERSION",
    "CacheGenCodec",
    "Codec",
    "Fp8Codec",
    "Frame",
    "KiviCodec",
    "Lz4Codec",
    "RawCodec",
    "ZstdCodec",
    "get_codec",
]
