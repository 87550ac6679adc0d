"""Torch references for the sparse-attention kernels. Each Triton kernel in :mod:`kvplug.kernels.triton_sparse` must
match the function of the same name here; on CPU these references are what runs.

Shapes (``B`` rows, ``Hq`` query heads, ``H`` KV heads, ``G = Hq // H``, ``D`` head dim, ``bs`` block size):

* page metadata pools ``kmax``/``kmin`` ``[P, H, D]``, indexed by a per-row page table ``[B, N]``;
* a paged KV cache as two 4-D views ``k_cache``/``v_cache`` ``[num_blocks, H, bs, D]`` (any strides: vLLM's CPU
  layout stores ``K`` transposed per block, which is just another stride order);
* a sparse selection as per-(row, KV head) block tables ``[B, H, S]`` plus lengths ``[B, H]``: the first
  ``seq_lens[b, h]`` tokens of the concatenated selected blocks are attended (only the last one may be partial),
  the same convention as a vLLM block table with its sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_scores(
    q: Tensor, kmax: Tensor, kmin: Tensor, table: Tensor | None, n_valid: Tensor, group_reduce: str = "max"
) -> Tensor:
    """Quest's upper bound of ``q . k`` over each page: ``sum_d max(q_d * kmax_d, q_d * kmin_d)``.

    Equal to ``relu(q) . kmax + min(q, 0) . kmin`` (two matrix products). With ``kmin is kmax`` (a mean key per
    page) it is the plain dot product. ``table [B, N]`` lists each row's pages in the pool; ``None`` means every
    row reads the whole pool in order. The query heads of each KV head are reduced with ``group_reduce`` (``max``
    or ``sum``). Returns float32 ``[B, H, N]``; entries at or beyond ``n_valid[b]`` are ``-inf``.
    """
    b, hq, d = q.shape
    h = kmax.shape[1]
    qf = q.float().view(b, h, hq // h, d)
    qp, qn = qf.clamp(min=0), qf.clamp(max=0)
    if table is None:
        n = kmax.shape[0]
        kx = kmax.float().permute(1, 2, 0)  # [H, D, N]
        scores = torch.matmul(qp, kx) + torch.matmul(qn, kx if kmin is kmax else kmin.float().permute(1, 2, 0))
    else:
        n = table.shape[1]
        idx = table.long().clamp(min=0)
        kx = kmax.float()[idx]  # [B, N, H, D]
        kn = kx if kmin is kmax else kmin.float()[idx]
        scores = torch.einsum("bhgd,bnhd->bhgn", qp, kx) + torch.einsum("bhgd,bnhd->bhgn", qn, kn)
    scores = scores.amax(2) if group_reduce == "max" else scores.sum(2)
    valid = torch.arange(n, device=q.device).view(1, 1, n) < n_valid.view(b, 1, 1).to(q.device)
    return scores.masked_fill(~valid, float("-inf"))


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    extra_k: Tensor | None = None,
    extra_v: Tensor | None = None,
    extra_logw: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """One query token per row attending to its selected blocks, per KV head.

    ``q [B, Hq, D]``; ``k_cache``/``v_cache`` ``[num_blocks, H, bs, D]``; ``tables [B, H, S]`` block ids (entries
    past the length are ignored); ``seq_lens [B, H]`` tokens attended. Optional ``extra_k``/``extra_v``
    ``[B, H, E, D]`` with log weights ``extra_logw [B, H, E]`` (``-inf``: unused) are attended too, each counting
    ``exp(logw)`` times (pooled tokens standing for several). Returns ``[B, Hq, D]`` in ``q``'s dtype (and the
    log-sum-exp ``[B, Hq]`` in float32 with ``return_lse``).
    """
    b, hq, d = q.shape
    h, bs = k_cache.shape[1], k_cache.shape[2]
    s = tables.shape[2]
    g = hq // h
    idx = tables.long().clamp(min=0)
    heads = torch.arange(h, device=q.device).view(1, h, 1)
    k = k_cache[idx, heads].float().reshape(b, h, s * bs, d)  # [B, H, S*bs, D]
    v = v_cache[idx, heads].float().reshape(b, h, s * bs, d)
    qf = q.float().view(b, h, g, d)
    logits = torch.einsum("bhgd,bhtd->bhgt", qf, k) * scale
    valid = torch.arange(s * bs, device=q.device).view(1, 1, -1) < seq_lens.to(q.device).view(b, h, 1)
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    if extra_k is not None:
        assert extra_v is not None and extra_logw is not None
        el = torch.einsum("bhgd,bhed->bhge", qf, extra_k.float()) * scale + extra_logw.float().unsqueeze(2)
        logits = torch.cat([logits, el], dim=-1)
        v = torch.cat([v, extra_v.float()], dim=2)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, H, G, 1]
    p = torch.exp(logits - lse).nan_to_num(0.0)
    out = torch.einsum("bhgt,bhtd->bhgd", p, v).reshape(b, hq, d).to(q.dtype)
    if return_lse:
        return out, lse.reshape(b, hq)
    return out


def dense_decode_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Plain attention of one query per row over contiguous ``k, v [B, T, H, D]`` (the dense reference)."""
    b, hq, d = q.shape
    h = k.shape[2]
    qf = q.float().view(b, h, hq // h, d)
    logits = torch.einsum("bhgd,bthd->bhgt", qf, k.float()) * scale
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("bhgt,bthd->bhgd", p, v.float()).reshape(b, hq, d).to(q.dtype)
