"""Sparse decode attention over contiguous KV (the HF path and the tests): a :class:`Selection` becomes a block table
over the KV seen as blocks of one unit each, and :func:`kvplug.kernels.paged_decode_attention` does the rest."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvplug import kernels
from kvplug.methods.sparse.base import Selection


def attend_contiguous(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    sel: Selection,
    unit: int,
    n_units: int,
    scale: float,
    backend: str = "auto",
) -> Tensor:
    """Attention of one query ``q [Hq, D]`` over ``keys``/``values [T, H, D]`` (``T`` tokens, the query's own
    included): the selected units, the tail (tokens from ``n_units * unit`` on) and ``sel``'s pooled entries."""
    t, h, d = keys.shape
    nb = math.ceil(t / unit)
    pad = nb * unit - t
    if pad:
        keys = torch.cat([keys, keys.new_zeros(pad, h, d)])
        values = torch.cat([values, values.new_zeros(pad, h, d)])
    kc = keys.view(nb, unit, h, d).transpose(1, 2)  # [nb, H, unit, D] (a view)
    vc = values.view(nb, unit, h, d).transpose(1, 2)
    tail = torch.arange(n_units, nb, device=q.device).expand(h, -1)
    table = torch.cat([sel.units.to(q.device), tail], dim=1).to(torch.int32)  # [H, S + tail blocks]
    seq = torch.full((1, h), table.shape[1] * unit - pad, device=q.device, dtype=torch.int32)
    extra = {}
    if sel.extra_k is not None:
        extra = {"extra_k": sel.extra_k[None], "extra_v": sel.extra_v[None], "extra_logw": sel.extra_logw[None]}
    out = kernels.paged_decode_attention(q[None], kc, vc, table[None], seq, scale, backend=backend, **extra)
    assert isinstance(out, Tensor)
    return out[0]


def gather_selected(keys: Tensor, values: Tensor, sel: Selection, unit: int, n_units: int) -> tuple[Tensor, Tensor]:
    """Only what ``sel`` attends, per KV head: ``[H, S * unit + tail, D]`` keys and values gathered from
    ``keys``/``values [T, H, D]`` (which may live in host memory: the gather happens where they are)."""
    t, h, d = keys.shape
    heads = torch.arange(h, device=keys.device).view(h, 1)
    units = sel.units.to(keys.device)
    body = n_units * unit
    kb = keys[:body].view(n_units, unit, h, d).permute(2, 0, 1, 3)  # [H, N, unit, D] view
    vb = values[:body].view(n_units, unit, h, d).permute(2, 0, 1, 3)
    k = torch.cat([kb[heads, units].reshape(h, -1, d), keys[body:t].transpose(0, 1)], dim=1)
    v = torch.cat([vb[heads, units].reshape(h, -1, d), values[body:t].transpose(0, 1)], dim=1)
    return k, v


def attend_gathered(q: Tensor, k: Tensor, v: Tensor, sel: Selection, scale: float) -> Tensor:
    """Attention of ``q [Hq, D]`` over gathered ``k, v [H, L, D]`` (on ``q``'s device) plus ``sel``'s pooled
    entries: the same result as :func:`attend_contiguous` on the full KV."""
    h, _, d = k.shape
    qf = q.float().view(h, -1, d)
    logits = torch.matmul(qf, k.float().transpose(1, 2)) * scale  # [H, G, L]
    vals = v.float()
    if sel.extra_k is not None:
        assert sel.extra_v is not None and sel.extra_logw is not None
        el = torch.matmul(qf, sel.extra_k.float().transpose(1, 2)) * scale + sel.extra_logw.float().unsqueeze(1)
        logits = torch.cat([logits, el], dim=-1)
        vals = torch.cat([vals, sel.extra_v.float()], dim=1)
    return torch.matmul(torch.softmax(logits, dim=-1), vals).reshape(-1, d).to(q.dtype)
