"""OpenAI wire formats: what is cacheable in an upstream answer, and cached answers as JSON or SSE.

Cacheable: HTTP 200, a JSON object with a non-empty ``choices`` list in which every choice finished with ``stop``
or ``length`` (``tool_calls`` too when tools are cached) and holds non-empty text (or tool calls). A streamed
answer is cacheable when its events rebuild such an answer, it ended with ``data: [DONE]`` and carried no error,
tool-call or logprobs deltas (those are forwarded, not stored).

A hit gets a fresh ``id`` (``chatcmpl-kvplug-...`` / ``cmpl-kvplug-...``) and ``created``, the stored choices
and ``usage`` with zero tokens (nothing was computed). A streamed hit is a valid SSE stream: a role chunk, one
content chunk per choice, a finish chunk, a usage chunk when ``stream_options.include_usage`` is set, and
``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

FINISH_OK = ("stop", "length")
_ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def _choice_ok(endpoint: str, choice: Any, finish_ok: tuple[str, ...]) -> bool:
    if not isinstance(choice, dict) or choice.get("finish_reason") not in finish_ok:
        return False
    if endpoint == "chat":
        msg = choice.get("message")
        if not isinstance(msg, dict):
            return False
        content = msg.get("content")
        return (isinstance(content, str) and content.strip() != "") or bool(msg.get("tool_calls"))
    return isinstance(choice.get("text"), str) and choice["text"].strip() != ""


def cacheable_choices(endpoint: str, status: int, payload: Any, allow_tool_calls: bool = False) -> list[dict] | None:
    """The choices to store from an upstream JSON answer, or None when it must not be cached."""
    if status != 200 or not isinstance(payload, dict) or "error" in payload:
        return None
    choices = payload.get("choices")
    finish_ok = (*FINISH_OK, "tool_calls") if allow_tool_calls else FINISH_OK
    if not isinstance(choices, list) or not choices or not all(_choice_ok(endpoint, c, finish_ok) for c in choices):
        return None
    out = []
    for c in sorted(choices, key=lambda c: c.get("index", 0)):
        c = {k: v for k, v in c.items() if k != "index"}
        if endpoint == "chat" and not allow_tool_calls:
            c["message"] = {k: v for k, v in c["message"].items() if k != "tool_calls" or v}
        out.append(c)
    return out


def _now() -> int:
    return int(time.time())


def hit_body(endpoint: str, choices: list[dict], model: str) -> dict[str, Any]:
    """A complete (non-streamed) OpenAI response for a hit."""
    chat = endpoint == "chat"
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-kvplug-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": _now(),
        "model": model,
        "choices": [{"index": i, **c} for i, c in enumerate(choices)],
        "usage": dict(_ZERO_USAGE),
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def hit_events(endpoint: str, choices: list[dict], model: str, include_usage: bool = False) -> list[bytes]:
    """A streamed hit as SSE events, ending with ``data: [DONE]``."""
    chat = endpoint == "chat"
    base = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-kvplug-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": _now(),
        "model": model,
    }
    events: list[bytes] = []

    def chunk(i: int, payload: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse({**base, "choices": [{"index": i, **payload, "logprobs": None, "finish_reason": finish}]})

    for i, c in enumerate(choices):
        if chat:
            msg = c.get("message") or {}
            events.append(chunk(i, {"delta": {"role": msg.get("role", "assistant"), "content": ""}}))
            delta: dict[str, Any] = {}
            if msg.get("content"):
                delta["content"] = msg["content"]
            if msg.get("tool_calls"):
                delta["tool_calls"] = [{"index": j, **tc} for j, tc in enumerate(msg["tool_calls"])]
            if delta:
                events.append(chunk(i, {"delta": delta}))
            events.append(chunk(i, {"delta": {}}, c.get("finish_reason", "stop")))
        else:
            events.append(chunk(i, {"text": c.get("text", "")}))
            events.append(chunk(i, {"text": ""}, c.get("finish_reason", "stop")))
    if include_usage:
        events.append(_sse({**base, "choices": [], "usage": dict(_ZERO_USAGE)}))
    events.append(DONE)
    return events


class StreamAccumulator:
    """Rebuilds the choices of a streamed upstream answer from its SSE bytes, as they are forwarded."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._buf = b""
        self._choices: dict[int, dict[str, Any]] = {}
        self.model = ""
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.unsupported = False  # error event, tool calls, logprobs or an unparsable event

    def feed(self, data: bytes) -> None:
        self._buf += data
        while True:
            cut = min((i for i in (self._buf.find(b"\n\n"), self._buf.find(b"\r\n\r\n")) if i >= 0), default=-1)
            if cut < 0:
                return
            event, self._buf = self._buf[:cut], self._buf[cut:].lstrip(b"\r\n")
            self._event(event)

    def _event(self, event: bytes) -> None:
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                self.unsupported = True
                continue
            self._chunk(obj)

    def _chunk(self, obj: Any) -> None:
        if not isinstance(obj, dict) or "error" in obj:
            self.unsupported = True
            return
        self.model = obj.get("model") or self.model
        if obj.get("usage"):
            self.usage = obj["usage"]
        for c in obj.get("choices") or []:
            if not isinstance(c, dict) or not isinstance(c.get("index", 0), int):
                self.unsupported = True
                continue
            if c.get("logprobs"):
                self.unsupported = True
            acc = self._choices.setdefault(c.get("index", 0), {"text": "", "role": "assistant", "finish": None})
            if self.endpoint == "chat":
                delta = c.get("delta") or {}
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.unsupported = True
                if delta.get("role"):
                    acc["role"] = delta["role"]
                if isinstance(delta.get("content"), str):
                    acc["text"] += delta["content"]
                if any(v for k, v in delta.items() if k not in ("role", "content", "tool_calls")):
                    self.unsupported = True  # e.g. reasoning_content: not rebuilt, so not stored
            elif isinstance(c.get("text"), str):
                acc["text"] += c["text"]
            if c.get("finish_reason"):
                acc["finish"] = c["finish_reason"]

    def choices(self) -> list[dict] | None:
        """The cacheable choices, or None (stream unfinished, unsupported or not a clean stop/length)."""
        if not self.done or self.unsupported or not self._choices:
            return None
        out = []
        for i in sorted(self._choices):
            acc = self._choices[i]
            if acc["finish"] not in FINISH_OK or not acc["text"].strip():
                return None
            if self.endpoint == "chat":
                out.append({"message": {"role": acc["role"], "content": acc["text"]}, "finish_reason": acc["finish"]})
            else:
                out.append({"text": acc["text"], "finish_reason": acc["finish"]})
        return out
