"""Settings of the semantic-cache proxy: a dataclass, filled from defaults < environment < CLI flags.

Environment variables are ``KVPLUG_SEMANTIC_<FIELD>`` (for example ``KVPLUG_SEMANTIC_UPSTREAM``); an unknown
``KVPLUG_SEMANTIC_*`` name is an error. Per-category behaviour lives in the policy file (:mod:`.policy`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlparse

from kvplug.config import parse_bool
from kvplug.errors import ConfigError

ENV_PREFIX = "KVPLUG_SEMANTIC_"
SPECULATIVE_MODES = ("off", "auto", "on")


@dataclass
class SemanticCacheConfig:
    """Proxy settings. See docs/semantic-cache.md for each field."""

    upstream: str = "http://127.0.0.1:8000"  # the OpenAI-compatible server (vLLM) the proxy forwards to
    redis_url: str = "redis://127.0.0.1:6379/0"
    policy: str | None = None  # YAML policy file; None: the built-in policy
    host: str = "127.0.0.1"
    port: int = 8100
    key_prefix: str = "kvplug:sc:"
    embedder: str = "minilm"  # minilm | hash | st:<model dir> | <module>:<factory>
    tenant_header: str = "x-kvplug-tenant"
    # Bypass rules: requests outside these limits are forwarded and never cached.
    max_temperature: float = 0.0  # cache only requests with temperature <= this
    default_temperature: float = 1.0  # the temperature assumed when a request has none (the OpenAI default)
    cache_tools: bool = False  # cache requests with tools/functions
    cache_logprobs: bool = False  # cache requests asking for logprobs
    cache_multiple_choices: bool = False  # cache requests with n > 1 (or best_of > 1)
    # off: look up, then forward a miss. on: forward at once and race the lookup (a hit that wins cancels the
    # upstream request; a miss pays no lookup latency). auto: "on" while the load-adaptive pressure is 0 (the
    # upstream is idle enough that a cancelled request costs little), "off" under load.
    speculative: str = "auto"
    # a hit found after the upstream's first stream event still wins if found within this grace (the rest of the
    # generation is cancelled); the upstream's first event waits at most this long
    speculative_grace_s: float = 0.05
    # per Redis operation on the request path: the larger of this and 8x the recent operation latency (EWMA),
    # at most redis_timeout_max_s; slower counts as Redis down (pass-through)
    redis_timeout_s: float = 0.25
    redis_timeout_max_s: float = 2.0
    redis_backoff_max_s: float = 5.0  # circuit breaker: longest pause before Redis is tried again
    upstream_timeout_s: float = 600.0  # read timeout towards the upstream
    sweep_interval_s: float = 30.0  # reconcile the index with Redis (expired/evicted/peer entries); 0: never
    embed_cache_size: int = 4096  # exact-text embedding LRU entries (repeated prompts skip the model)
    embed_cache_bytes: int = 16 << 20  # and its bytes (vectors + 512 B per entry; texts are not kept)
    embed_max_batch: int = 32  # concurrent queries embedded in one batch
    embed_threads: int = 1  # torch intra-op threads of the embedding worker thread; 0: torch's default
    # Size bounds (hostile input). A larger request body is refused with 413; a body over max_parse_bytes is
    # forwarded without being parsed (bypass "too_large"); a query (last user message / prompt) over
    # max_query_chars, or longer than the embedder's window, is forwarded and never embedded or stored ("too_long").
    max_request_bytes: int = 32 << 20
    max_parse_bytes: int = 1 << 20
    max_query_chars: int = 4096
    candidates: int = 8  # nearest entries per category index checked (threshold, verification) per lookup
    threshold: float | None = None  # one similarity threshold for every category (overrides the policy's)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("upstream", "redis_url"):
            u = urlparse(getattr(self, name))
            if not u.scheme or not (u.netloc or u.path):
                raise ConfigError(f"{name} must be a URL, got {getattr(self, name)!r}")
        if urlparse(self.upstream).scheme not in ("http", "https"):
            raise ConfigError(f"upstream must be an http(s) URL, got {self.upstream!r}")
        if not (0 < int(self.port) < 65536):
            raise ConfigError(f"port must be 1..65535, got {self.port}")
        if not self.key_prefix:
            raise ConfigError("key_prefix must not be empty")
        if self.speculative not in SPECULATIVE_MODES:
            raise ConfigError(f"speculative must be one of {list(SPECULATIVE_MODES)}, got {self.speculative!r}")
        for name in ("redis_timeout_s", "redis_timeout_max_s", "redis_backoff_max_s", "upstream_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.redis_timeout_max_s < self.redis_timeout_s:
            raise ConfigError("redis_timeout_max_s must be >= redis_timeout_s")
        if self.speculative_grace_s < 0:
            raise ConfigError(f"speculative_grace_s must be >= 0, got {self.speculative_grace_s}")
        for name in ("max_request_bytes", "max_parse_bytes", "max_query_chars", "candidates"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_parse_bytes > self.max_request_bytes:
            raise ConfigError("max_parse_bytes must be <= max_request_bytes")
        if self.embed_cache_bytes < 0:
            raise ConfigError(f"embed_cache_bytes must be >= 0, got {self.embed_cache_bytes}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.sweep_interval_s < 0 or self.embed_cache_size < 0 or self.embed_max_batch < 1 or self.embed_threads < 0:
            raise ConfigError("sweep_interval_s, embed_cache_size, embed_threads must be >= 0, embed_max_batch >= 1")
        if not self.tenant_header:
            raise ConfigError("tenant_header must not be empty")

    @classmethod
    def known_keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def _coerce(cls, data: dict[str, Any], source: str) -> dict[str, Any]:
        types = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(types)}")
        out: dict[str, Any] = {}
        for key, value in data.items():
            if value is None or not isinstance(value, str):
                out[key] = value
                continue
            t = str(types[key]).replace(" | None", "")
            if value.strip().lower() in ("", "none", "null") and "None" in str(types[key]):
                out[key] = None
                continue
            try:
                if t == "bool":
                    out[key] = parse_bool(value)
                elif t == "int":
                    out[key] = int(value)
                elif t == "float":
                    out[key] = float(value)
                else:
                    out[key] = value
            except ValueError:
                raise ConfigError(f"{source}: {key} must be a {t}, got {value!r}") from None
        return out

    @classmethod
    def load(
        cls, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
    ) -> SemanticCacheConfig:
        """Defaults < ``KVPLUG_SEMANTIC_*`` environment < ``overrides`` (None values in overrides are ignored)."""
        env = os.environ if environ is None else environ
        from_env = {k[len(ENV_PREFIX) :].lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        merged = cls._coerce(from_env, f"environment ({ENV_PREFIX}*)")
        merged.update(cls._coerce({k: v for k, v in (overrides or {}).items() if v is not None}, "config"))
        return cls(**merged)
