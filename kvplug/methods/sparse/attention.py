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
