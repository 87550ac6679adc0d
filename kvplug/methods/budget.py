"""Budgets: the uniform per-head budget and exact integer allocation over layers or heads."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def uniform_budget(n: int, compression_ratio: float = 0.0, token_budget: int | None = None) -> int:
    """Tokens kept per head for ``n`` tokens: ``min(n, token_budget)``, else ``n * (1 - ratio)`` rounded half up
    (``floor(x + 0.5)``, ``x`` first rounded to 9 decimals so 0.65 * 10 gives 7), at least 1."""
    if token_budget is not None:
        return min(n, token_budget)
    x = round(n * (1.0 - compression_ratio), 9)
    return min(n, max(1, math.floor(x + 0.5)))


def allocate(weights: Sequence[float] | Tensor, total: int, caps: Sequence[int] | Tensor) -> Tensor:
    """Split ``total`` integer units in proportion to ``weights``, each share at most its cap, summing exactly to
    ``total`` (water-filling for the caps, then largest remainders; ties go to the lower index)."""
    w = torch.as_tensor(weights, dtype=torch.float64).clamp_min(0).reshape(-1)
    cap = torch.as_tensor(caps, dtype=torch.long).reshape(-1).expand(w.numel()).clone()
    if total < 0 or total > int(cap.sum()):
        raise ValueError(f"cannot allocate {total} units under caps summing to {int(cap.sum())}")
    if not torch.isfinite(w).all():
        raise ValueError("allocation weights must be finite")
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    share = torch.zeros_like(w)
    free = cap > 0
    left = float(total)
    for _ in range(w.numel() + 1):
        ws = w * free
        if not free.any() or left <= 0:
            break
        if float(ws.sum()) <= 0:  # the free entries have zero weight: spread evenly
            ws = free.double()
        s = left * ws / ws.sum()
        over = free & (s > cap)
        if not over.any():
            share = torch.where(free, s, share)
            break
        share = torch.where(over, cap.double(), share)
        left -= float(cap[over].sum())
        free &= ~over
    out = share.floor().long().clamp(max=cap)
    rest = total - int(out.sum())
    frac = (share - share.floor()).tolist()
    order = sorted(range(w.numel()), key=lambda i: (-frac[i], i))
    while rest > 0:  # terminates: total <= sum(caps)
        for i in order:
            if rest and out[i] < cap[i]:
                out[i] += 1
                rest -= 1
    return out


def pyramid_budgets(num_layers: int, budget: int, window: int, n: int, beta: float = 20.0) -> Tensor:
    """PyramidKV layer budgets (KVCache-Factory ``PyramidKVCluster``): the prefix part ``C = budget - window``
    decreases linearly from ``2C - C/beta`` (layer 0) to ``C/beta`` (last layer); when the top would exceed the
    prefix length ``n - window`` it is capped and the bottom raised so the mean stays ``C``. Each layer then adds
    the window. Sum = ``num_layers * budget`` exactly."""
    window = min(window, budget)
    c = budget - window
    if num_layers == 1 or c == 0:
        return torch.full((num_layers,), budget, dtype=torch.long)
    cap = n - window
    lo = c / beta
    hi = 2 * c - lo
    if hi > cap:
        hi = cap
        lo = 2 * c - cap
    steps = torch.arange(num_layers, dtype=torch.float64)
    linear = hi - steps * (hi - lo) / (num_layers - 1)
    return window + allocate(linear.clamp_min(0), num_layers * c, [cap] * num_layers)
