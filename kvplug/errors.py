"""Exception types. Every error names the problem; cache-side doubts become misses, not exceptions."""


class KVPlugError(Exception):
    """Base class for kvplug errors."""


class ConfigError(KVPlugError, ValueError):
    """Bad configuration: an unknown key, a bad URL, a value out of range."""


class PayloadError(KVPlugError, ValueError):
    """A stored payload that cannot be trusted (bad magic, version, checksum, shape, key, codec).

    ``kind`` is a short label used in metrics (``checksum``, ``truncated``, ``version`` ...).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class StoreError(KVPlugError):
    """A store backend failed (connection lost, timeout, I/O error). Callers see misses instead."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
