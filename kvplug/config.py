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


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: str, what: str, environ: dict[str, str] | None = None) -> str:
    """Replace ``${VAR}`` with the environment's value (a missing variable is an error naming it, never a value):
    ``"store": "redis://:${REDIS_PASSWORD}@host:6379/0"`` keeps the password out of the engine's own logs."""
    env = os.environ if environ is None else environ

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in env:
            raise ConfigError(f"{what}: environment variable {m.group(1)} is not set")
        return env[m.group(1)]

    return _ENV_REF.sub(sub, value)


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
    write_queue_bytes: int = 512 << 20  # engines: host memory pending saves may hold; a save over it is dropped
    promote_on_hit: bool = True
    model_id: str = ""  # engines: key namespace model name (default: the engine's model path or name)
    save_decode: bool = False  # engines: also store chunks completed by generated tokens
    # engines: the most a store lookup may add to a request (seconds); over it, the request is a miss and the
    # store's circuit breaker opens (misses at once, background probes) until the store answers again
    lookup_timeout: float = 0.1
    # engines: the most loading one request's KV may take (seconds); the rest is recomputed
    load_timeout: float = 1.0
    max_tenants: int = 1024  # engines: per-tenant key namespaces kept (least recently used beyond it dropped)
    # payload authentication: with a secret (>= 16 bytes), payloads carry a keyed MAC and only payloads made with
    # the same secret are accepted. Never logged or shown (repr=False); prefer KVPLUG_SECRET or secret_file.
    secret: str = field(default="", repr=False)
    secret_file: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def __repr__(self) -> str:
        from kvplug.redact import redact

        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        return redact(f"KVPlugConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})")

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
        for name in ("lookup_timeout", "load_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
        for name in ("write_queue_size", "write_queue_bytes", "max_tenants"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.secret and self.secret_file:
            raise ConfigError("give either secret or secret_file, not both")
        if self.payload_secret and len(self.payload_secret.encode()) < 16:
            raise ConfigError("the payload secret must be at least 16 bytes long")

    @property
    def payload_secret(self) -> str:
        """The payload secret (from ``secret`` or the first line of ``secret_file``); "" when none."""
        if self.secret_file:
            try:
                return Path(self.secret_file).read_text().splitlines()[0].strip()
            except (OSError, IndexError):
                raise ConfigError(f"secret_file {self.secret_file} cannot be read or is empty") from None
        return self.secret

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
    def _coerce(cls, data: dict[str, Any], source: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
        known = cls.known_keys()
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {known}")
        out = dict(data)
        for name in ("chunk_size", "write_queue_size", "max_tenants"):
            if name in out and isinstance(out[name], str):
                try:
                    out[name] = int(out[name])
                except ValueError:
                    raise ConfigError(f"{source}: {name} must be an integer, got {out[name]!r}") from None
        for name in ("promote_on_hit", "save_decode"):
            if name in out:
                out[name] = parse_bool(out[name])
        for name in ("lookup_timeout", "load_timeout"):
            if name in out and isinstance(out[name], str):
                try:
                    out[name] = float(out[name])
                except ValueError:
                    raise ConfigError(f"{source}: {name} must be a number of seconds, got {out[name]!r}") from None
        if "write_queue_bytes" in out:
            out["write_queue_bytes"] = parse_size(out["write_queue_bytes"])
        for name in ("store", "secret"):  # ${VAR} from the environment: keeps secrets out of engine logs
            if isinstance(out.get(name), str):
                out[name] = expand_env(out[name], name, environ)
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
            merged.update(cls._coerce(cls.yaml_dict(path), f"config file {path}", dict(env)))
        merged.update(cls._coerce(cls.env_dict(env), "environment (KVPLUG_*)", dict(env)))
        merged.update(cls._coerce(dict(overrides or {}), "config", dict(env)))
        return cls(**merged)
