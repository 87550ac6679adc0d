"""Credentials never reach a log line, an error message or the terminal.

:func:`redact` rewrites every URL-like credential in a text: the password part of ``scheme://user:password@host``
(and a bare ``scheme://:password@host``) and the values of secret-looking query options (``password``,
``sentinel_password``, ``secret``, ``token``, ``key``...). Apply it to anything that may hold a store URL.
"""

from __future__ import annotations

import re

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^\s/?#]*)@")
_BARE_USER = re.compile(r"(?P<scheme>(?:rediss?|redis\+\w+|unix)://)(?P<user>[^:/@\s]+)@")
_SECRET_OPT = re.compile(
    r"(?P<k>(?:^|[?&;\s,{\"'])[\"']?(?:[a-z_]*password|secret|token|api_key|auth)[\"']?\s*[=:]\s*[\"']?)"
    r"(?P<v>[^&\s\"',}]+)",
    re.IGNORECASE,
)


def redact(text: object) -> str:
    """``text`` with credentials masked (see the module docstring)."""
    s = str(text)
    s = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", s)
    # redis://token@host: redis-py treats a lone user part as the password
    s = _BARE_USER.sub(lambda m: f"{m['scheme']}{MASK}@", s)
    return _SECRET_OPT.sub(lambda m: f"{m['k']}{MASK}", s)


def redact_all(urls: list[str] | str) -> list[str] | str:
    return redact(urls) if isinstance(urls, str) else [redact(u) for u in urls]
