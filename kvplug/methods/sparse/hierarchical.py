"""Hierarchical top-k: coarse super-blocks first, then blocks inside the chosen ones, plus pooled tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.sparse.base import Growing, SparseMethod, SparseState


@dataclass
class HierarchicalTopK(SparseMethod):
    """Log-linear sparse attention (Zhou et al., 2025, arXiv 2512.16615, "LLSA"), as a training-free causal decoder.

    Keys are mean-pooled per block (level 1, the unit) and per super-block of ``super_tokens`` tokens (level 2,
    the paper's B^2 = 256). The query scores every super-block, keeps the top ``top_super`` (paper top-K = 8; at
    least enough to hold twice the budget), then scores only the blocks inside them and keeps the top ones within
    the budget: selection cost grows with ``N / super + top_super * super / block``, not ``N``. With ``pooled``
    (the paper's KV enrichment) the query also attends, weighted by the tokens each stands for, the pooled key and
    value of every unselected block inside the expanded super-blocks and of every other super-block. Unlike the
    trained model of the paper, no context is counted twice (a block attended in full is not also pooled).
    """

    budget: int = 1024
    block_size: int = 16
    super_tokens: int = 256
    top_super: int = 8
    pooled: bool = True
    sink_tokens: int = 32
    recent_tokens: int = 32
    dense_layers: int = 0
    reuse_threshold: float | None = None
    group_reduce: str = "max"

    name = "hierarchical"

    def validate(self) -> None:
        super().validate()
        for f in ("block_size", "super_tokens", "top_super"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"hierarchical: {f} must be a positive integer, got {v!r}")

    @property
    def needs_values(self) -> bool:
        return self.pooled

    def _per_super(self, state: SparseState) -> int:
        return max(1, self.super_tokens // state.unit)

    def append(self, state: SparseState, keys: Tensor, values: Tensor | None, token_ids: Sequence[int] | None) -> None:
        t, h, d = keys.shape
        u = state.unit
        if t % u:
            raise ValueError(f"hierarchical: append {t} tokens, not a multiple of the unit {u}")
        if t == 0:
            return
        sm = state.summaries
        fields_ = ("k",) + (("v",) if self.pooled else ())
        if "k1" not in sm:
            for f in fields_:
                sm[f + "1"] = Growing(h, (d,), state.device, state.dtype)
                sm[f + "2"] = Growing(h, (d,), state.device, state.dtype)  # per super-block sums
        if self.pooled and values is None:
            raise ValueError("hierarchical with pooled=True needs the values")
        m, n0, ps = t // u, state.n_units, self._per_super(state)
        n2 = math.ceil((n0 + m) / ps)
        sid = torch.arange(n0, n0 + m, device=state.device) // ps
        for f, x in zip(fields_, (keys, values), strict=False):
            assert x is not None
            mean = x.to(state.device, state.dtype).view(m, u, h, d).mean(1).transpose(0, 1)  # [H, m, D]
            sm[f + "1"].extend(mean)
            sums = sm[f + "2"]
            if sums.n < n2:
                sums.extend(mean.new_zeros(h, n2 - sums.n, d))
            sums.data.index_add_(1, sid, mean)
        state.n_units += m

    def _level2(self, state: SparseState, field: str) -> tuple[Tensor, Tensor]:
        """Means ``[H, N2, D]`` of ``field`` (``k`` or ``v``) over each super-block's summarised units, and the
        unit count of each super-block ``[N2]``."""
        sums = state.summaries[field + "2"].data
        ps = self._per_super(state)
        n2 = sums.shape[1]
        counts = torch.full((n2,), ps, device=sums.device, dtype=sums.dtype)
        counts[-1] = state.n_units - (n2 - 1) * ps
        return sums / counts.view(1, -1, 1), counts

    def unit_scores(self, q: Tensor, state: SparseState, k: int) -> Tensor:
        h = state.heads
        n = state.n_units
        ps = self._per_super(state)
        k2, _ = self._level2(state, "k")
        s2 = torch.matmul(q.float().view(h, -1, q.shape[-1]), k2.float().transpose(1, 2))  # [H, G, N2]
        s2 = s2.amax(1) if self.group_reduce == "max" else s2.sum(1)
        n2 = s2.shape[1]
        top = max(self.top_super, math.ceil(2 * k / ps))
        scores = torch.full((h, n), float("-inf"), device=q.device)
        if top >= n2:
            chosen = torch.ones(h, n2, dtype=torch.bool, device=q.device)
            cand = torch.arange(n, device=q.device).expand(h, n)
        else:
            sup = torch.topk(s2, top, dim=-1).indices  # [H, top]
            chosen = torch.zeros(h, n2, dtype=torch.bool, device=q.device).scatter_(1, sup, True)
            cand = (sup.unsqueeze(-1) * ps + torch.arange(ps, device=q.device)).flatten(1)  # [H, top * ps]
            cand = cand.clamp(max=n - 1)  # the last super-block may hold fewer units (duplicates are harmless)
        k1 = state.summaries["k1"].data
        kc = torch.gather(k1, 1, cand.unsqueeze(-1).expand(-1, -1, k1.shape[-1]))  # [H, C, D]
        s1 = torch.matmul(q.float().view(h, -1, q.shape[-1]), kc.float().transpose(1, 2))  # [H, G, C]
        s1 = s1.amax(1) if self.group_reduce == "max" else s1.sum(1)
        scores.scatter_(1, cand, s1)
        state.summaries["_chosen_super"] = chosen
        return scores

    def extras(self, q: Tensor, state: SparseState, units: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        if not self.pooled:
            return None
        h, n, u = state.heads, state.n_units, state.unit
        ps = self._per_super(state)
        sel = torch.zeros(h, n, dtype=torch.bool, device=units.device).scatter_(1, units, True)
        n2 = math.ceil(n / ps)
        chosen = state.summaries.get("_chosen_super")
        if chosen is None or chosen.shape[1] != n2:  # a reused ranking: expand only where units are selected
            chosen = torch.zeros(h, n2, dtype=torch.bool, device=units.device)
        super_of = torch.arange(n, device=units.device) // ps
        touched = torch.zeros(h, n2, dtype=torch.bool, device=units.device).index_put_(
            (torch.arange(h, device=units.device).view(-1, 1).expand(-1, n)[sel], super_of.expand(h, n)[sel]),
            torch.tensor(True, device=units.device),
        )
        expanded = chosen | touched
        e1 = ~sel & expanded[:, super_of]  # unselected blocks of expanded super-blocks: level-1 pooled tokens
        e2 = ~expanded  # other super-blocks: one level-2 pooled token each
        k2, counts = self._level2(state, "k")
        v2, _ = self._level2(state, "v")
        ck = torch.cat([state.summaries["k1"].data, k2], dim=1)  # [H, N + N2, D]
        cv = torch.cat([state.summaries["v1"].data, v2], dim=1)
        logw = torch.cat([torch.full((n,), math.log(u), device=ck.device), (counts * u).log()]).expand(h, -1)
        mask = torch.cat([e1, e2], dim=1)
        e = int(mask.sum(1).max())
        if e == 0:
            return None
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :e]  # masked entries first
        take = torch.gather(mask, 1, order)
        d = ck.shape[-1]
        ek = torch.gather(ck, 1, order.unsqueeze(-1).expand(-1, -1, d))
        ev = torch.gather(cv, 1, order.unsqueeze(-1).expand(-1, -1, d))
        el = torch.gather(logw, 1, order).masked_fill(~take, float("-inf"))
        return ek, ev, el
