"""RazorAttention: retrieval heads keep everything, the others sinks + a local window + one compensation token."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.attention import layer_window_attention
from kvplug.methods.base import (
    CompressedLayer,
    Evictor,
    LayerKV,
    _checked,
    full_layer,
    gather_kept,
    gather_tokens,
    raw_bytes,
    same_length,
    topk_keep,
)
from kvplug.methods.eviction.baselines import first, recency
from kvplug.methods.registry import register


@register("razorattention")
@dataclass
class RazorAttention(Evictor):
    """RazorAttention (Tang et al., ICLR'25, arXiv 2407.15891): the top ``retrieval_fraction`` of (layer, KV head)
    pairs keep the full KV; the others keep sinks, a local window and a compensation token (mean of the dropped
    K and V). Heads come from ``retrieval_heads`` (an offline echo/induction probe, :func:`classify_heads`) or,
    without it, from an online proxy: the window queries' attention mass outside sinks + local window."""

    retrieval_fraction: float = 0.15
    num_sinks: int = 4
    window_size: int = 32  # observation queries of the online proxy
    compensation: bool = True
    retrieval_heads: tuple[tuple[int, int], ...] | None = None  # (layer_idx, kv_head) pairs
    whole_model = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.retrieval_fraction <= 1.0:
            raise ConfigError(f"razorattention: retrieval_fraction must be in [0, 1], got {self.retrieval_fraction}")
        if self.num_sinks < 0 or self.window_size < 1:
            raise ConfigError("razorattention: num_sinks must be >= 0 and window_size >= 1")
        if self.retrieval_heads is not None:
            self.retrieval_heads = tuple((int(a), int(b)) for a, b in self.retrieval_heads)
        super().__post_init__()

    def forced_keeps(self) -> tuple[int, str]:
        return self.num_sinks + 1, "sinks and one recent token per non-retrieval head"

    @property
    def query_window(self) -> int | None:
        return 0 if self.retrieval_heads is not None else self.window_size

    def score(self, layer: LayerKV) -> Tensor:
        return recency(layer)

    def protected(self, n: int, budget: int, device: torch.device) -> Tensor:
        return first(n, self.num_sinks, device)

    def plan(self, layers: Sequence[LayerKV]) -> Tensor:
        """Per-head budgets ``[L, H]`` (compensation token included) summing to ``L * H * budget``."""
        n = same_length(self.name, layers)
        heads = {la.heads for la in layers}
        if len(heads) != 1:
            raise ValueError(f"razorattention: layers have different KV head counts {sorted(heads)}")
        h = heads.pop()
        num = len(layers) * h
        k = self.budget(n)
        total = num * k
        min_other = min(n, self.num_sinks + 1 + int(self.compensation))
        if self.retrieval_heads is not None:
            wanted = set(self.retrieval_heads)
            is_ret = torch.tensor([[(la.layer_idx, j) in wanted for j in range(h)] for la in layers]).reshape(-1)
            r = int(is_ret.sum())
            if total - r * n < (num - r) * min(min_other, k):
                raise ValueError(f"razorattention: {r} retrieval heads of {n} tokens do not fit a budget of {k}/head")
        else:
            r = max(1, math.floor(self.retrieval_fraction * num + 0.5)) if self.retrieval_fraction > 0 else 0
            while r > 0 and total - r * n < (num - r) * min_other:
                r -= 1
        others = num - r
        base, extra = divmod(total - r * n, others) if others else (0, 0)
        local = max(1, base - self.num_sinks - int(self.compensation))
        remote = torch.cat([self._remote_mass(la, local) for la in layers])  # [L*H]
        if self.retrieval_heads is None:
            order = torch.sort(remote, descending=True, stable=True).indices
            is_ret = torch.zeros(num, dtype=torch.bool)
            is_ret[order[:r]] = True
        budgets = torch.where(is_ret, torch.full((num,), n), torch.full((num,), base))
        if extra:  # one more token to the non-retrieval heads with the most remote attention
            cand = torch.sort(remote.masked_fill(is_ret, -math.inf), descending=True, stable=True).indices[:extra]
            budgets[cand] += 1
        return budgets.reshape(len(layers), h)

    def _remote_mass(self, layer: LayerKV, local: int) -> Tensor:
        if self.retrieval_heads is not None or (layer.queries is None and layer.attentions is None):
            return torch.zeros(layer.heads)
        probs = layer_window_attention(layer, self.window_size).mean(dim=(0, 2, 3))  # [H, N]
        n = layer.length
        pos = torch.arange(n, device=probs.device)
        near = (pos < self.num_sinks) | (pos >= n - local)
        return probs[:, ~near].sum(-1).cpu()

    def compress(self, layers: Sequence[LayerKV]) -> list[CompressedLayer]:
        layers = _checked(layers)
        n = same_length(self.name, layers)
        if self.budget(n) >= n:
            return [full_layer(la) for la in layers]
        if self.retrieval_heads is None:
            for la in layers:
                if la.queries is None and la.attentions is None:
                    raise ValueError("razorattention: the online proxy needs queries; or pass retrieval_heads")
        return [self.select_heads(la, b) for la, b in zip(layers, self.plan(layers), strict=True)]

    def select_heads(self, layer: LayerKV, budgets: Tensor) -> CompressedLayer:
        """Keep sinks + most recent per head; non-retrieval heads spend one slot on the compensation token."""
        n, dev = layer.length, layer.keys.device
        budgets = budgets.to(dev)
        comp = (budgets < n) & (budgets >= 2) if self.compensation else torch.zeros_like(budgets, dtype=torch.bool)
        real = budgets - comp.long()
        scores = recency(layer).masked_fill(first(n, self.num_sinks, dev), math.inf)
        idx, valid = topk_keep(scores, real)
        if not comp.any():
            return gather_kept(layer, idx, valid, None)
        kept_k, kept_v = gather_tokens(layer.keys, idx), gather_tokens(layer.values, idx)
        dropped = (n - real).clamp_min(1).view(1, -1, 1).float()
        mk = ((layer.keys.float().sum(2) - kept_k.float().sum(2)) / dropped).to(layer.keys.dtype)
        mv = ((layer.values.float().sum(2) - kept_v.float().sum(2)) / dropped).to(layer.values.dtype)
        # output slots: the sinks, then the compensation token, then the local window
        out_len = int(budgets.max())
        t = torch.arange(out_len, device=dev).view(1, -1)
        sinks = real.clamp(max=self.num_sinks).view(-1, 1)
        c = comp.view(-1, 1)
        src = torch.where(c & (t > sinks), t - 1, t)
        src = torch.where(c & (t == sinks), torch.full_like(t, idx.shape[-1]), src)
        ok = (t < budgets.view(-1, 1)).expand(layer.batch, -1, -1)
        src = torch.where(ok, src.expand(layer.batch, -1, -1), torch.full_like(src, idx.shape[-1]).expand_as(ok))
        keys = gather_tokens(torch.cat([kept_k, mk.unsqueeze(2)], 2), src).masked_fill(~ok.unsqueeze(-1), 0)
        values = gather_tokens(torch.cat([kept_v, mv.unsqueeze(2)], 2), src).masked_fill(~ok.unsqueeze(-1), 0)
        minus = torch.full_like(idx[..., :1], -1)
        indices = torch.cat([idx, minus], 2).gather(2, src).masked_fill(~ok, -1)
        nbytes = raw_bytes(layer.keys, layer.values, int(ok.sum()), indexed=True)
        return CompressedLayer(keys, values, None if bool(ok.all()) else ok, nbytes, indices, None)


def probe_scores(layer: LayerKV, period: int) -> tuple[Tensor, Tensor]:
    """Echo and induction scores ``[H]`` of one layer run on a probe: random tokens repeated, the second copy
    ending the sequence (``period`` tokens per copy). Needs the queries (or attentions) of the second copy.
    Echo: attention to the same token one period back; induction: to the token after it."""
    probs = layer_window_attention(layer, period).mean(dim=(0, 2))  # [H, W, N]
    n, w = layer.length, probs.shape[1]
    qpos = torch.arange(n - w, n, device=probs.device)
    echo_t = qpos - period
    ok = echo_t >= 0
    ind_t = (echo_t + 1).clamp(max=n - 1)
    rows = torch.arange(w, device=probs.device)[ok]
    echo = probs[:, rows, echo_t[ok]].mean(-1)
    induction = probs[:, rows, ind_t[ok]].mean(-1)
    return echo, induction


def classify_heads(
    echo: Tensor, induction: Tensor, induction_fraction: float = 0.14, echo_fraction: float = 0.01
) -> tuple[tuple[int, int], ...]:
    """Retrieval heads from probe scores ``[L, H]``: the top ``induction_fraction`` by induction plus the top
    ``echo_fraction`` by echo (the paper protects about 14% + 1%). Returns ``(layer_idx, head)`` pairs."""
    num_l, h = induction.shape
    total = num_l * h
    chosen: set[int] = set()
    for scores, frac in ((induction, induction_fraction), (echo, echo_fraction)):
        count = max(1, math.floor(frac * total + 0.5)) if frac > 0 else 0
        chosen.update(torch.sort(scores.reshape(-1), descending=True, stable=True).indices[:count].tolist())
    return tuple(sorted((i // h, i % h) for i in chosen))
