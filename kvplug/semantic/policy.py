"""The category policy: per-category similarity threshold, TTL, quota and eviction, plus classifier examples.

A policy is a YAML file (or the built-in ``DEFAULT_POLICY``). Every mapping is checked: an unknown key, a value
of the wrong type or out of range raises :class:`kvplug.errors.ConfigError` naming the file and the key. A policy
file replaces the built-in policy as a whole (it is not merged with it); fields left out take the defaults below.
A top-level ``threshold`` sets one similarity threshold for every category (a global threshold in one line); a
``min_threshold``/``max_ttl`` inherited from ``defaults`` that contradicts a category's own value follows it.
Defaults follow the paper's reference implementation (vLLM Semantic Router): threshold 0.8, TTL 3600 s,
max_entries 1000, eviction fifo, HNSW M=16, ef_construction=200.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from kvplug.config import parse_size, read_yaml
from kvplug.errors import ConfigError
from kvplug.semantic.verify import CHECKS

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
    verify: tuple[str, ...] = CHECKS  # verification checks before a hit (kvplug.semantic.verify); () = off
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
    """Nearest-examples classifier: a category's score is the mean similarity of its ``top_k`` closest labelled
    examples; below ``min_similarity`` for every category, the default category."""

    min_similarity: float = 0.15
    top_k: int = 3


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
_TOP_KEYS = {"version", "default_category", "defaults", "categories", "hnsw", "classifier", "adaptive", "threshold"}

# The built-in policy. Thresholds are cosine similarities of all-MiniLM-L6-v2 embeddings, set by running
# bench/semantic.py on its workload A (see docs/results/semantic.md; workload B was not used to set them). With the
# verification step on (every category), the similarity gate can be looser than with thresholds alone: numbers,
# dates, entities, negation and direction are checked lexically. Dense categories (code, time-sensitive) stay
# stricter than sparse ones (chat). Health and finance are never loosened under load.
_TIME_WORDS = (
    r"\b(today|today's|tonight|tonight's|tomorrow|tomorrow's|yesterday|yesterday's|right now|currently|"
    r"at the moment|this (morning|afternoon|evening|week|weekend)|next (week|weekend)|last night)\b"
)
DEFAULT_POLICY: dict[str, Any] = {
    "version": 1,
    "default_category": "default",
    "defaults": {"threshold": 0.8, "ttl": 3600, "max_entries": 1000, "max_bytes": "32MiB", "eviction": "fifo"},
    "hnsw": {"M": 16, "ef_construction": 200, "ef_search": 64},
    "classifier": {"min_similarity": 0.15, "top_k": 3},
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
            "description": "weather, prices, scores, news, traffic: short TTL",
            "threshold": 0.85,
            "min_threshold": 0.85,
            "ttl": 300,
            "max_ttl": 900,
            "eviction": "fifo",
            "patterns": [
                _TIME_WORDS,
                r"\b(latest|breaking) (news|headlines|results?|scores?)\b",
                r"\b(current|live) (price|score|weather|exchange rate|status|temperature|traffic|rates?)\b",
                r"\b(stock|share) price\b|\bweather (forecast|in)\b|\bexchange rate\b",
            ],
            "examples": [
                "What's the weather like in Rome this afternoon?",
                "How much is one ounce of silver worth right now?",
                "What was the final score of the derby last night?",
                "What are today's top stories?",
                "How is Microsoft stock doing at the moment?",
                "Is my bus to the airport running late this morning?",
                "What is the pound to dollar rate today?",
                "Is the motorway jammed right now?",
                "Which films are showing at my local cinema this week?",
                "Is it going to be windy in Dublin tomorrow?",
                "What is the wait at the border crossing right now?",
                "Did the central bank change interest rates today?",
            ],
        },
        "code": {
            "description": "programming, tools, shells: dense, near-misses differ by one identifier",
            "threshold": 0.85,
            "min_threshold": 0.85,
            "ttl": 604800,
            "max_ttl": 2592000,
            "eviction": "lru",
            "patterns": [
                r"```",
                r"\b\w+\(\)",
                r"\b(traceback|stack ?trace|segfault|segmentation fault|compiler|compile error|syntax error|"
                r"exception|null ?pointer|runtime error|unit tests?|debugg?(er|ing)?|refactor)\b",
                r"\b(python|javascript|typescript|java|golang|kotlin|scala|ruby|php|perl|swift|haskell|elixir|"
                r"rustc|cargo|bash|zsh|powershell|sql|postgres(ql)?|mysql|sqlite|mongodb|regex|regular expression|"
                r"numpy|pandas|pytorch|tensorflow|django|flask|fastapi|react|vue|angular|node\.?js|npm|yarn|pip|"
                r"conda|venv|virtualenv|git|github|gitlab|docker|dockerfile|kubernetes|kubectl|helm|terraform|"
                r"ansible|nginx|apache|linux|ubuntu|debian|vim|emacs|vscode|json|yaml|xml|html|css|api|rest api|"
                r"http request|curl|wget|ssh|cron|makefile|cmake|gcc|clang|jvm|dotnet|\.net|excel formula)\b",
                r"c\+\+|\bc#|\bin (go|rust|c)\b|\b(go|rust|c) (program|code|function|struct|module)s?\b",
            ],
            "examples": [
                "How do I split a string on commas in Perl?",
                "What is the difference between a process and a thread?",
                "How can I undo git add before committing?",
                "Why does my loop never terminate?",
                "How do I paginate results in a REST API?",
                "What does a 500 internal server error mean in my web app?",
                "How do I memoize a recursive function?",
                "How do I run a shell script every hour?",
                "What is dependency injection?",
                "How do I pass arguments to a container at startup?",
                "How can I profile a slow program?",
                "How do I define a struct with methods?",
                "What is a race condition and how do I avoid it?",
                "How do I store passwords securely in a database?",
                "Why is my variable undefined inside the callback?",
                "How do I parse a date string into a timestamp?",
            ],
        },
        "health": {
            "description": "medical questions: strict and never loosened",
            "threshold": 0.9,
            "ttl": 86400,
            "patterns": [
                r"\b(symptoms?|side effects?|dosage|dose|mg|vaccin\w*|medication|medicine|prescription|doctor|"
                r"diagnos\w*|fever|blood pressure|cholesterol|diabetes|pregnan\w*|infection|headache|migraine|"
                r"heart rate|pulse|allerg\w*|antibiotics?|painkillers?|ibuprofen|paracetamol|acetaminophen|aspirin|"
                r"contagious|injury|sprain\w*|rash|nausea|insomnia|vitamins?)\b",
            ],
            "examples": [
                "What helps with a persistent dry cough?",
                "How long does it take a broken wrist to heal?",
                "Is it normal for a toddler to have a runny nose for weeks?",
                "What are warning signs of a stroke?",
                "How can I lower my resting heart rate?",
                "Which foods should I avoid with gout?",
                "Can anxiety cause shortness of breath?",
                "How do I treat a bee sting?",
                "When is back pain a reason to go to the emergency room?",
                "How much sleep does an adult need?",
                "What does an elevated liver enzyme result mean?",
                "Is it safe to exercise while recovering from a cold?",
            ],
        },
        "finance": {
            "description": "money questions: strict and never loosened",
            "threshold": 0.9,
            "ttl": 3600,
            "patterns": [
                r"\b(tax|taxes|taxed|401\(?k\)?|ira|roth|mortgage|loan|credit (score|card|report)|invest\w*|"
                r"dividends?|pension|retirement|savings|budget\w*|etf|index funds?|bonds?|interest rate|apr|apy|"
                r"inheritance|capital gains|deduction|insurance|debt|refinanc\w*|brokerage|annuit\w*|shares)\b",
            ],
            "examples": [
                "Is it smart to keep all my savings in one bank?",
                "How do I choose between a fixed and a variable rate loan?",
                "What fees should I look for in a brokerage account?",
                "How much of my salary should go to rent?",
                "What is a health savings account used for?",
                "How do I report income from a side job?",
                "Should I pay off student loans before investing?",
                "How does a balance transfer card work?",
                "What is the difference between a Roth 401(k) and a regular one?",
                "How do I start an emergency fund?",
                "Are bonds safer than stocks?",
                "How do I read a company's balance sheet?",
            ],
        },
        "factual": {
            "description": "encyclopedic questions: long TTL",
            "threshold": 0.8,
            "min_threshold": 0.75,
            "ttl": 86400,
            "max_ttl": 604800,
            "eviction": "lfu",
            "patterns": [
                r"\b(capital (city )?of|population of|who (wrote|painted|invented|discovered|composed|founded|built)|"
                r"when (did|was) .{1,40} (born|founded|built|invented|discovered|end|start|begin|fall))\b",
            ],
            "examples": [
                "Which river flows through Vienna?",
                "Who was the first person to walk on the Moon?",
                "How many bones does a cat have?",
                "What is the chemical formula of table salt?",
                "In which year did the Titanic sink?",
                "What is the largest mammal on Earth?",
                "Which country has the longest coastline?",
                "Who developed the theory of relativity?",
                "What is the official language of Argentina?",
                "How hot is the surface of the Sun?",
                "What is the deepest lake in the world?",
                "Which empire built Hadrian's Wall?",
            ],
        },
        "chat": {
            "description": "small talk, creative requests: sparse, loose threshold",
            "threshold": 0.8,
            "min_threshold": 0.75,
            "ttl": 3600,
            "max_ttl": 14400,
            "patterns": [r"^\s*(hi|hello|hey|good (morning|evening))\b", r"\b(tell me a joke|cheer me up)\b"],
            "examples": [
                "Hey, what's up?",
                "Can you make me laugh?",
                "I had a rough day at work.",
                "Write a two-line poem about coffee.",
                "Do you ever get bored?",
                "What would be a fun theme for a party?",
                "Tell me a story about a lost robot.",
                "I'm so happy, I passed my exam!",
                "Say something encouraging.",
                "If you were an animal, which one would you be?",
                "Give me a silly nickname for my friend.",
                "Thank you so much, that was helpful!",
            ],
        },
        "default": {
            "description": "practical how-to and anything else",
            "threshold": 0.85,
            "min_threshold": 0.8,
            "max_ttl": 7200,
            "examples": [
                "How do I get chewing gum out of hair?",
                "What is the best way to store fresh herbs?",
                "How do I hang a heavy mirror on drywall?",
                "How do I stop my glasses from fogging up?",
                "How should I prepare for a marathon?",
                "How do I descale a kettle?",
                "What can I use instead of eggs in baking?",
                "How do I write a polite complaint email?",
                "How do I keep cut flowers fresh longer?",
                "What's the best way to learn to swim as an adult?",
                "How do I fix a squeaky door hinge?",
                "How do I renew my driving licence?",
            ],
        },
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


def _verify(value: Any, key: str, source: str) -> tuple[str, ...]:
    """``true`` (every check), ``false`` (none) or a list of check names."""
    if value is True:
        return CHECKS
    if value is False or value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: {key} must be true, false or a list of checks from {list(CHECKS)}")
    unknown = sorted(set(value) - set(CHECKS))
    if unknown:
        raise ConfigError(f"{source}: {key}: unknown check(s) {unknown}; known checks: {list(CHECKS)}")
    return tuple(c for c in CHECKS if c in value)


def _category(name: str, raw: dict[str, Any], source: str, own: set[str] | None = None) -> CategoryPolicy:
    """``raw``: the category's settings over ``defaults``; ``own``: the keys the category itself sets (a bound
    inherited from ``defaults`` or the global threshold that contradicts an own value is clamped, not an error)."""
    own = set(raw) if own is None else own
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
    if "verify" in raw:
        kw["verify"] = _verify(raw["verify"], f"{where}.verify", source)
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
    if kw.get("min_threshold") is not None and kw["min_threshold"] > kw.get("threshold", 0.8):
        if "min_threshold" in own and "threshold" in own:
            raise ConfigError(
                f"{source}: {where}.min_threshold ({kw['min_threshold']}) > threshold ({kw.get('threshold', 0.8)})"
            )
        kw["min_threshold"] = kw.get("threshold", 0.8)  # an inherited bound follows the threshold set here
    if kw.get("max_ttl") is not None and kw["max_ttl"] < kw.get("ttl", 3600.0):
        if "max_ttl" in own and "ttl" in own:
            raise ConfigError(f"{source}: {where}.max_ttl ({kw['max_ttl']}) < ttl ({kw.get('ttl', 3600.0)})")
        kw["max_ttl"] = kw.get("ttl", 3600.0)
    return CategoryPolicy(**kw)


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
        elif isinstance(default, int) and not isinstance(default, bool) and cls in (HnswParams, ClassifierParams):
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
    glob = data.get("threshold")
    if glob is not None:
        glob = _num(glob, "threshold", source, 0.0, 1.0)
    categories: dict[str, CategoryPolicy] = {}
    for name, raw in cats_raw.items():
        raw = _check_keys(raw, _CATEGORY_KEYS, f"categories.{name}", source)
        merged = {**defaults, **raw}
        own = set(raw)
        if glob is not None:  # one threshold everywhere: it overrides every category's own
            merged["threshold"] = glob
            own.discard("threshold")
        categories[str(name)] = _category(str(name), merged, source, own)
    if default_name not in categories:
        merged = dict(defaults) if glob is None else {**defaults, "threshold": glob}
        categories[default_name] = _category(default_name, merged, source, set())
    return Policy(
        categories=categories,
        default_category=default_name,
        hnsw=_params(HnswParams, data.get("hnsw"), "hnsw", source),
        classifier=_params(ClassifierParams, data.get("classifier"), "classifier", source),
        adaptive=_params(AdaptiveParams, data.get("adaptive"), "adaptive", source),
        source=source,
    )


def with_threshold(policy: Policy, threshold: float | None) -> Policy:
    """The policy with one similarity threshold for every category (``None``: unchanged). A ``min_threshold``
    above it follows it down."""
    if threshold is None:
        return policy
    cats = {}
    for name, c in policy.categories.items():
        floor = None if c.min_threshold is None else min(c.min_threshold, threshold)
        cats[name] = dataclasses.replace(c, threshold=threshold, min_threshold=floor)
    return dataclasses.replace(policy, categories=cats, source=f"{policy.source}, threshold {threshold} everywhere")


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
