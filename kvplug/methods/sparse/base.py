"""The sparse-attention contract: keep all KV, attend to few tokens per decode step.

An engine holds one :class:`SparseState` per (request, layer). It feeds the state the keys (and values, for
methods that pool them) of each newly *completed unit* of tokens with :meth:`SparseMethod.append`; a unit is the
engine's selection granule (vLLM's KV block, a page on the HF path). Each decode step it calls
:meth:`SparseMethod.select` with the step's query and the request's current length and gets back, per KV head,
the summarised units to attend. Tokens not yet summarised (the *tail*, the unit being filled) are always attended.

Budget accounting is in tokens and rounded to units: sink units (the first ``sink_tokens``), recent units (those
overlapping the last ``recent_tokens``) and the tail always count; the method's scores fill the rest. When the
budget covers every unit the selection is all units, so sparse attention equals dense attention.

Shapes: ``Hq`` query heads, ``H`` KV heads, ``D`` head dim, ``N`` summarised units.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvplug.errors import ConfigError


@dataclass
class Selection:
    """What one step attends, per KV head: ``units [H, S]`` (the same count ``S`` for every head, in no particular
    order) plus the tail; optionally pooled entries ``extra_k, extra_v [H, E, D]`` counted ``exp(extra_logw [H, E])``
    times."""

    units: Tensor
    extra_k: Tensor | None = None
    extra_v: Tensor | None = None
    extra_logw: Tensor | None = None
    dense: bool = False  # every unit selected (the budget covers the context, or the method fell back to dense)
    reused: bool = False  # the previous step's ranking was reused (TokenSelect-style selection cache)


class Growing:
    """A tensor ``[H, capacity, *tail]`` that grows along dim 1 by doubling (one per summary field)."""

    def __init__(self, heads: int, tail: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> None:
        self.buf = torch.empty(heads, 16, *tail, device=device, dtype=dtype)
        self.n = 0

    def extend(self, x: Tensor) -> None:
        """Append ``x [H, T, *tail]``."""
        t = x.shape[1]
        if self.n + t > self.buf.shape[1]:
            cap = max(2 * self.buf.shape[1], self.n + t)
            new = torch.empty(self.buf.shape[0], cap, *self.buf.shape[2:], device=self.buf.device, dtype=self.buf.dtype)
            new[:, : self.n] = self.buf[:, : self.n]
            self.buf = new
        self.buf[:, self.n : self.n + t] = x
        self.n += t

    @property
    def data(self) -> Tensor:
        return self.buf[:, : self.n]


@dataclass
class SparseState:
    """Per (request, layer) state. ``summaries`` holds method-specific fields; ``n_units`` units are summarised."""

    heads: int
    head_dim: int
    unit: int
    device: torch.device
    dtype: torch.dtype = torch.float32
    n_units: int = 0
    summaries: dict[str, Any] = field(default_factory=dict)
    # selection cache (reuse_threshold): the query that last triggered a ranking and that ranking's unit scores
    last_q: Tensor | None = None
    last_scores: Tensor | None = None
    selections: int = 0
    reuses: int = 0


class SparseMethod(ABC):
    """Base of the decode-time selection methods (subclasses are dataclasses holding their hyperparameters).

    Common fields: ``budget`` tokens attended per KV head and step (sink, recent and tail included),
    ``sink_tokens``/``recent_tokens`` always kept, ``dense_layers`` first layers left dense, ``reuse_threshold``
    (cosine similarity of consecutive queries at or above which the previous ranking is reused, TokenSelect's
    selection cache; ``None`` = off) and ``group_reduce`` (how the query heads of one KV head combine scores).
    """

    name: ClassVar[str] = ""
    budget: int
    sink_tokens: int
    recent_tokens: int
    dense_layers: int
    reuse_threshold: float | None
    group_reduce: str

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in ("budget", "sink_tokens", "recent_tokens", "dense_layers"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{self.name}: {f} must be a non-negative integer, got {v!r}")
        if self.budget < 1:
            raise ConfigError(f"{self.name}: budget must be >= 1 token, got {self.budget}")
        if self.reuse_threshold is not None and not 0.0 < float(self.reuse_threshold) <= 1.0:
            raise ConfigError(f"{self.name}: reuse_threshold must be in (0, 1] or null, got {self.reuse_threshold!r}")
        if self.group_reduce not in ("max", "sum"):
            raise ConfigError(f"{self.name}: group_reduce must be 'max' or 'sum', got {self.group_reduce!r}")

    # ---- per-method hooks ---------------------------------------------------------------------------------------
    def new_state(
        self, heads: int, head_dim: int, unit: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> SparseState:
        """A fresh state for one (request, layer); ``unit`` tokens per selectable unit."""
        if unit < 1:
            raise ConfigError(f"unit must be >= 1 token, got {unit}")
        return SparseState(heads, head_dim, unit, torch.device(device), dtype or torch.float32)

    @abstractmethod
    def append(self, state: SparseState, keys: Tensor, values: Tensor | None, token_ids: Sequence[int] | None) -> None:
        """Summarise the next completed units: ``keys``/``values [T, H, D]`` with ``T`` a multiple of the unit
        (``token_ids`` the same ``T`` tokens, for methods that segment text)."""

    @abstractmethod
    def unit_scores(self, q: Tensor, state: SparseState, k: int) -> Tensor:
        """Scores ``[H, N]`` of the summarised units for the query ``q [Hq, D]`` (``k`` units will be taken);
        ``-inf`` marks units that must not be taken."""

    def step_query(self, q: Tensor, state: SparseState, token_id: int | None) -> Tensor | None:
        """The query the ranking uses this step (``None``: attend densely). Default: the step's own query."""
        return q

    def extras(self, q: Tensor, state: SparseState, units: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:  # noqa: ARG002 - hook
        """Pooled entries attended besides ``units`` (hierarchical enrichment); ``None`` for none."""
        return None

    @property
    def needs_values(self) -> bool:
        return False

    # ---- common selection ------------------------------------------------------------------------------------------
    def budget_units(self, state: SparseState, n_tokens: int) -> int:
        """How many summarised units the budget leaves after the tail."""
        tail = n_tokens - state.n_units * state.unit
        return max(0, self.budget // state.unit - math.ceil(max(tail, 0) / state.unit))

    def forced_ranges(self, state: SparseState, n_tokens: int) -> tuple[int, int]:
        """``(s, r)``: units ``[0, s)`` hold the sink, units ``[r, N)`` overlap the recent window."""
        n, u = state.n_units, state.unit
        s = min(n, math.ceil(self.sink_tokens / u))
        r = max(s, (n_tokens - self.recent_tokens) // u) if self.recent_tokens else n
        return s, min(r, n)

    def forced(self, state: SparseState, n_tokens: int) -> Tensor:
        """Bool ``[N]``: sink units and the units overlapping the recent window."""
        s, r = self.forced_ranges(state, n_tokens)
        mask = torch.zeros(state.n_units, dtype=torch.bool, device=state.device)
        mask[:s] = True
        mask[r:] = True
        return mask

    def select(
        self, q: Tensor, state: SparseState, n_tokens: int, token_id: int | None = None, layer: int | None = None
    ) -> Selection:
        """Units to attend this step for query ``q [Hq, D]`` when the request holds ``n_tokens`` tokens (the
        current one included). ``token_id`` is the step's input token (SentenceKV's sentence tracking); ``layer``
        the model layer (the first ``dense_layers`` are dense). Units come back in no particular order."""
        n, h, dev = state.n_units, state.heads, state.device
        k = self.budget_units(state, n_tokens)
        sq = self.step_query(q, state, token_id)
        if (layer is not None and layer < self.dense_layers) or sq is None or k >= n:
            return Selection(torch.arange(n, device=dev).expand(h, n), dense=True)
        s, r = self.forced_ranges(state, n_tokens)
        n_forced = s + (n - r)
        ends = [torch.arange(0, s, device=dev).expand(h, -1), torch.arange(r, n, device=dev).expand(h, -1)]
        if n_forced >= k:  # the budget is spent on sink and recent units
            return Selection(torch.cat(ends, dim=1))
        scores, reused = self._ranking(sq, state, k)
        top = torch.topk(scores[:, s:r], k - n_forced, dim=-1, sorted=False).indices + s
        units = torch.cat([ends[0], top, ends[1]], dim=1)
        sel = Selection(units, reused=reused)
        extra = self.extras(sq, state, units)
        if extra is not None:
            sel.extra_k, sel.extra_v, sel.extra_logw = extra
        return sel

    def _ranking(self, q: Tensor, state: SparseState, k: int) -> tuple[Tensor, bool]:
        """Unit scores, reusing the last ranking when ``q`` is close to the query that made it."""
        thr = self.reuse_threshold
        n = state.n_units
        if thr is not None and state.last_q is not None and state.last_scores is not None:
            cos = torch.nn.functional.cosine_similarity(q.flatten().float(), state.last_q.flatten().float(), dim=0)
            if float(cos) >= thr:
                prev = state.last_scores
                if prev.shape[1] < n:  # units completed since: rank them last (recent ones are forced anyway)
                    pad = prev.new_full((prev.shape[0], n - prev.shape[1]), float("-inf"))
                    prev = torch.cat([prev, pad], dim=1)
                state.reuses += 1
                return prev, True
        scores = self.unit_scores(q, state, k)
        state.selections += 1
        if thr is not None:
            state.last_q, state.last_scores = q.detach().clone(), scores
        return scores, False

    # ---- helpers ----------------------------------------------------------------------------------------------------
    def reduce_heads(self, s: Tensor, heads: int) -> Tensor:
        """``[Hq, N]`` scores to ``[H, N]`` over each KV head's query heads."""
        s = s.view(heads, -1, s.shape[-1])
        return s.amax(1) if self.group_reduce == "max" else s.sum(1)

    def config(self) -> dict[str, Any]:
        """The hyperparameters (for reports and the vLLM config echo)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
