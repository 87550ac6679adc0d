"""One registry by name: ``get("snapkv", compression_ratio=0.5)``, ``get("snapkv+kivi", bits=4)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from kvplug.errors import ConfigError
from kvplug.methods.base import Evictor, KVMethod, Transform

M = TypeVar("M", bound=type[KVMethod])

_METHODS: dict[str, type[KVMethod]] = {}


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make a method available as ``name``."""

    def deco(cls: M) -> M:
        if "+" in name or "." in name or not name:
            raise ValueError(f"bad method name {name!r}")
        if _METHODS.get(name, cls) is not cls:
            raise ValueError(f"method name {name!r} is taken by {_METHODS[name].__name__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_METHODS)


def method_class(name: str) -> type[KVMethod]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown KV method {name!r}; available: {', '.join(available())}") from None


def parameters(name: str) -> dict[str, Any]:
    """A method's parameters and their defaults."""
    cls = method_class(name)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def get(name: str, **params: Any) -> KVMethod:
    """Build a method by name. ``"evictor+transform"`` composes (evict, then quantize or prune channels what is
    kept); a parameter goes to the part that has it, or name the part: ``get("snapkv+think", **{"think.window_size":
    16})``. String values (engine flags) are converted to the field's type."""
    parts = [p.strip() for p in name.split("+")]
    if len(parts) == 1:
        return _build(parts[0], params)
    if len(parts) != 2:
        raise ConfigError(f"composed method {name!r}: use 'evictor+transform', e.g. 'snapkv+kivi'")
    ev_cls, tr_cls = method_class(parts[0]), method_class(parts[1])
    if not issubclass(ev_cls, Evictor):
        evictors = [n for n in available() if issubclass(_METHODS[n], Evictor)]
        raise ConfigError(f"{parts[0]!r} is not an evictor; the first part is one of: {', '.join(evictors)}")
    if not issubclass(tr_cls, Transform):
        transforms = [n for n in available() if issubclass(_METHODS[n], Transform)]
        raise ConfigError(f"{parts[1]!r} cannot wrap an evictor; the second part is one of: {', '.join(transforms)}")
    split: dict[str, dict[str, Any]] = {parts[0]: {}, parts[1]: {}}
    for key, value in params.items():
        if "." in key:
            part, field = key.split(".", 1)
            if part not in split:
                raise ConfigError(f"parameter {key!r}: {part!r} is not part of {name!r}")
            split[part][field] = value
            continue
        owners = [p for p in parts if key in _field_names(method_class(p))]
        if not owners:
            valid = sorted({f"{p}.{f}" for p in parts for f in _field_names(method_class(p))})
            raise ConfigError(f"{name}: unknown parameter {key!r}; valid: {', '.join(valid)}")
        if len(owners) > 1:
            raise ConfigError(f"{name}: parameter {key!r} is ambiguous; write {owners[0]}.{key} or {owners[1]}.{key}")
        split[owners[0]][key] = value
    from kvplug.methods.compose import compose

    return compose(_build(parts[0], split[parts[0]]), _build(parts[1], split[parts[1]]))


def _field_names(cls: type[KVMethod]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]


def _build(name: str, params: dict[str, Any]) -> KVMethod:
    cls = method_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ConfigError(f"{name}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
    kwargs = {k: _coerce(name, k, str(fields[k].type), v) for k, v in params.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{name}: bad parameters {params}: {e}") from None


def _coerce(method: str, key: str, annotation: str, value: Any) -> Any:
    """Strings from flags become the field's type; ints become floats for float fields."""
    kinds = {t.strip() for t in annotation.split("|")}
    try:
        if isinstance(value, str):
            s = value.strip()
            if "None" in kinds and s.lower() in ("none", "null", ""):
                return None
            if "bool" in kinds:
                if s.lower() in ("1", "true", "yes", "on"):
                    return True
                if s.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(s)
            if "int" in kinds:
                return int(s)
            if "float" in kinds:
                return float(s)
            return value
        if isinstance(value, bool):
            if "bool" not in kinds:
                raise ValueError(value)
            return value
        if isinstance(value, int) and "float" in kinds and "int" not in kinds:
            return float(value)
        if isinstance(value, float) and "int" in kinds and "float" not in kinds:
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
    except ValueError:
        raise ConfigError(f"{method}: parameter {key} expects {annotation}, got {value!r}") from None
    return value
