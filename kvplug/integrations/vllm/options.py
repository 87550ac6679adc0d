"""Where an engine-wide kvplug feature setting is read from, shared by sparse attention and eviction: vLLM's
``additional_config``, the kvplug connector's ``kv_connector_extra_config`` or an environment variable (first found
wins), as an object, its JSON text or a bare method name."""

from __future__ import annotations

import json
import os
from typing import Any

from kvplug.errors import ConfigError


def engine_setting(vllm_config: Any, config_key: str, connector_key: str, env_var: str) -> tuple[Any, str] | None:
    """``(raw setting, where it came from)`` or ``None`` when the engine has none."""
    extra = getattr(vllm_config, "additional_config", None)
    if isinstance(extra, dict) and extra.get(config_key) is not None:
        return extra[config_key], f"additional_config.{config_key}"
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    conn = getattr(ktc, "kv_connector_extra_config", None) or {}
    if ktc is not None and conn.get(connector_key) is not None:
        return conn[connector_key], f"kv_connector_extra_config.{connector_key}"
    env = os.environ.get(env_var, "").strip()
    if env and env.lower() not in ("0", "off", "false", "none"):
        return env, env_var
    return None


def setting_object(raw: Any, source: str, example: str) -> dict[str, Any]:
    """A setting as a new dict: JSON text is parsed, a bare name becomes ``{"method": name}``."""
    if isinstance(raw, str):
        text = raw.strip()
        try:
            raw = json.loads(text) if text.startswith("{") else {"method": text}
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected an object like {example} or a method name, got {raw!r}")
    return dict(raw)


def request_option(state: Any, extra_key: str, request_key: str) -> Any:
    """A request's own setting for a feature: ``SamplingParams.extra_args[extra_key]`` (HTTP: ``vllm_xargs``), else
    ``kv_transfer_params[request_key]``; ``None`` when the request gives none. ``state`` is the worker's
    ``CachedRequestState``."""
    from kvplug.integrations.vllm._compat import request_extra_args

    extra = request_extra_args(state)
    opt = extra.get(extra_key)
    if opt is None:
        opt = (extra.get("kv_transfer_params") or {}).get(request_key)
    return opt
