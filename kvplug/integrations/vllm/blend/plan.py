"""Blend configuration (engine flags and per-request overrides) and the plan the scheduler sends the worker.

Engine-wide, in ``kv_connector_extra_config``::

    "blend": {"strategy": "cacheblend", "params": {"recompute_ratio": 0.3},
              "separator": " # # ", "messages": false, "min_tokens": 32, "save": true}

``"blend": true`` takes the defaults. A request overrides with ``kv_transfer_params = {"blend": {...}}`` (the
same keys, plus ``segments``: explicit token ranges) or turns it off with ``{"blend": false}``. A request without
an engine-wide blend config blends only when it says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from kvplug.errors import ConfigError

_KEYS = {"strategy", "params", "separator", "messages", "min_tokens", "save", "segments", "warm", "unsupported"}


@dataclass(frozen=True)
class BlendConfig:
    strategy: str = "cacheblend"
    params: dict[str, Any] = field(default_factory=dict)
    separator: str | None = None
    messages: bool = False
    min_tokens: int = 32
    save: bool = True  # store segments that were not found (computed in place) for next time
    segments: tuple[tuple[int, int], ...] | None = None  # explicit ranges (per request)
    warm: bool = False  # per request: the whole prompt is one document to store (computed in isolation)
    unsupported: str = "error"  # a model kvplug cannot blend: "error" stops the engine at start-up, "fallback" runs it

    @classmethod
    def parse(cls, value: Any, base: BlendConfig | None = None, where: str = "blend") -> BlendConfig | None:
        """``True``/``False``/a mapping -> a config (None: off). ``base`` supplies what the mapping leaves out."""
        if value is None:
            return base
        if value is False:
            return None
        if value is True:
            return base or cls()
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be true, false or an object, got {value!r}")
        unknown = set(value) - _KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_KEYS)}")
        out = base or cls()
        kw: dict[str, Any] = {}
        if "strategy" in value:
            if not isinstance(value["strategy"], str):
                raise ConfigError(f"{where}.strategy must be a strategy name")
            kw["strategy"] = value["strategy"]
            kw["params"] = {}
        if "params" in value:
            if not isinstance(value["params"], dict):
                raise ConfigError(f"{where}.params must be an object")
            kw["params"] = {**(kw.get("params", out.params)), **value["params"]}
        if "separator" in value:
            if value["separator"] is not None and not (isinstance(value["separator"], str) and value["separator"]):
                raise ConfigError(f"{where}.separator must be a non-empty string")
            kw["separator"] = value["separator"]
        for name in ("messages", "save", "warm"):
            if name in value:
                if not isinstance(value[name], bool):
                    raise ConfigError(f"{where}.{name} must be true or false")
                kw[name] = value[name]
        if "min_tokens" in value:
            n = value["min_tokens"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"{where}.min_tokens must be a positive integer")
            kw["min_tokens"] = value["min_tokens"]
        if "unsupported" in value:
            if value["unsupported"] not in ("error", "fallback"):
                raise ConfigError(f"{where}.unsupported must be 'error' or 'fallback'")
            kw["unsupported"] = value["unsupported"]
        if "segments" in value:
            kw["segments"] = tuple(tuple(x) for x in value["segments"]) if value["segments"] is not None else None
        cfg = replace(out, **kw)
        cfg.build_strategy()  # an unknown strategy or a bad parameter is an error now, not at the first request
        return cfg

    def build_strategy(self) -> Any:
        from kvplug.methods.blend import get_strategy

        s = get_strategy(self.strategy, **self.params)
        if getattr(s, "modifies_attention", False):
            raise ConfigError(
                f"blend strategy {self.strategy!r} changes attention itself; kvplug's vLLM path does not run it "
                "(it runs on the HF reference path: kvplug.integrations.hf.blend)"
            )
        return s


@dataclass
class SegmentRef:
    """One segment of a blend request: its token span in the prompt and its store key."""

    start: int
    end: int
    key: str
    found: bool


@dataclass
class BlendSpec:
    """Scheduler -> worker: one blend request of this step."""

    req_id: str
    prompt: list[int]
    salt: str
    segments: list[SegmentRef]
    strategy: str
    params: dict[str, Any]
    save: bool
    block_ids: list[int]
    warm: bool = False
