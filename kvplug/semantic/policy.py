"""The category policy: per-category similarity threshold, TTL, quota and eviction, plus classifier examples.

A policy is a YAML file (or the built-in ``DEFAULT_POLICY``). Every mapping is checked: an unknown key, a value
of the wrong type or out of range raises :class:`kvplug.errors.ConfigError` naming the file and the key. A policy
file replaces the built-in policy as a whole (it is not merged with it); fields left out take the defaults below.
Defaults follow the paper's reference implementation (vLLM Semantic Router): threshold 0.8, TTL 3600 s,
max_entries 1000, eviction fifo, HNSW M=16, ef_construction=200.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from kvplug.config import parse_size, read_yaml
from kvplug.errors import ConfigError

EVICTIONS = ("fifo", "lru", "lfu")
_NAME_RE = re.compile(r"^[a-z0-9_][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class CategoryPolicy:
    """One category. ``min_threshold``/``max_ttl`` bound the load-adaptive policy (default: no change)."""

    name: str
    threshold: float = 0.8
    min_threshold: float | None = None  # None: equal to threshold (never loosened)
    ttl: float = 3600.0
    max_ttl: float | None = None  # None: equal to ttl (never lengthened)
    max_entries: int = 1000
    max_bytes: int | None = None
    eviction: str = "fifo"
    examples: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    description: str = ""

    @property
    def threshold_floor(self) -> float:
        return self.threshold if self.min_threshold is None else self.min_threshold

    @property
    def ttl_ceiling(self) -> float:
        return self.ttl if self.max_ttl is None else self.max_ttl


@dataclass(frozen=True)
class HnswParams:
    """hnswlib parameters of every category index (cosine space)."""

    M: int = 16  # noqa: N815 - the name hnswlib and the papers use
    ef_construction: int = 200
    ef_search: int = 64


@dataclass(frozen=True)
class ClassifierParams:
    """Nearest-centroid classifier: below ``min_similarity`` to every centroid, the default category."""

    min_similarity: float = 0.2


@dataclass(frozen=True)
class AdaptiveParams:
    """Load-adaptive policy: pressure 0..1 from the upstream's latency EWMA and queue length.

    Pressure is the larger of ``(ewma - latency_low_s) / (latency_high_s - latency_low_s)`` and
    ``(waiting - queue_low) / (queue_high - queue_low)``, clipped to 0..1. Each category's effective threshold
    moves from ``threshold`` towards ``min_threshold`` and its TTL from ``ttl`` towards ``max_ttl`` in proportion.
    The latency EWMA decays with ``half_life_s`` when no miss reaches the upstream, so the policy tightens back.
    """

    enabled: bool = True
    latency_low_s: float = 2.0
    latency_high_s: float = 10.0
    queue_low: float = 1.0
    queue_high: float = 16.0
    ewma_alpha: float = 0.2
    half_life_s: float = 30.0
    scrape_interval_s: float = 5.0  # 0: do not scrape the upstream's /metrics
    metrics_url: str | None = None  # default: <upstream>/metrics


@dataclass(frozen=True)
class Policy:
    """A validated policy. ``categories`` keeps file order (the classifier's rules are tried in that order)."""

    categories: dict[str, CategoryPolicy]
    default_category: str = "default"
    hnsw: HnswParams = field(default_factory=HnswParams)
    classifier: ClassifierParams = field(default_factory=ClassifierParams)
    adaptive: AdaptiveParams = field(default_factory=AdaptiveParams)
    source: str = "built-in default policy"

    def category(self, name: str) -> CategoryPolicy:
        return self.categories.get(name) or self.categories[self.default_category]


_CATEGORY_KEYS = {f.name for f in fields(CategoryPolicy)} - {"name"}
_DEFAULTS_KEYS = _CATEGORY_KEYS - {"examples", "keywords", "patterns", "description"}
_TOP_KEYS = {"version", "default_category", "defaults", "categories", "hnsw", "classifier", "adaptive"}

# The built-in policy. Thresholds are cosine similarities of all-MiniLM-L6-v2 embeddings; they were set by running
# bench/semantic.py (see docs/results/semantic.md): dense categories (code, time-sensitive: same template, other
# entity) need a strict threshold, sparse ones (chat) can be loose. Sensitive categories are never loosened.
DEFAULT_POLICY: dict[str, Any] = {
    "version": 1,
    "default_category": "default",
    "defaults": {"threshold": 0.8, "ttl": 3600, "max_entries": 1000, "eviction": "fifo"},
    "hnsw": {"M": 16, "ef_construction": 200, "ef_search": 64},
    "classifier": {"min_similarity": 0.2},
    "adaptive": {
        "enabled": True,
        "latency_low_s": 2.0,
        "latency_high_s": 10.0,
        "queue_low": 1,
        "queue_high": 16,
        "ewma_alpha": 0.2,
        "half_life_s": 30.0,
        "scrape_interval_s": 5.0,
    },
    "categories": {
        "time_sensitive": {
            "description": "weather, prices, scores, news: short TTL",
            "threshold": 0.92,
            "min_threshold": 0.9,
            "ttl": 300,
            "max_ttl": 900,
            "eviction": "fifo",
            "patterns": [
                r"\b(today|tonight|tomorrow|yesterday|right now|currently|this (morning|afternoon|evening|week))\b",
                r"\b(latest|breaking) news\b",
                r"\b(current|live) (price|score|weather|exchange rate|status)\b",
            ],
            "examples": [
                "What is the weather in London today?",
                "What is the current price of Bitcoin?",
                "Who won the football match last night?",
                "What are the latest news headlines?",
                "What is the stock price of Apple right now?",
                "Is the train to Paris delayed this morning?",
            ],
        },
        "code": {
            "description": "programming questions: dense, near-misses differ by one identifier",
            "threshold": 0.9,
            "min_threshold": 0.9,
            "ttl": 604800,
            "max_ttl": 2592000,
            "eviction": "lru",
            "patterns": [
                r"```",
                r"\b\w+\(\)",
                r"\b(traceback|stack trace|segfault|compiler error)\b",
                r"\b(python|javascript|typescript|sql|bash|golang|kotlin|regex|numpy|pandas)\b|c\+\+",
            ],
            "examples": [
                "How do I reverse a list in Python?",
                "Write a JavaScript function that removes duplicates from an array.",
                "What does TypeError: 'NoneType' object is not subscriptable mean?",
                "How do I read a file line by line in Rust?",
                "Explain what this SQL query with a LEFT JOIN does.",
                "How do I sort a dictionary by value in Python?",
                "Write a regular expression that matches an email address.",
                "How can I make an HTTP request in Go?",
            ],
        },
        "health": {
            "description": "medical questions: strict and never loosened",
            "threshold": 0.95,
            "ttl": 86400,
            "examples": [
                "What are the symptoms of diabetes?",
                "Is it safe to take ibuprofen with alcohol?",
                "How much paracetamol can a child take?",
                "What causes high blood pressure?",
            ],
        },
        "finance": {
            "description": "money questions: strict and never loosened",
            "threshold": 0.95,
            "ttl": 3600,
            "examples": [
                "Should I invest in index funds or individual stocks?",
                "How is capital gains tax calculated?",
                "What is a good credit score?",
                "How much should I save for retirement?",
            ],
        },
        "factual": {
            "description": "encyclopedic questions: long TTL",
            "threshold": 0.8,
            "min_threshold": 0.75,
            "ttl": 86400,
            "max_ttl": 604800,
            "eviction": "lfu",
            "examples": [
                "What is the capital of France?",
                "Who wrote Pride and Prejudice?",
                "How tall is Mount Everest?",
                "When did the Second World War end?",
                "What is photosynthesis?",
                "How far is the Moon from the Earth?",
            ],
        },
        "chat": {
            "description": "small talk: sparse, loose threshold",
            "threshold": 0.75,
            "min_threshold": 0.7,
            "ttl": 3600,
            "max_ttl": 14400,
            "examples": [
                "Hi, how are you today?",
                "Tell me a joke.",
                "I'm bored, what should I do?",
                "What's your favourite movie?",
                "Thanks a lot for your help!",
                "Can you cheer me up?",
            ],
        },
        "default": {"description": "anything else", "threshold": 0.85, "min_threshold": 0.8, "max_ttl": 7200},
    },
}


def _check_keys(data: Any, allowed: set[str], where: str, source: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(str(k) for k in set(data) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} in {where}; known keys: {sorted(allowed)}")
    return data


def _num(value: Any, key: str, source: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{source}: {key} must be in {rng}, got {value!r}")
    return float(value)


def _int(value: Any, key: str, source: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{source}: {key} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _strings(value: Any, key: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{source}: {key} must be a list of non-empty strings")
    return tuple(value)


def _category(name: str, raw: dict[str, Any], source: str) -> CategoryPolicy:
    where = f"categories.{name}"
    if not _NAME_RE.match(name):
        raise ConfigError(f"{source}: category name {name!r} must match {_NAME_RE.pattern}")
    kw: dict[str, Any] = {"name": name}
    if "threshold" in raw:
        kw["threshold"] = _num(raw["threshold"], f"{where}.threshold", source, 0.0, 1.0)
    if raw.get("min_threshold") is not None:
        kw["min_threshold"] = _num(raw["min_threshold"], f"{where}.min_threshold", source, 0.0, 1.0)
    if "ttl" in raw:
        kw["ttl"] = _num(raw["ttl"], f"{where}.ttl", source, 0.001)
    if raw.get("max_ttl") is not None:
        kw["max_ttl"] = _num(raw["max_ttl"], f"{where}.max_ttl", source, 0.001)
    if "max_entries" in raw:
        kw["max_entries"] = _int(raw["max_entries"], f"{where}.max_entries", source, 1)
    if raw.get("max_bytes") is not None:
        try:
            kw["max_bytes"] = parse_size(raw["max_bytes"])
        except ConfigError as e:
            raise ConfigError(f"{source}: {where}.max_bytes: {e}") from None
        if kw["max_bytes"] <= 0:
            raise ConfigError(f"{source}: {where}.max_bytes must be > 0")
    if "eviction" in raw:
        if raw["eviction"] not in EVICTIONS:
            raise ConfigError(f"{source}: {where}.eviction must be one of {list(EVICTIONS)}, got {raw['eviction']!r}")
        kw["eviction"] = raw["eviction"]
    for key in ("examples", "keywords", "patterns"):
        kw[key] = _strings(raw.get(key), f"{where}.{key}", source)
    for pat in kw["patterns"]:
        try:
            re.compile(pat)
        except re.error as e:
            raise ConfigError(f"{source}: {where}.patterns: bad regular expression {pat!r}: {e}") from None
    if "description" in raw:
        if not isinstance(raw["description"], str):
            raise ConfigError(f"{source}: {where}.description must be a string")
        kw["description"] = raw["description"]
    cat = CategoryPolicy(**kw)
    if cat.threshold_floor > cat.threshold:
        raise ConfigError(f"{source}: {where}.min_threshold ({cat.threshold_floor}) > threshold ({cat.threshold})")
    if cat.ttl_ceiling < cat.ttl:
        raise ConfigError(f"{source}: {where}.max_ttl ({cat.ttl_ceiling}) < ttl ({cat.ttl})")
    return cat


def _params(cls: type, raw: Any, where: str, source: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    data = _check_keys(raw, set(known), where, source)
    kw: dict[str, Any] = {}
    for key, value in data.items():
        default = known[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {where}.{key} must be true or false, got {value!r}")
            kw[key] = value
        elif key == "metrics_url":
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{source}: {where}.{key} must be a URL string")
            kw[key] = value
        elif isinstance(default, int) and not isinstance(default, bool) and cls is HnswParams:
            kw[key] = _int(value, f"{where}.{key}", source, 2 if key == "M" else 1)
        else:
            hi = 1.0 if key in ("min_similarity", "ewma_alpha") else None
            kw[key] = _num(value, f"{where}.{key}", source, 0.0, hi)
    out = cls(**kw)
    if isinstance(out, AdaptiveParams):
        if out.latency_high_s <= out.latency_low_s:
            raise ConfigError(f"{source}: {where}.latency_high_s must be > latency_low_s")
        if out.queue_high <= out.queue_low:
            raise ConfigError(f"{source}: {where}.queue_high must be > queue_low")
        if out.half_life_s <= 0:
            raise ConfigError(f"{source}: {where}.half_life_s must be > 0")
    return out


def parse_policy(data: Any, source: str = "policy") -> Policy:
    """Validate a policy mapping (as loaded from YAML) into a :class:`Policy`."""
    data = _check_keys(data, _TOP_KEYS, "the top level", source)
    if data.get("version", 1) != 1:
        raise ConfigError(f"{source}: version must be 1, got {data.get('version')!r}")
    defaults = _check_keys(data.get("defaults"), _DEFAULTS_KEYS, "defaults", source)
    cats_raw = data.get("categories") or {}
    if not isinstance(cats_raw, dict):
        raise ConfigError(f"{source}: categories must be a mapping of name -> settings")
    default_name = data.get("default_category", "default")
    if not isinstance(default_name, str):
        raise ConfigError(f"{source}: default_category must be a category name")
    categories: dict[str, CategoryPolicy] = {}
    for name, raw in cats_raw.items():
        raw = _check_keys(raw, _CATEGORY_KEYS, f"categories.{name}", source)
        categories[str(name)] = _category(str(name), {**defaults, **raw}, source)
    if default_name not in categories:
        categories[default_name] = _category(default_name, dict(defaults), source)
    return Policy(
        categories=categories,
        default_category=default_name,
        hnsw=_params(HnswParams, data.get("hnsw"), "hnsw", source),
        classifier=_params(ClassifierParams, data.get("classifier"), "classifier", source),
        adaptive=_params(AdaptiveParams, data.get("adaptive"), "adaptive", source),
        source=source,
    )


def load_policy(path: str | Path | None = None) -> Policy:
    """The policy in ``path`` (YAML), or the built-in :data:`DEFAULT_POLICY` when ``path`` is None."""
    if path is None:
        return parse_policy(copy.deepcopy(DEFAULT_POLICY), "built-in default policy")
    source = f"policy file {path}"
    data = read_yaml(path, "policy file")
    if data is None:
        raise ConfigError(f"{source} is empty")
    return parse_policy(data, source)


def policy_yaml(policy: dict[str, Any] | None = None) -> str:
    """The policy mapping as YAML (the built-in one by default): a starting point for a policy file."""
    return yaml.safe_dump(policy or DEFAULT_POLICY, sort_keys=False, allow_unicode=True, width=120)
