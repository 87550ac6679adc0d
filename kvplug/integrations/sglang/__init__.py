"""SGLang integration: kvplug stores as a HiCache storage backend (:mod:`.storage`) and the SGLang plugin.

``register()`` is the ``sglang.srt.plugins`` entry point. SGLang runs it in every process (idempotent): it
checks the SGLang version and hooks ``ServerArgs.check_server_args`` so a bad kvplug backend configuration
fails at start-up in the launching process, with a message naming the problem, instead of in a scheduler
subprocess after the model has loaded.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from typing import Any

from kvplug.errors import ConfigError

log = logging.getLogger("kvplug.sglang")
TESTED_SGLANG = ("0.5.23",)
STORAGE_MODULE = "kvplug.integrations.sglang.storage"
STORAGE_CLASS = "KVPlugHiCacheStorage"
ALLOW_UNTESTED_ENV = "KVPLUG_SGLANG_ALLOW_UNTESTED"
_registered = False


def sglang_version() -> str | None:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_version() -> str:
    """The installed SGLang version; a :class:`ConfigError` when it is not one kvplug was tested with.

    The HiCache storage interface changes between SGLang releases; set ``KVPLUG_SGLANG_ALLOW_UNTESTED=1`` to
    run on another version anyway (a warning is logged).
    """
    v = sglang_version()
    if v is None:
        raise ConfigError("kvplug SGLang integration: sglang is not installed (pip install 'kvplug[sglang]')")
    if v.split("+")[0] in TESTED_SGLANG:
        return v
    msg = (
        f"kvplug's HiCache backend was tested with SGLang {', '.join(TESTED_SGLANG)}; found {v}. "
        f"Install sglang=={TESTED_SGLANG[-1]}, or set {ALLOW_UNTESTED_ENV}=1 to try this version"
    )
    if os.environ.get(ALLOW_UNTESTED_ENV, "").lower() in ("1", "true", "yes"):
        log.warning("%s (continuing: %s is set)", msg, ALLOW_UNTESTED_ENV)
        return v
    raise ConfigError(msg)


def validate_server_args(args: Any) -> None:
    """Check a ``ServerArgs`` that routes HiCache storage to kvplug: extra config keys, store URL, codec."""
    if getattr(args, "hicache_storage_backend", None) != "dynamic":
        return
    raw = getattr(args, "hicache_storage_backend_extra_config", None)
    if not raw:
        return
    if isinstance(raw, str) and STORAGE_MODULE not in raw and not raw.startswith("@"):
        return  # another dynamic backend: not ours to judge
    try:
        extra = _load_extra_config(raw)
    except (OSError, ValueError, TypeError) as e:
        if isinstance(raw, str) and STORAGE_MODULE in raw:
            raise ConfigError(f"--hicache-storage-backend-extra-config: cannot read it: {e}") from None
        return  # SGLang reports its own parse errors
    if extra.get("module_path") != STORAGE_MODULE:
        return
    if extra.get("class_name") != STORAGE_CLASS:
        raise ConfigError(f"--hicache-storage-backend-extra-config: class_name must be {STORAGE_CLASS!r} for kvplug")
    from kvplug.connectors import open_store
    from kvplug.integrations.sglang.storage import parse_extra_config

    settings = parse_extra_config(extra)
    open_store(settings["store"]).close()  # URL syntax and options; does not need the server to be up


def _load_extra_config(raw: Any) -> dict[str, Any]:
    """The extra config as SGLang reads it: inline JSON, or ``@file`` (.json, .yaml/.yml, .toml)."""
    if not isinstance(raw, str):
        return dict(raw)
    if not raw.startswith("@"):
        return dict(json.loads(raw))
    path = raw[1:]
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        with open(path) as f:
            return dict(json.load(f))
    if ext in (".yaml", ".yml"):
        import yaml

        with open(path) as f:
            return dict(yaml.safe_load(f) or {})
    if ext == ".toml":
        import tomllib

        with open(path, "rb") as f:
            return dict(tomllib.load(f))
    raise ValueError(f"unsupported config file {path}")


def _check_server_args_hook(*args: Any, **kwargs: Any) -> None:
    validate_server_args(args[0] if args else kwargs.get("self"))


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: version check and the start-up configuration check."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        check_version()
    except ConfigError as e:
        # Not raised here: this runs in every SGLang process, also when kvplug's backend is not in use. A server
        # that does configure the backend fails at start-up with the same message (the backend checks again).
        log.error("kvplug: %s", e)
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.check_server_args", _check_server_args_hook, HookType.BEFORE
    )
    log.debug("kvplug: SGLang plugin registered")
