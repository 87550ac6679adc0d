"""The methods contract: what an engine hands a method (``LayerKV``), what it gets back (``CompressedLayer``),
and the three method kinds: ``Evictor`` (keeps a subset of tokens), ``Transform`` (rewrites the kept KV:
``Quantizer``, ThinK) and plain ``KVMethod`` (whole-model methods such as MiniCache).

Shapes: ``B`` batch, ``H`` KV heads, ``N`` tokens, ``D`` head dim, ``W`` query rows, ``K`` kept slots.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.budget import uniform_budget
from kvplug.methods.rope import Rope

INDEX_BYTES = 4  # an int32 token position, per kept (batch, head, token) entry and per stored outlier


@dataclass
class Replay:
    """Tokens run after a layer's ``N`` tokens, on its uncompressed KV, that re-read tokens ``start:end`` of them
    (KVzip's context reconstruction). The engine runs them and hands over their post-RoPE queries and keys."""

    queries: Tensor  # [B, H*G, R, D]
    keys: Tensor  # [B, H, R, D]
    start: int
    end: int


@dataclass
class LayerKV:
    """One attention layer's KV as the engine holds it (post-RoPE keys)."""

    keys: Tensor  # [B, H, N, D]
    values: Tensor  # [B, H, N, D]
    queries: Tensor | None = None  # [B, H*G, W, D] post-RoPE queries of the last W positions (all N for H2O)
    layer_idx: int = 0
    num_layers: int = 1
    rope: Rope | None = None  # lets a method undo RoPE on keys (KVQuant)
    scaling: float | None = None  # softmax scale; None = D**-0.5
    positions: Tensor | None = None  # [N] or [B, H, N] positions of the keys; None = arange(N)
    attentions: Tensor | None = None  # [B, H*G, W, N] attention probabilities of the last W queries, if known
    attention_sums: Tensor | None = None  # [B, H*G, N] attention each key got, summed over all N prompt queries
    replays: list[Replay] | None = None  # reconstruction passes (methods with ``needs_replay``)

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def heads(self) -> int:
        return self.keys.shape[1]

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]

    @property
    def scale(self) -> float:
        return self.scaling if self.scaling is not None else self.head_dim**-0.5

    def key_positions(self) -> Tensor:
        """Positions of the keys: ``positions`` or ``arange(N)``."""
        if self.positions is not None:
            return self.positions.to(self.keys.device)
        return torch.arange(self.length, device=self.keys.device)

    def check(self) -> None:
        k, v = self.keys, self.values
        if k.ndim != 4 or v.shape != k.shape:
            raise ValueError(f"keys/values must be [B, H, N, D] of one shape, got {tuple(k.shape)} {tuple(v.shape)}")
        if not (k.is_floating_point() and v.is_floating_point()):
            raise ValueError(f"keys/values must be floating point, got {k.dtype} {v.dtype}")
        for name, t in (("queries", self.queries), ("attentions", self.attentions)):
            if t is None:
                continue
            if t.ndim != 4 or t.shape[0] != k.shape[0] or t.shape[1] % k.shape[1]:
                raise ValueError(f"{name} must be [B, H*groups, W, *] for keys {tuple(k.shape)}, got {tuple(t.shape)}")
        if self.queries is not None and self.queries.shape[3] != k.shape[3]:
            raise ValueError(f"queries head dim {self.queries.shape[3]} != keys head dim {k.shape[3]}")
        if self.attentions is not None and self.attentions.shape[3] != k.shape[2]:
            raise ValueError(f"attentions cover {self.attentions.shape[3]} keys, layer has {k.shape[2]}")
        sums = self.attention_sums
        if sums is not None and (sums.ndim != 3 or sums.shape[0] != k.shape[0] or sums.shape[2] != k.shape[2]):
            raise ValueError(f"attention_sums must be [B, H*groups, N] for keys {tuple(k.shape)}, got {sums.shape}")
        for r in self.replays or ():
            if r.keys.shape[:2] != k.shape[:2] or r.queries.shape[2] != r.keys.shape[2]:
                raise ValueError(f"replay keys {tuple(r.keys.shape)} / queries {tuple(r.queries.shape)} do not fit")
            if not 0 <= r.start < r.end <= k.shape[2]:
                raise ValueError(f"replay re-reads tokens {r.start}:{r.end} of a layer with {k.shape[2]}")


@dataclass
class CompressedLayer:
    """What attention uses for one layer from now on, and what it would cost stored."""

    keys: Tensor  # [B, H, K, D] (dequantized if quantized; pruned channels zeroed for ThinK)
    values: Tensor  # [B, H, K, D]
    keep: Tensor | None  # [B, H, K] bool; visible entries first in each head, padding after; None = all visible
    nbytes: int  # stored bytes: data + scales + indices, visible entries only
    indices: Tensor | None  # [B, H, K] original positions; -1 = padding (keep False) or a synthetic entry
    scores: Tensor | None = None  # [B, H, K] the method's raw scores of the kept entries (seeds decode state)

    @property
    def kept(self) -> Tensor:
        """Visible entries per (batch, head): ``[B, H]``."""
        if self.keep is None:
            b, h, k, _ = self.keys.shape
            return torch.full((b, h), k, dtype=torch.long, device=self.keys.device)
        return self.keep.sum(-1)


def full_layer(layer: LayerKV) -> CompressedLayer:
    """The layer unchanged (as an eviction that keeps everything)."""
    b, h, n, _ = layer.keys.shape
    idx = torch.arange(n, device=layer.keys.device).expand(b, h, n)
    return CompressedLayer(layer.keys, layer.values, None, raw_bytes(layer.keys, layer.values, b * h * n), idx)


def raw_bytes(keys: Tensor, values: Tensor, entries: int, indexed: bool = False) -> int:
    """Bytes of ``entries`` (batch, head, token) key and value vectors at their dtypes, plus an int32 position
    each when ``indexed`` (a layer that lost tokens must say which it kept; a whole layer needs no index)."""
    d = keys.shape[-1]
    return entries * (d * (keys.element_size() + values.element_size()) + (INDEX_BYTES if indexed else 0))


class KVMethod:
    """Base of every method. Subclasses are dataclasses whose fields are the hyperparameters."""

    name: ClassVar[str] = ""
    supports_decode: ClassVar[bool] = False  # has new_state / decode_select
    whole_model: ClassVar[bool] = False  # compress needs every layer at once (not callable layer by layer)
    needs_replay: ClassVar[bool] = False  # needs LayerKV.replays (the engine runs replay_inputs' tokens first)
    uses_attention_sums: ClassVar[bool] = False  # reads column sums over all prompt queries (an engine may share them)

    @property
    def query_window(self) -> int | None:
        """How many of the last prompt queries ``compress`` needs: 0 none, None all N positions."""
        return 0

    def compress(self, layers: Sequence[LayerKV]) -> list[CompressedLayer]:
        """Compress a whole model's prompt KV at the end of prefill (default: layer by layer)."""
        return [self.compress_layer(layer) for layer in _checked(layers)]

    def compress_layer(self, layer: LayerKV) -> CompressedLayer:
        raise NotImplementedError(f"{type(self).__name__} compresses the whole model only: call compress(layers)")

    def params(self) -> dict[str, Any]:
        """Hyperparameters as a plain dict (the dataclass fields)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def spec(self) -> str:
        """``name?k=v&...`` with every parameter, for logs and result tables."""
        p = self.params()
        return self.name + ("?" + "&".join(f"{k}={v}" for k, v in p.items()) if p else "")


@dataclass
class DecodeState:
    """Per-layer running state of a decode-time evictor; every token-aligned tensor follows the cache."""

    budget: int
    step: int = 0
    scores: Tensor | None = None  # [B, H, n] running scores (H2O: accumulated attention)
    history: Tensor | None = None  # [B, H, w, n] recent per-step flags (Scissorhands)


@dataclass
class Evictor(KVMethod):
    """Score-based token eviction: ``score`` gives ``[B, H, N]`` (higher = keep), ``protected`` the forced keeps
    (sinks, windows); the shared top-k keeps exactly the budget per head. Ties go to later positions."""

    compression_ratio: float = 0.0  # fraction of tokens REMOVED (0.5 keeps half)
    token_budget: int | None = None  # or: tokens kept per head (exactly one of the two)

    def __post_init__(self) -> None:
        r = self.compression_ratio
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0.0 <= r < 1.0:
            raise ConfigError(f"{self.name}: compression_ratio must be in [0, 1), got {r!r}")
        if self.token_budget is not None:
            if isinstance(self.token_budget, bool) or not isinstance(self.token_budget, int) or self.token_budget < 1:
                raise ConfigError(f"{self.name}: token_budget must be an int >= 1, got {self.token_budget!r}")
            if r != 0.0:
                raise ConfigError(f"{self.name}: give compression_ratio or token_budget, not both")
            need, what = self.forced_keeps()
            if self.token_budget < need:
                raise ConfigError(f"{self.name}: token_budget {self.token_budget} < {need} ({what})")

    # -- what a method defines -------------------------------------------------------------------------------
    def forced_keeps(self) -> tuple[int, str]:
        """(tokens always kept, what they are): a ``token_budget`` must be at least that."""
        return 1, "at least one token"

    def score(self, layer: LayerKV) -> Tensor:
        """Raw scores ``[B, H, N]`` (float, higher = keep); forced keeps come from :meth:`protected`."""
        raise NotImplementedError

    def protected(self, n: int, budget: int, device: torch.device) -> Tensor | None:
        """Bool ``[n]`` of positions always kept (given the layer's budget), or None."""
        return None

    # -- budgets and selection ---------------------------------------------------------------------------------
    def budget(self, n: int) -> int:
        """Tokens kept per head for a prompt of ``n``: ``min(n, token_budget)`` or ``round_half_up(n*(1-ratio))``."""
        return uniform_budget(n, self.compression_ratio, self.token_budget)

    def head_budgets(self, layers: Sequence[LayerKV], scores: Sequence[Tensor]) -> list[Tensor]:
        """Kept tokens per head, one ``[H]`` long tensor per layer (default: the uniform budget)."""
        return [torch.full((la.heads,), self.budget(la.length), dtype=torch.long) for la in layers]

    def compress(self, layers: Sequence[LayerKV]) -> list[CompressedLayer]:
        layers = _checked(layers)
        if all(self.budget(la.length) >= la.length for la in layers):
            return [full_layer(la) for la in layers]
        scores = [self.score(la) for la in layers]
        budgets = self.head_budgets(layers, scores)
        return [self.select(la, s, b) for la, s, b in zip(layers, scores, budgets, strict=True)]

    def select(self, layer: LayerKV, scores: Tensor, budgets: Tensor) -> CompressedLayer:
        """Keep the top ``budgets[h]`` tokens of each head (protected first) and gather them."""
        n = layer.length
        prot = self.protected(n, int(budgets.max()), layer.keys.device)
        idx, valid = topk_keep(_force(scores, prot), budgets.to(layer.keys.device))
        return gather_kept(layer, idx, valid, scores)

    # -- decode-time eviction ----------------------------------------------------------------------------------
    decode_needs_queries: ClassVar[bool] = False
    running_scores: ClassVar[bool] = False  # decode scores accumulate over steps (seeded from the prefill)

    def new_state(self, budget: int | None = None, prefill: CompressedLayer | None = None) -> DecodeState:
        """Running state for one layer's decode. ``budget`` defaults to ``token_budget``, else to the prefill's
        kept count; ``prefill`` seeds running scores (H2O carries the prompt's accumulated attention)."""
        if not self.supports_decode:
            raise NotImplementedError(f"{self.name} is a prefill-only method")
        if budget is None:
            budget = self.token_budget
        if budget is None and prefill is not None:
            budget = int(prefill.kept.max())
        if budget is None or budget < 1:
            raise ConfigError(f"{self.name}: decode needs a budget: set token_budget or pass budget=")
        scores = prefill.scores if self.running_scores and prefill is not None else None
        if scores is not None and prefill is not None and prefill.keep is not None:
            scores = scores.masked_fill(~prefill.keep, 0.0)
        return DecodeState(budget=budget, scores=scores)

    def decode_scores(self, layer: LayerKV, state: DecodeState) -> Tensor:
        """Scores over the current cache (newest token last); may update running statistics in ``state``."""
        return self.score(layer)

    def decode_select(self, layer: LayerKV, state: DecodeState) -> Tensor:
        """Call once per decode step after appending the newest token (``layer.queries`` = its query, W = 1).

        Returns ``[B, H, k]`` cache slots to keep, ascending: all ``n`` slots while ``n <= budget``, else exactly
        ``budget``. ``state`` follows the returned selection (apply it before the next call)."""
        if not self.supports_decode:
            raise NotImplementedError(f"{self.name} is a prefill-only method")
        layer.check()
        if self.decode_needs_queries and layer.queries is None and layer.attentions is None:
            raise ValueError(f"{self.name}: decode_select needs the current query (layer.queries)")
        n, b, h = layer.length, layer.batch, layer.heads
        raw = self.decode_scores(layer, state)
        state.step += 1
        if n <= state.budget:
            return torch.arange(n, device=layer.keys.device).expand(b, h, n)
        budgets = torch.full((h,), state.budget, dtype=torch.long, device=layer.keys.device)
        idx, _ = topk_keep(_force(raw, self.protected(n, state.budget, layer.keys.device)), budgets)
        _follow(state, idx)
        return idx


def _force(scores: Tensor, prot: Tensor | None) -> Tensor:
    s = scores.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, -math.inf), s)
    if prot is not None:
        s = s.masked_fill(prot, math.inf)
    return s


def topk_keep(scores: Tensor, budgets: Tensor) -> tuple[Tensor, Tensor]:
    """Top ``budgets[h]`` of ``scores [B, H, N]`` per head; ties prefer later positions.

    Returns ``indices [B, H, K]`` (K = max budget) ascending, with -1 padding at the end of heads that keep
    fewer, and the ``valid`` mask.
    """
    b, h, n = scores.shape
    k = int(budgets.max()) if budgets.numel() else 0
    k = min(k, n)
    # stable descending sort of the reversed sequence: among equal scores, later positions come first
    order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[..., :k]
    idx = (n - 1) - order
    rank = torch.arange(k, device=scores.device)
    valid = rank.view(1, 1, k) < budgets.to(scores.device).view(1, h, 1)
    idx = torch.where(valid, idx, torch.full_like(idx, n)).sort(dim=-1).values
    valid = idx < n
    return torch.where(valid, idx, torch.full_like(idx, -1)), valid


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, H, N, *]`` at ``idx [B, H, K]`` (negative = padding, gives zeros)."""
    safe = idx.clamp_min(0)
    view = safe.view(*safe.shape, *([1] * (x.ndim - 3))).expand(*safe.shape, *x.shape[3:])
    out = x.gather(2, view)
    if (idx < 0).any():
        out = out.masked_fill((idx < 0).view(*idx.shape, *([1] * (x.ndim - 3))), 0)
    return out


def gather_kept(layer: LayerKV, idx: Tensor, valid: Tensor, scores: Tensor | None) -> CompressedLayer:
    keys = gather_tokens(layer.keys, idx)
    values = gather_tokens(layer.values, idx)
    kept_scores = gather_tokens(scores.float(), idx) if scores is not None else None
    uniform = bool(valid.all())
    entries = int(valid.sum())
    nbytes = raw_bytes(layer.keys, layer.values, entries, indexed=entries < idx.shape[0] * idx.shape[1] * layer.length)
    return CompressedLayer(keys, values, None if uniform else valid, nbytes, idx, kept_scores)


def _follow(state: DecodeState, idx: Tensor) -> None:
    if state.scores is not None:
        state.scores = state.scores.gather(-1, idx)
    if state.history is not None:
        hist = state.history
        state.history = hist.gather(-1, idx.unsqueeze(2).expand(-1, -1, hist.shape[2], -1))


def _checked(layers: Sequence[LayerKV]) -> list[LayerKV]:
    layers = list(layers)
    if not layers:
        raise ValueError("no layers given")
    for la in layers:
        la.check()
    return layers


def same_length(name: str, layers: Sequence[LayerKV]) -> int:
    """Whole-model methods need every layer to hold the same tokens."""
    lengths = {la.length for la in layers}
    if len(lengths) != 1:
        raise ValueError(f"{name}: all layers must hold the same number of tokens, got {sorted(lengths)}")
    return lengths.pop()


@dataclass
class Transform(KVMethod):
    """Rewrites the kept KV of a layer (quantization, channel pruning); composes after an :class:`Evictor`."""

    def compress_layer(self, layer: LayerKV) -> CompressedLayer:
        return self.apply(layer)

    def apply(self, layer: LayerKV, keep: Tensor | None = None) -> CompressedLayer:
        """``keep [B, H, K]`` marks visible entries (visible first in each head, as evictors return them)."""
        raise NotImplementedError


@dataclass
class Quantizer(Transform):
    """Quantizes K/V; ``apply`` returns the dequantized tensors and the true stored ``nbytes``."""


def visible_lengths(layer: LayerKV, keep: Tensor | None) -> Tensor:
    """Visible entries per (batch, head) ``[B, H]``."""
    if keep is None:
        return torch.full((layer.batch, layer.heads), layer.length, dtype=torch.long, device=layer.keys.device)
    return keep.sum(-1).to(layer.keys.device)


def slots(layer: LayerKV) -> Tensor:
    """Slot index ``[1, 1, N]`` for masks against per-head lengths ``[B, H, 1]``."""
    return torch.arange(layer.length, device=layer.keys.device).view(1, 1, -1)
