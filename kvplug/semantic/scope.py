"""Request analysis: the text to embed, the scope an answer may be shared within, and the bypass rules.

The **query** is the prompt (``/v1/completions``, a single string) or the last user message (chat).

The **scope** is a sha256 over everything else that can change the answer or who may see it:

- the endpoint and the ``model``;
- the tenant: the ``x-kvplug-tenant`` header (name configurable) *and* a sha256 of the ``Authorization`` /
  ``x-api-key`` header, so neither a tenant nor an API key ever sees another's entries;
- the system prompt (every ``system``/``developer`` message);
- the conversation before the last user message (every other earlier message: role, content, name, tool calls).
  The same question asked in two different conversations does not share an answer: a follow-up like "and in
  Python?" means something else in each. The cost is fewer hits for multi-turn chats;
- every other request field (``max_tokens``, ``stop``, ``response_format``, ``seed``, ``top_p``...), except
  ``stream``, ``stream_options``, ``user``, ``request_id``, ``priority``, ``metadata``, ``store`` and ``cache``,
  with ``temperature`` replaced by its effective value.

**Bypass** (forward, never cache): ``"cache": false`` (the field is removed before forwarding, whatever its value),
temperature above ``max_temperature`` (a missing temperature counts as ``default_temperature``, the OpenAI default
1.0), ``n``/``best_of`` > 1, tools or functions, logprobs, ``echo``, a non-text or multi-prompt request, or a
conversation whose last message is not from the user. The last four groups are configurable in
:class:`kvplug.semantic.config.SemanticCacheConfig`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvplug.semantic.config import SemanticCacheConfig

SCOPE_VERSION = 1
_NOT_IN_SCOPE = {"messages", "prompt", "model", "stream", "stream_options", "cache", "user", "request_id"}
_NOT_IN_SCOPE |= {"priority", "metadata", "store"}
_TOOL_FIELDS = ("tools", "functions", "tool_choice", "function_call")


@dataclass
class RequestInfo:
    endpoint: str  # "chat" or "completions"
    body: dict[str, Any]  # what goes upstream ("cache" removed)
    stream: bool
    include_usage: bool
    model: str
    query: str = ""
    scope: str = ""
    bypass: str | None = None  # reason, or None when the request may be served from / stored in the cache
    body_changed: bool = False  # the body must be re-serialised before forwarding


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _text(content: Any) -> str | None:
    """Text of a message content (a string, or a list of text parts); None if it holds anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                return None
            parts.append(p["text"])
        return "\n".join(parts)
    return None


def _is_set(value: Any) -> bool:
    return value not in (None, False, [], {}, "", 0) and value != "none"


def tenant_of(headers: Mapping[str, str], tenant_header: str) -> dict[str, str]:
    auth = headers.get("authorization") or headers.get("Authorization") or ""
    api_key = headers.get("x-api-key") or ""
    return {
        "tenant": headers.get(tenant_header, ""),
        "auth": hashlib.sha256(f"{auth}\x00{api_key}".encode()).hexdigest() if (auth or api_key) else "",
    }


def analyze(body: dict[str, Any], headers: Mapping[str, str], endpoint: str, cfg: SemanticCacheConfig) -> RequestInfo:
    """Classify a parsed request body. Never raises on odd input: odd requests bypass the cache."""
    fwd = dict(body)
    changed = "cache" in fwd
    opt = fwd.pop("cache", True)
    stream = fwd.get("stream") is True
    so = fwd.get("stream_options")
    info = RequestInfo(
        endpoint=endpoint,
        body=fwd,
        stream=stream,
        include_usage=stream and isinstance(so, dict) and so.get("include_usage") is True,
        model=str(fwd.get("model", "")),
        body_changed=changed,
    )
    if opt is False or opt in ("false", 0, None):
        info.bypass = "client_opt_out"
        return info
    temp = fwd.get("temperature")
    temp = cfg.default_temperature if temp is None else temp
    if isinstance(temp, bool) or not isinstance(temp, int | float):
        info.bypass = "bad_request"
        return info
    if temp > cfg.max_temperature:
        info.bypass = "temperature"
        return info
    for name in ("n", "best_of"):
        v = fwd.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v > 1):
            if not cfg.cache_multiple_choices or not isinstance(v, int):
                info.bypass = "n"
                return info
    if any(_is_set(fwd.get(f)) for f in _TOOL_FIELDS) and not cfg.cache_tools:
        info.bypass = "tools"
        return info
    wants_logprobs = any(_is_set(fwd.get(f)) for f in ("logprobs", "top_logprobs", "prompt_logprobs"))
    if endpoint == "completions" and fwd.get("logprobs") == 0:
        wants_logprobs = True  # logprobs: 0 still returns the sampled tokens' logprobs
    if wants_logprobs and not cfg.cache_logprobs:
        info.bypass = "logprobs"
        return info

    system: list[str] = []
    history: list[Any] = []
    if endpoint == "chat":
        msgs = fwd.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            info.bypass = "unsupported_messages"
            return info
        last = msgs[-1]
        query = _text(last.get("content"))
        if last.get("role") != "user" or query is None:
            info.bypass = "unsupported_messages"
            return info
        for m in msgs[:-1]:
            if m.get("role") in ("system", "developer"):
                text = _text(m.get("content"))
                if text is None:
                    info.bypass = "unsupported_messages"
                    return info
                system.append(text)
            else:
                history.append({k: m.get(k) for k in ("role", "content", "name", "tool_calls", "tool_call_id")})
        if last.get("name"):
            history.append({"last_user_name": last.get("name")})
    else:
        prompt = fwd.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            info.bypass = "unsupported_prompt"
            return info
        if fwd.get("echo") or fwd.get("suffix"):
            info.bypass = "echo"
            return info
        query = prompt
    if not query.strip():
        info.bypass = "empty_query"
        return info
    params = {k: v for k, v in fwd.items() if k not in _NOT_IN_SCOPE}
    params["temperature"] = float(temp)
    info.query = query
    info.scope = _sha(
        {
            "v": SCOPE_VERSION,
            "endpoint": endpoint,
            "model": info.model,
            **tenant_of(headers, cfg.tenant_header),
            "system": system,
            "history": history,
            "params": params,
        }
    )
    return info
