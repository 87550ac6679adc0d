"""Stores: opaque framed bytes by key. ``open_store(url)`` builds one from a URL.

=========================================  ====================================================
``memory://?max_bytes=1GiB``                in-process LRU
``file:///var/cache/kvplug?max_bytes=50GiB`` sharded directory (``fsync=always|never``)
``redis://[user:pass@]host:6379/0?ttl=3600`` one Redis (``rediss://`` for TLS, ``unix:///path``)
``redis+sentinel://h1:26379,h2:26379/name/0`` master found through Sentinel
``redis+cluster://h1:7000,h2:7001``          Redis Cluster
=========================================  ====================================================

Several URLs (a list, or one string joined with ``|``) make a tiered store, first tier first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from kvplug.config import parse_bool, parse_size
from kvplug.connectors.base import ChunkStore, StoreStats
from kvplug.connectors.disk import DiskStore
from kvplug.connectors.memory import MemoryStore
from kvplug.connectors.redis_store import RedisStore
from kvplug.connectors.tiered import TieredStore
from kvplug.errors import ConfigError
from kvplug.redact import redact

_STORE_OPTS: dict[str, Callable[[str], Any]] = {"name": str}
_MEMORY_OPTS = {**_STORE_OPTS, "max_bytes": parse_size}
_DISK_OPTS = {**_STORE_OPTS, "max_bytes": parse_size, "fsync": str}
_REDIS_OPTS: dict[str, Callable[[str], Any]] = {
    **_STORE_OPTS,
    "op_timeout": float,
    "ttl": float,
    "prefix": str,
    "max_value_bytes": parse_size,
    "batch_size": int,
    "pipeline_bytes": parse_size,
    "down_backoff_max": float,
}
_REDIS_CLIENT_OPTS: dict[str, Callable[[str], Any]] = {
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "retries": int,
    "max_connections": int,
    "health_check_interval": int,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_cert_reqs": str,
    "ssl_check_hostname": parse_bool,
    "sentinel_password": str,
}
REDIS_DEFAULTS = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0, "retries": 1, "max_connections": 64}


def _options(url: str, query: str, allowed: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k not in allowed:
            raise ConfigError(f"store URL {redact(url)!r}: unknown option {k!r}; known: {sorted(allowed)}")
        try:
            out[k] = allowed[k](v)
        except (ValueError, ConfigError) as e:
            raise ConfigError(f"store URL {redact(url)!r}: bad value for {k!r}: {redact(e)}") from None
    return out


def _hosts(url: str, netloc: str, default_port: int) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", str(default_port))
        if not host or not port.isdigit():
            raise ConfigError(f"store URL {redact(url)!r}: bad host {part!r} (want host:port)")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def _credentials(netloc: str) -> dict[str, str]:
    if "@" not in netloc:
        return {}
    user, _, password = netloc.rsplit("@", 1)[0].partition(":")
    return {k: unquote(v) for k, v in (("username", user), ("password", password)) if v}


def _redis(url: str, scheme: str, parts: Any, all_opts: dict[str, Any]) -> RedisStore:
    import redis
    from redis.cluster import ClusterNode
    from redis.sentinel import Sentinel

    from kvplug.connectors.redis_store import retry_policy

    store_opts = {k: v for k, v in all_opts.items() if k in _REDIS_OPTS}
    client_opts = {**REDIS_DEFAULTS, **{k: v for k, v in all_opts.items() if k in _REDIS_CLIENT_OPTS}}
    retry = retry_policy(client_opts.pop("retries"))
    sentinel_password = client_opts.pop("sentinel_password", None)
    common = {**client_opts, "retry": retry}  # redis-py retries timeouts and connection errors
    if scheme in ("redis", "rediss", "unix"):
        base = url.split("?", 1)[0]
        client: Any = redis.Redis.from_url(base, **common)
    elif scheme == "redis+cluster":
        nodes = [ClusterNode(h, p) for h, p in _hosts(url, parts.netloc, 6379)]
        common.pop("max_connections")
        client = redis.RedisCluster(startup_nodes=nodes, **_credentials(parts.netloc), **common)
    elif scheme == "redis+sentinel":
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ConfigError(f"store URL {redact(url)!r}: sentinel URLs need a service name: .../<name>[/<db>]")
        db = int(path[1]) if len(path) > 1 else 0
        sentinel = Sentinel(
            _hosts(url, parts.netloc, 26379),
            sentinel_kwargs={"password": sentinel_password} if sentinel_password else None,
            **{k: v for k, v in common.items() if k != "max_connections"},
        )
        client = sentinel.master_for(path[0], db=db, **_credentials(parts.netloc))
    else:  # pragma: no cover - guarded by open_store
        raise ConfigError(f"unsupported scheme {scheme}")
    return RedisStore(client, **store_opts)


def open_store(url: str | Sequence[str], queue_size: int = 256, promote: bool = True) -> ChunkStore:
    """Build a store from a URL, or a tiered store from several (a list or ``a|b|c``)."""
    urls = [u.strip() for u in url.split("|") if u.strip()] if isinstance(url, str) else list(url)
    if not urls:
        raise ConfigError("no store URL given")
    if len(urls) > 1:
        return TieredStore([open_store(u) for u in urls], queue_size=queue_size, promote=promote)
    u = urls[0]
    parts = urlsplit(u)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return MemoryStore(**_options(u, parts.query, _MEMORY_OPTS))
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"store URL {redact(u)!r}: file URLs take an absolute path: file:///path")
        if not parts.path:
            raise ConfigError(f"store URL {redact(u)!r}: missing directory path")
        return DiskStore(unquote(parts.path), **_options(u, parts.query, _DISK_OPTS))
    if scheme in ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel"):
        return _redis(u, scheme, parts, _options(u, parts.query, {**_REDIS_OPTS, **_REDIS_CLIENT_OPTS}))
    raise ConfigError(
        f"store URL {redact(u)!r}: unknown scheme {scheme!r}; use memory://, file://, redis://, "
        "rediss://, unix://, redis+sentinel:// or redis+cluster://"
    )


__all__ = ["ChunkStore", "DiskStore", "MemoryStore", "RedisStore", "StoreStats", "TieredStore", "open_store"]
