"""Which tokens to recompute when a prompt reuses stored segment KV: one dataclass per paper, plus the two bounds.

A blended prefill loads each reused segment's KV (keys re-rotated to the new positions), runs the tokens that are
never reused (system prompt, separators, question: ``~reused``) and repairs the reused ones by recomputing a
selection of them. The engine calls a strategy at its check layers:

- *dynamic* strategies (``check_layers`` non-empty: CacheBlend, KVShare) see the fresh and the loaded K/V of every
  row computed at that layer and return the rows to keep computing from the next layer on. Layers up to the first
  check layer run on every row; each later check layer may only narrow the set (gradual filtering);
- *static* strategies (``check_layers == ()``: none, full, EPIC, Cache-Craft, APE) select before layer 0 from the
  segment spans and the statistics stored with each segment (``meta``), with ``k_fresh``/``v_fresh``/``k_old``/
  ``v_old`` left None.

``select`` always returns every ``~reused`` token (and only rows computed at that layer). ``guard`` returns a reason
to fall back to a full prefill (the engine counts and logs it) or None. ``recompute_ratio`` is a fraction of the
*reused* tokens (the ``~reused`` ones are computed in any case). Everything here is plain torch: no engine imports.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvplug.errors import ConfigError


@dataclass
class BlendInput:
    """What a strategy sees at a check layer (or before layer 0 for static strategies)."""

    reused: Tensor  # bool [T]: KV comes from the store (False: always computed fresh)
    segments: list[tuple[int, int]]  # reused segments as token ranges [start, end) in the prompt
    k_fresh: Tensor | None = None  # [T, H, D] keys computed in this forward at ``layer`` (post-RoPE, new positions)
    v_fresh: Tensor | None = None
    k_old: Tensor | None = None  # [T, H, D] loaded keys re-rotated to the new positions (garbage where ~reused)
    v_old: Tensor | None = None
    layer: int = -1  # the check layer these tensors come from (-1: before layer 0)
    meta: list[dict[str, Any]] = field(default_factory=list)  # per segment: what was stored with its KV
    active: Tensor | None = None  # bool [T]: rows computed at this layer (None: all); k/v_fresh are garbage elsewhere
    keys: list[str] | None = None  # the segments' blend keys in prompt order (Cache-Craft's overlap and order)

    @property
    def length(self) -> int:
        return int(self.reused.shape[0])

    def rows(self) -> Tensor:
        """Rows computed at this layer (bool [T])."""
        return self.active if self.active is not None else torch.ones_like(self.reused)

    def check(self) -> None:
        t = self.length
        if self.reused.dtype != torch.bool or self.reused.ndim != 1:
            raise ValueError(f"reused must be a bool [T] tensor, got {self.reused.dtype} {tuple(self.reused.shape)}")
        covered = torch.zeros(t, dtype=torch.bool, device=self.reused.device)
        for s, e in self.segments:
            if not 0 <= s < e <= t:
                raise ValueError(f"segment [{s}, {e}) outside a prompt of {t} tokens")
            if bool(covered[s:e].any()):
                raise ValueError(f"segment [{s}, {e}) overlaps another")
            covered[s:e] = True
        if not torch.equal(covered, self.reused):
            raise ValueError("reused must be exactly the union of the segments")
        if self.meta and len(self.meta) != len(self.segments):
            raise ValueError(f"{len(self.meta)} meta entries for {len(self.segments)} segments")
        for name in ("k_fresh", "v_fresh", "k_old", "v_old"):
            x = getattr(self, name)
            if x is not None and (x.ndim != 3 or x.shape[0] != t):
                raise ValueError(f"{name} must be [T={t}, H, D], got {tuple(x.shape)}")


def token_deviation(fresh: Tensor, old: Tensor) -> Tensor:
    """Per-token squared L2 distance summed over heads and dims (``[T, H, D]`` -> ``[T]``, float32)."""
    return (fresh.float() - old.float()).pow(2).sum(dim=(-1, -2))


def relative_deviation(inp: BlendInput, on: str = "value") -> float:
    """``sum ||fresh - old||^2 / sum ||fresh||^2`` over the reused rows computed at this layer: 0 for KV that
    matches what the model computes in this context; about 1 or more for unrelated KV. NaN without fresh KV."""
    fresh, old = (inp.v_fresh, inp.v_old) if on == "value" else (inp.k_fresh, inp.k_old)
    if fresh is None or old is None:
        return math.nan
    rows = inp.reused & inp.rows()
    if not bool(rows.any()):
        return 0.0
    num = token_deviation(fresh[rows], old[rows]).sum()
    den = fresh[rows].float().pow(2).sum().clamp_min(1e-30)
    return float(num / den)


def corrupt_segments(inp: BlendInput, tol: float = 1e-2) -> list[int]:
    """Segments whose loaded KV cannot be the model's for those tokens, from layer-0 K/V: at layer 0 a token's keys
    (re-rotated) and values depend on the token alone, so loaded and fresh agree to rounding whenever the stored KV
    belongs to this model, these tokens and an honest store. Returns the indices of segments whose relative
    deviation (keys and values) exceeds ``tol``: the engine recomputes them or falls back."""
    if inp.k_fresh is None or inp.v_fresh is None or inp.k_old is None or inp.v_old is None:
        raise ValueError("corrupt_segments needs layer-0 fresh and loaded K/V")
    bad = []
    for i, (s, e) in enumerate(inp.segments):
        num = token_deviation(inp.k_fresh[s:e], inp.k_old[s:e]) + token_deviation(inp.v_fresh[s:e], inp.v_old[s:e])
        den = inp.k_fresh[s:e].float().pow(2).sum() + inp.v_fresh[s:e].float().pow(2).sum()
        rel = float(num.sum() / den.clamp_min(1e-30))
        if not math.isfinite(rel) or rel > tol:
            bad.append(i)
    return bad


def _top(scores: Tensor, candidates: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` candidates with the highest scores."""
    out = torch.zeros_like(candidates)
    idx = candidates.nonzero().flatten()
    k = min(max(int(k), 0), idx.numel())
    if k:
        top = scores[idx].float().topk(k).indices
        out[idx[top]] = True
    return out


class BlendStrategy(ABC):
    """Base of every strategy. Subclasses are dataclasses whose fields are the hyperparameters; each has
    ``check_layers`` (``()`` for static selection) and ``max_deviation`` (the quality guard, None = off)."""

    name: ClassVar[str] = ""
    modifies_attention: ClassVar[bool] = False  # changes attention itself (APE): engines without it must refuse
    needs_attention_stats: ClassVar[bool] = False  # segment_meta wants attention statistics at store time
    check_layers: tuple[int, ...] = ()
    max_deviation: float | None = None
    guard_on: str = "value"

    def __post_init__(self) -> None:
        self.check_layers = tuple(int(x) for x in self.check_layers)
        if any(b <= a for a, b in zip(self.check_layers, self.check_layers[1:], strict=False)):
            raise ConfigError(f"{self.name}: check_layers must be strictly increasing, got {self.check_layers}")
        if any(x < 0 for x in self.check_layers):
            raise ConfigError(f"{self.name}: check_layers must be >= 0, got {self.check_layers}")
        if self.max_deviation is not None and not self.max_deviation > 0:
            raise ConfigError(f"{self.name}: max_deviation must be > 0 or None, got {self.max_deviation!r}")
        if self.guard_on not in ("value", "key"):
            raise ConfigError(f"{self.name}: guard_on must be 'value' or 'key', got {self.guard_on!r}")
        self.validate()

    def validate(self) -> None:  # noqa: B027 - optional hook
        """Check the hyperparameters (raise :class:`ConfigError` naming the bad one)."""

    @property
    def static(self) -> bool:
        return not self.check_layers

    @abstractmethod
    def select(self, inp: BlendInput) -> Tensor:
        """Bool ``[T]``: rows recomputed from the next layer on; always every ``~reused`` row."""

    def guard(self, inp: BlendInput) -> str | None:
        """A reason to fall back to a full prefill, else None: the measured relative deviation of the reused rows at
        the first check layer above ``max_deviation``."""
        if self.max_deviation is None or not self.check_layers or inp.layer != self.check_layers[0]:
            return None
        dev = relative_deviation(inp, self.guard_on)
        if math.isfinite(dev) and dev <= self.max_deviation:
            return None
        return f"{self.name}: relative {self.guard_on} deviation {dev:.3g} at layer {inp.layer} > {self.max_deviation}"

    def segment_meta(self, **stats: Any) -> dict[str, Any]:
        """Statistics to store with a segment's KV when it is computed (JSON-able). Default: nothing."""
        return {}

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def _base(self, inp: BlendInput) -> Tensor:
        """The rows every selection keeps: the ``~reused`` ones (computed at this layer)."""
        return ~inp.reused & inp.rows()

    def _budget(self, inp: BlendInput, ratio: float) -> int:
        return int(round(ratio * int(inp.reused.sum())))


def _ratio(name: str, field_name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: {field_name} must be in [0, 1], got {value!r}")


@dataclass
class Full(BlendStrategy):
    """Full recompute: every token at every layer (the quality bound; equal to a normal prefill)."""

    name: ClassVar[str] = "full"
    check_layers: tuple[int, ...] = ()

    def select(self, inp: BlendInput) -> Tensor:
        return inp.rows().clone()


@dataclass
class NoRecompute(BlendStrategy):
    """No recompute: only the ``~reused`` tokens run (plain concatenation of the stored KV; the speed bound)."""

    name: ClassVar[str] = "none"
    check_layers: tuple[int, ...] = ()

    def select(self, inp: BlendInput) -> Tensor:
        return self._base(inp)


@dataclass
class CacheBlend(BlendStrategy):
    """CacheBlend (Yao et al., EuroSys'25, arXiv 2405.16444): recompute the tokens whose KV deviates most at a check
    layer. Defaults: check layer 1 and value deviation (the paper's code), ratio 0.15 (the paper and LMCache; the
    archived code uses 0.16). Gradual filtering: several ``check_layers`` with non-increasing ``ratios``."""

    name: ClassVar[str] = "cacheblend"
    recompute_ratio: float = 0.15
    check_layers: tuple[int, ...] = (1,)
    ratios: tuple[float, ...] | None = None  # one per check layer (gradual filtering); None: recompute_ratio at each
    on: str = "value"  # "value" (paper code), "key" (LMCache's blender) or "both"
    max_deviation: float | None = None

    def validate(self) -> None:
        _ratio(self.name, "recompute_ratio", self.recompute_ratio)
        if not self.check_layers:
            raise ConfigError(f"{self.name}: needs at least one check layer")
        if self.ratios is not None:
            self.ratios = tuple(float(r) for r in self.ratios)
            if len(self.ratios) != len(self.check_layers):
                raise ConfigError(f"{self.name}: {len(self.ratios)} ratios for {len(self.check_layers)} check layers")
            for r in self.ratios:
                _ratio(self.name, "ratios", r)
            if any(b > a for a, b in zip(self.ratios, self.ratios[1:], strict=False)):
                raise ConfigError(f"{self.name}: gradual filtering ratios must not increase, got {self.ratios}")
        if self.on not in ("value", "key", "both"):
            raise ConfigError(f"{self.name}: on must be 'value', 'key' or 'both', got {self.on!r}")

    def ratio_at(self, layer: int) -> float:
        if self.ratios is None:
            return self.recompute_ratio
        return self.ratios[self.check_layers.index(layer)]

    def scores(self, inp: BlendInput) -> Tensor:
        parts = []
        if self.on in ("value", "both"):
            if inp.v_fresh is None or inp.v_old is None:
                raise ValueError(f"{self.name}: needs fresh and loaded values at layer {inp.layer}")
            parts.append(token_deviation(inp.v_fresh, inp.v_old))
        if self.on in ("key", "both"):
            if inp.k_fresh is None or inp.k_old is None:
                raise ValueError(f"{self.name}: needs fresh and loaded keys at layer {inp.layer}")
            parts.append(token_deviation(inp.k_fresh, inp.k_old))
        return sum(parts[1:], parts[0])

    def select(self, inp: BlendInput) -> Tensor:
        cand = inp.reused & inp.rows()
        return self._base(inp) | _top(self.scores(inp), cand, self._budget(inp, self.ratio_at(inp.layer)))


@dataclass
class KVShare(BlendStrategy):
    """KVShare DHD (Yang et al., arXiv 2503.16525): recompute the reused tokens whose KV deviates beyond a threshold,
    at prefill and again during decoding when a new token leans on stale ones. No public code: the threshold is on
    the per-token relative value deviation ``||dV|| / ||V||`` (our default, calibrated on SmolLM2), capped at
    ``recompute_ratio``; the decode stage is the engine's (:meth:`decode_select` scores, the HF path executes)."""

    name: ClassVar[str] = "kvshare"
    deviation_threshold: float = 0.3  # relative per-token value deviation above which a token is recomputed
    recompute_ratio: float = 0.15  # cap on the prefill selection (fraction of reused tokens)
    check_layers: tuple[int, ...] = (1,)
    decode_attention: float = 0.1  # trigger: attention mass of the new token on stale high-deviation tokens
    decode_tokens: int = 16  # tokens recomputed per trigger
    decode_interval: int = 1  # check every this many decode steps
    decode_budget: float = 0.1  # at most this fraction of reused tokens recomputed during decoding
    max_deviation: float | None = None

    def validate(self) -> None:
        _ratio(self.name, "recompute_ratio", self.recompute_ratio)
        _ratio(self.name, "decode_attention", self.decode_attention)
        _ratio(self.name, "decode_budget", self.decode_budget)
        if not self.deviation_threshold >= 0:
            raise ConfigError(f"{self.name}: deviation_threshold must be >= 0, got {self.deviation_threshold!r}")
        if len(self.check_layers) != 1:
            raise ConfigError(f"{self.name}: needs exactly one check layer, got {self.check_layers}")
        if self.decode_tokens < 0 or self.decode_interval < 1:
            raise ConfigError(f"{self.name}: decode_tokens must be >= 0 and decode_interval >= 1")

    def scores(self, inp: BlendInput) -> Tensor:
        """Per-token relative value deviation ``||V_fresh - V_old|| / ||V_fresh||`` (``[T]``)."""
        if inp.v_fresh is None or inp.v_old is None:
            raise ValueError(f"{self.name}: needs fresh and loaded values at layer {inp.layer}")
        num = token_deviation(inp.v_fresh, inp.v_old).sqrt()
        return num / inp.v_fresh.float().pow(2).sum(dim=(-1, -2)).sqrt().clamp_min(1e-30)

    def select(self, inp: BlendInput) -> Tensor:
        rel = self.scores(inp)
        cand = inp.reused & inp.rows() & (rel > self.deviation_threshold)
        return self._base(inp) | _top(rel, cand, self._budget(inp, self.recompute_ratio))

    def decode_select(self, attn: Tensor, deviation: Tensor, stale: Tensor, budget_left: int) -> Tensor | None:
        """Decode-stage trigger. ``attn [Hq, T]``: the newest token's attention over the prompt at the check layer;
        ``deviation [T]``: the prefill relative deviation; ``stale [T]``: reused rows never recomputed. Returns the
        indices to recompute (highest attention x deviation) when the attention mass on stale tokens above the
        deviation threshold exceeds ``decode_attention``, else None."""
        if budget_left <= 0 or self.decode_tokens == 0:
            return None
        hot = stale & (deviation > self.deviation_threshold)
        if not bool(hot.any()):
            return None
        a = attn.float().mean(dim=0)[: stale.shape[0]]
        if float(a[hot].sum()) <= self.decode_attention:
            return None
        k = min(self.decode_tokens, budget_left)
        return _top(a * deviation.float(), hot, k).nonzero().flatten()


@dataclass
class Epic(BlendStrategy):
    """EPIC's LegoLink (Hu et al., ICML'25, arXiv 2410.15332): recompute the first ``initial_tokens`` of every segment
    (each segment's own attention sink) and nothing else. Default 16: LegoLink-16, the paper's headline setting
    (it bounds k <= 32)."""

    name: ClassVar[str] = "epic"
    initial_tokens: int = 16
    check_layers: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.initial_tokens < 0:
            raise ConfigError(f"{self.name}: initial_tokens must be >= 0, got {self.initial_tokens}")
        if self.check_layers:
            raise ConfigError(f"{self.name}: static selection, check_layers must be ()")

    def select(self, inp: BlendInput) -> Tensor:
        out = self._base(inp)
        for s, e in inp.segments:
            out[s : min(e, s + self.initial_tokens)] = True
        return out & inp.rows()


@dataclass
class CacheCraft(BlendStrategy):
    """Cache-Craft (Agarwal et al., SIGMOD'25, arXiv 2502.15734): a per-segment recompute budget from its Cache
    Context Impact. At store time each segment keeps its tokens' inter-attention share (attention to what preceded
    it then) and the keys of the segments that preceded it; at reuse, ``CCI = mean inter-attention x (1 - beta (1 -
    gamma))`` with prefix overlap ``beta`` and order penalty ``gamma``, and the budget (``recompute_ratio`` of all
    reused tokens) is split in proportion to ``CCI x length``; inside a segment the tokens with the highest
    inter-attention are recomputed. The formulas are a reconstruction from the paper's definitions (no public code);
    0.25 is the paper's overall saving (75% less compute than full recompute). ``max_cci``: a segment above it is
    not reusable and is recomputed whole."""

    name: ClassVar[str] = "cacheraft"
    needs_attention_stats: ClassVar[bool] = True
    recompute_ratio: float = 0.25
    stat_layers: tuple[int, ...] = (1,)  # layers whose attention the store-time statistics average
    max_cci: float | None = None
    check_layers: tuple[int, ...] = ()

    def validate(self) -> None:
        _ratio(self.name, "recompute_ratio", self.recompute_ratio)
        self.stat_layers = tuple(int(x) for x in self.stat_layers)
        if not self.stat_layers or any(x < 0 for x in self.stat_layers):
            raise ConfigError(f"{self.name}: stat_layers must be non-empty layer indices, got {self.stat_layers}")
        if self.max_cci is not None and not 0 < self.max_cci <= 1:
            raise ConfigError(f"{self.name}: max_cci must be in (0, 1] or None, got {self.max_cci!r}")
        if self.check_layers:
            raise ConfigError(f"{self.name}: static selection, check_layers must be ()")

    def segment_meta(self, **stats: Any) -> dict[str, Any]:
        """``inter``: ``[L]`` per-token share of attention (mean over heads and ``stat_layers``) on tokens before the
        segment when it was computed; ``context``: the blend keys of the segments that preceded it (``[]`` when it
        was computed alone or after a shared prefix only)."""
        inter = stats.get("inter")
        if inter is None:
            raise ValueError(f"{self.name}: segment_meta needs inter= (per-token inter-attention share)")
        inter = torch.as_tensor(inter).float().flatten()
        return {"inter": [round(float(x), 5) for x in inter], "context": list(stats.get("context", []))}

    @staticmethod
    def overlap_and_order(original: list[str], current: list[str]) -> tuple[float, float]:
        """``beta``: the share of the current preceding segments the cached KV already saw; ``gamma``: the share of
        discordant pairs among them (0 when fewer than two are shared)."""
        if not current:
            return 1.0, 0.0
        common = [k for k in current if k in original]
        beta = len(common) / len(current)
        if len(common) < 2:
            return beta, 0.0
        pos = {k: i for i, k in enumerate(original)}
        pairs = discordant = 0
        for i in range(len(common)):
            for j in range(i + 1, len(common)):
                pairs += 1
                discordant += pos[common[i]] > pos[common[j]]
        return beta, discordant / pairs

    def cci(self, inp: BlendInput) -> list[float]:
        """Cache Context Impact of each segment, in [0, 1]."""
        if len(inp.meta) != len(inp.segments):
            raise ValueError(f"{self.name}: needs the stored statistics (meta) of every segment")
        keys = inp.keys or [f"#{i}" for i in range(len(inp.segments))]
        out = []
        for i, m in enumerate(inp.meta):
            inter = m.get("inter")
            if inter is None:
                raise ValueError(f"{self.name}: segment {i} was stored without its inter-attention statistics")
            beta, gamma = self.overlap_and_order(list(m.get("context", [])), keys[:i])
            share = float(torch.as_tensor(inter, dtype=torch.float32).mean()) if len(inter) else 0.0
            out.append(min(max(share * (1.0 - beta * (1.0 - gamma)), 0.0), 1.0))
        return out

    def select(self, inp: BlendInput) -> Tensor:
        out = self._base(inp)
        cci = self.cci(inp)
        lens = [e - s for s, e in inp.segments]
        weight = [c * n for c, n in zip(cci, lens, strict=True)]
        total = self._budget(inp, self.recompute_ratio)
        wsum = sum(weight)
        for (s, e), m, w, c in zip(inp.segments, inp.meta, weight, cci, strict=True):
            if self.max_cci is not None and c > self.max_cci:
                out[s:e] = True
                continue
            k = int(round(total * w / wsum)) if wsum > 0 else 0
            inter = torch.as_tensor(m["inter"], dtype=torch.float32)
            if inter.numel() != e - s:
                raise ValueError(f"{self.name}: segment [{s}, {e}) stored {inter.numel()} token statistics")
            local = _top(inter, torch.ones(e - s, dtype=torch.bool), min(k, e - s))
            out[s:e] |= local.to(out.device)
        return out & inp.rows()

    def guard(self, inp: BlendInput) -> str | None:
        return None  # unsafe segments are recomputed whole (max_cci), not the whole prompt


@dataclass
class APE(BlendStrategy):
    """APE, adaptive parallel encoding (Yang et al., ICLR'25, arXiv 2502.05431): segments encoded in parallel after a
    shared prefix reuse one position range; the query attends to them with temperature ``temperature`` and their
    log-sum-exp scaled by ``scale x temperature`` (T = S = 0.9, the official demo). No recompute: the repair is in
    attention itself, so only an engine that implements it (the HF path) may run this strategy."""

    name: ClassVar[str] = "ape"
    modifies_attention: ClassVar[bool] = True
    temperature: float = 0.9
    scale: float = 0.9
    check_layers: tuple[int, ...] = ()

    def validate(self) -> None:
        if not self.temperature > 0 or not self.scale > 0:
            raise ConfigError(f"{self.name}: temperature and scale must be > 0, got {self.temperature}, {self.scale}")
        if self.check_layers:
            raise ConfigError(f"{self.name}: no check layers (APE recomputes nothing)")

    def select(self, inp: BlendInput) -> Tensor:
        return self._base(inp)


STRATEGIES: dict[str, type[BlendStrategy]] = {
    c.name: c for c in (Full, NoRecompute, CacheBlend, KVShare, Epic, CacheCraft, APE)
}


def available() -> list[str]:
    """Strategy names, sorted."""
    return sorted(STRATEGIES)


def _coerce(name: str, key: str, annotation: str, value: Any) -> Any:
    """Engine flags arrive as strings: ``"0.3"``, ``"1,2,3"``, ``"none"``."""
    kinds = {t.strip() for t in annotation.split("|")}
    try:
        if isinstance(value, str):
            s = value.strip()
            if "None" in kinds and s.lower() in ("none", "null", ""):
                return None
            if any(k.startswith("tuple") for k in kinds):
                inner = float if "float" in annotation.split("tuple", 1)[1] else int
                return tuple(inner(x) for x in s.strip("()[] ").split(",") if x.strip())
            if "int" in kinds:
                return int(s)
            if "float" in kinds:
                return float(s)
            return s
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, (list, tuple)):
            return tuple(value)
        if isinstance(value, int) and "float" in kinds:
            return float(value)
        if isinstance(value, float) and "int" in kinds and "float" not in kinds:
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
    except ValueError:
        raise ConfigError(f"{name}: parameter {key} expects {annotation}, got {value!r}") from None
    return value


def get_strategy(name: str, **params: Any) -> BlendStrategy:
    """A strategy by name with its hyperparameters; unknown names or parameters are a :class:`ConfigError` that lists
    the valid ones; string values (engine flags) are converted to the field's type."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown blend strategy {name!r}; available: {', '.join(available())}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ConfigError(f"{name}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(name, k, str(fields[k].type), v) for k, v in params.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{name}: bad parameters {params}: {e}") from None
