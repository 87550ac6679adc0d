"""Typed configuration: from a dict (what engines pass), environment variables (``KVPLUG_*``) and YAML.

Unknown keys are an error that names the key and lists the known ones. Precedence, lowest first:
defaults, YAML file, environment, explicit dict.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from kvplug.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}


def parse_size(value: float | str) -> int:
    """``"512MiB"``, ``"10GB"``, ``"1.5G"`` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"size expected, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"size must be >= 0, got {value}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"cannot parse size {value!r} (examples: 1048576, 512MiB, 10GB)")
    unit = (m.group(2) or "").lower().rstrip("b") if (m.group(2) or "").lower() != "b" else "b"
    return int(float(m.group(1)) * _UNITS[unit])


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"boolean expected, got {value!r}")


def default_store_url() -> str:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvplug" / "store"
    return f"file://{base}"


def read_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """The YAML document in ``path`` (None when empty); a missing or malformed file is a :class:`ConfigError`
    naming ``what`` and the path."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None


#: Environment prefixes owned by other kvplug components (the semantic cache, the SGLang integration).
_OTHER_ENV = ("KVPLUG_SEMANTIC_", "KVPLUG_SGLANG_")


@dataclass
class KVPlugConfig:
    """kvplug settings shared by every engine integration."""

    store: str | list[str] = field(default_factory=default_store_url)
    chunk_size: int = 256
    codec: str = "raw"
    codec_params: dict[str, Any] = field(default_factory=dict)
    partial_chunk: str = "drop"
    tenant_salt: str = ""
    write_queue_size: int = 256
    promote_on_hit: bool = True
    model_id: str = ""  # engines: key namespace model name (default: the engine's model path or name)
    save_decode: bool = False  # engines: also store chunks completed by generated tokens

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if self.partial_chunk not in ("drop", "keep"):
            raise ConfigError(f"partial_chunk must be 'drop' or 'keep', got {self.partial_chunk!r}")
        if not isinstance(self.codec_params, dict):
            raise ConfigError("codec_params must be a mapping")
        if not self.store:
            raise ConfigError("store must be a URL or a list of URLs")
        from kvplug.codec import get_codec

        get_codec(self.codec, **self.codec_params)  # raises ConfigError on a bad codec

    @property
    def store_urls(self) -> list[str]:
        if isinstance(self.store, str):
            return [u.strip() for u in self.store.split("|") if u.strip()]
        return list(self.store)

    # ---- constructors ------------------------------------------------------------------------------------
    @classmethod
    def known_keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def _coerce(cls, data: dict[str, Any], source: str) -> dict[str, Any]:
        known = cls.known_keys()
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {known}")
        out = dict(data)
        for name in ("chunk_size", "write_queue_size"):
            if name in out and isinstance(out[name], str):
                try:
                    out[name] = int(out[name])
                except ValueError:
                    raise ConfigError(f"{source}: {name} must be an integer, got {out[name]!r}") from None
        for name in ("promote_on_hit", "save_decode"):
            if name in out:
                out[name] = parse_bool(out[name])
        if isinstance(out.get("codec_params"), str):
            loaded = yaml.safe_load(out["codec_params"]) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{source}: codec_params must be a mapping")
            out["codec_params"] = loaded
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> KVPlugConfig:
        return cls(**cls._coerce(dict(data or {}), "config"))

    @classmethod
    def env_dict(cls, environ: dict[str, str] | None = None) -> dict[str, Any]:
        """``KVPLUG_STORE``, ``KVPLUG_CHUNK_SIZE`` ...; an unknown ``KVPLUG_*`` name is an error, except the
        names other components own (``KVPLUG_SEMANTIC_*``, ``KVPLUG_SGLANG_*``)."""
        env = os.environ if environ is None else environ
        out: dict[str, Any] = {}
        for name, value in env.items():
            if not name.startswith("KVPLUG_") or name == "KVPLUG_CONFIG_FILE" or name.startswith(_OTHER_ENV):
                continue
            out[name[len("KVPLUG_") :].lower()] = value
        return out

    @classmethod
    def yaml_dict(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        data = read_yaml(path, "config file")
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        return data.get("kvplug", data) if isinstance(data.get("kvplug"), dict) else data

    @classmethod
    def load(
        cls,
        overrides: dict[str, Any] | None = None,
        yaml_path: str | None = None,
        environ: dict[str, str] | None = None,
    ) -> KVPlugConfig:
        """Merge defaults < YAML (``yaml_path`` or ``$KVPLUG_CONFIG_FILE``) < env < ``overrides``."""
        env = os.environ if environ is None else environ
        merged: dict[str, Any] = {}
        path = yaml_path or env.get("KVPLUG_CONFIG_FILE")
        if path:
            merged.update(cls._coerce(cls.yaml_dict(path), f"config file {path}"))
        merged.update(cls._coerce(cls.env_dict(env), "environment (KVPLUG_*)"))
        merged.update(cls._coerce(dict(overrides or {}), "config"))
        return cls(**merged)
