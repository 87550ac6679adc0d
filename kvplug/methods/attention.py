"""Attention probabilities that scoring methods need, computed directly and never as an N x N matrix.

``window_attention``: the last W queries against all N keys (causal inside the window), ``[B, H, G, W, N]``.
``accumulated_attention``: the column sums over any number of query rows, computed in row blocks so memory
stays ``O(block * N)`` per head. GQA: queries ``[B, H*G, W, D]`` are grouped per KV head (``G`` axis); methods
reduce over it (usually the mean).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kvplug.methods.base import LayerKV

BLOCK_ROWS = 256


def grouped(queries: Tensor, kv_heads: int) -> Tensor:
    """``[B, H*G, W, D]`` -> ``[B, H, G, W, D]`` (query heads of one KV group are adjacent, as in HF repeat_kv)."""
    b, hq, w, d = queries.shape
    if hq % kv_heads:
        raise ValueError(f"{hq} query heads do not group over {kv_heads} KV heads")
    return queries.reshape(b, kv_heads, hq // kv_heads, w, d)


def _probs(q: Tensor, keys: Tensor, scale: float, qpos: Tensor) -> Tensor:
    """Softmax of ``q [B, H, G, R, D]`` against ``keys [B, H, M, D]``, masking keys after each row's position."""
    b, h, g, r, d = q.shape
    m = keys.shape[2]
    logits = torch.matmul(q.reshape(b, h, g * r, d), keys.transpose(-1, -2)).reshape(b, h, g, r, m) * scale
    future = torch.arange(m, device=keys.device).view(1, m) > qpos.view(r, 1)
    if future.any():
        logits = logits.masked_fill(future, float("-inf"))
    return torch.softmax(logits, dim=-1)


def window_attention(queries: Tensor, keys: Tensor, scaling: float | None = None, causal: bool = True) -> Tensor:
    """Probabilities ``[B, H, G, W, N]`` (float32) of the W queries, the last W positions of the N keys."""
    n, d = keys.shape[2], keys.shape[3]
    w = queries.shape[2]
    scale = scaling if scaling is not None else d**-0.5
    q = grouped(queries, keys.shape[1]).float()
    qpos = torch.arange(n - w, n, device=keys.device) if causal else torch.full((w,), n, device=keys.device)
    return _probs(q, keys.float(), scale, qpos)


def attention_blocks(
    queries: Tensor, keys: Tensor, scaling: float | None = None, block: int = BLOCK_ROWS
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(row0, probs [B, H, G, rows, M])`` over blocks of the W queries (the last W positions), causal;
    ``M = row0 + rows + N - W`` (keys after the block's last row are left out, they get zero)."""
    n, d = keys.shape[2], keys.shape[3]
    w = queries.shape[2]
    scale = scaling if scaling is not None else d**-0.5
    q = grouped(queries, keys.shape[1])
    kf = keys.float()
    for r0 in range(0, w, block):
        r1 = min(w, r0 + block)
        m = n - w + r1
        qpos = torch.arange(n - w + r0, n - w + r1, device=keys.device)
        yield r0, _probs(q[:, :, :, r0:r1].float(), kf[:, :, :m], scale, qpos)


def accumulated_attention(
    queries: Tensor, keys: Tensor, scaling: float | None = None, block: int = BLOCK_ROWS
) -> Tensor:
    """Attention each key received, summed over the W query rows (the last W positions, causal): ``[B, H, G, N]``
    float32. Row blocks of ``block``: the softmax is done in place and the rows are summed with one batched
    matrix-vector product, so a block costs one ``[G*block, N]`` buffer per KV head."""
    b, h, n, d = keys.shape
    w = queries.shape[2]
    scale = scaling if scaling is not None else d**-0.5
    q = grouped(queries, h)
    g = q.shape[2]
    kt = keys.float().transpose(-1, -2)
    acc = torch.zeros(b, h, g, n, dtype=torch.float32, device=keys.device)
    for r0 in range(0, w, block):
        r1 = min(w, r0 + block)
        rows, m = r1 - r0, n - w + r1
        qb = q[:, :, :, r0:r1].float().reshape(b, h, g * rows, d) * scale
        e = torch.matmul(qb, kt[..., :m]).view(b, h, g, rows, m)
        # row i sits at position m - rows + i: only the last `rows` key columns can lie in its future
        future = torch.ones(rows, rows, dtype=torch.bool, device=keys.device).triu(1)
        e[..., m - rows :].masked_fill_(future, float("-inf"))
        e -= e.amax(dim=-1, keepdim=True)
        e.exp_()
        inv = e.sum(dim=-1).reciprocal_().unsqueeze(-2)  # [B, H, G, 1, rows]
        acc[..., :m] += torch.matmul(inv, e).squeeze(-2)
    return acc


def layer_window_attention(layer: LayerKV, window: int | None) -> Tensor:
    """``[B, H, G, W, N]`` for the last ``window`` rows a :class:`LayerKV` offers (given attentions first)."""
    keys = layer.keys
    att = layer.attentions
    if att is not None:
        rows = att.shape[2] if window is None else min(window, att.shape[2])
        b, hq, _, n = att.shape
        return att[:, :, -rows:].float().reshape(b, keys.shape[1], hq // keys.shape[1], rows, n)
    q = layer.queries
    if q is None:
        raise ValueError(f"{window or 'all'} query rows needed but the layer has neither queries nor attentions")
    rows = q.shape[2] if window is None else min(window, q.shape[2])
    return window_attention(q[:, :, -rows:], keys, layer.scale)


def layer_accumulated_attention(layer: LayerKV, rows: int | None = None, block: int = BLOCK_ROWS) -> Tensor:
    """``[B, H, G, N]`` column sums over the last ``rows`` query rows a :class:`LayerKV` offers (None: all); given
    ``attention_sums`` (every prompt query) are used when all rows are asked for."""
    keys = layer.keys
    sums = layer.attention_sums
    if sums is not None and (rows is None or rows >= layer.length):
        b, hq, n = sums.shape
        return sums.float().reshape(b, keys.shape[1], hq // keys.shape[1], n)
    att = layer.attentions
    if att is not None:
        b, hq, _, n = att.shape
        att = att if rows is None else att[:, :, -rows:]
        return att.float().sum(2).reshape(b, keys.shape[1], hq // keys.shape[1], n)
    q = layer.queries
    if q is None:
        raise ValueError("accumulated attention needs the layer's queries (or attentions)")
    q = q if rows is None else q[:, :, -rows:]
    return accumulated_attention(q, keys, layer.scale, block)


def accumulated_rows(layer: LayerKV, rows: int | None = None) -> int:
    """How many query rows :func:`layer_accumulated_attention` sums for ``rows`` (what the layer offers)."""
    n = layer.length
    if layer.attention_sums is not None and (rows is None or rows >= n):
        return n
    have = layer.attentions.shape[2] if layer.attentions is not None else None
    if have is None:
        if layer.queries is None:
            raise ValueError("accumulated attention needs the layer's queries (or attentions)")
        have = layer.queries.shape[2]
    return have if rows is None else min(rows, have)
