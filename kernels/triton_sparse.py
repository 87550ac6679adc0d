"""Triton kernels for sparse decode attention. Each matches the function of the same name in
:mod:`kvplug.kernels.reference` (the tests check it, on CPU under ``TRITON_INTERPRET=1``).

* :func:`block_scores`: Quest page bounds (or mean-key dot products) for every page of every row, one program per
  (row, KV head, tile of pages); the query heads of a KV head are one tile, so GQA costs one pass over the metadata.
* :func:`paged_decode_attention`: one query token per row over per-(row, KV head) lists of selected blocks,
  flash-decoding style: the blocks of a row are split over several programs, each keeping a running max,
  normaliser and accumulator; a short torch step merges the splits (and optional pooled tokens).

Importing this module needs ``triton``; the interpreter flag is read when the kernels are defined (import time).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

_NEG_INF = float("-inf")


def _upcast(dtype: torch.dtype) -> bool:
    """Compute in float32 (exact ``ieee`` dots): for float32 data, and always under the interpreter, whose
    half-precision ``tl.dot`` is wrong (native bf16/fp16 dots are checked on a GPU by bench/sparse_gpu.py)."""
    from triton import knobs

    return dtype == torch.float32 or bool(knobs.runtime.interpret)


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(x, 1)))))


@triton.jit
def _block_scores_kernel(
    Q, KMAX, KMIN, TABLE, NVALID, OUT,
    sq_b, sq_h, sq_d,
    sk_p, sk_h, sk_d,
    sn_p, sn_h, sn_d,
    st_b, st_n,
    so_b, so_h, so_n,
    N,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    REDUCE_MAX: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    nb = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    gmask = offs_g < G
    q = tl.load(
        Q + b * sq_b + (h * G + offs_g)[:, None] * sq_h + offs_d[None, :] * sq_d, mask=gmask[:, None], other=0.0
    ).to(tl.float32)
    nvalid = tl.load(NVALID + b)
    nmask = (offs_n < N) & (offs_n < nvalid)
    pages = tl.load(TABLE + b * st_b + offs_n * st_n, mask=nmask, other=0).to(tl.int64)
    kx = tl.load(KMAX + pages[:, None] * sk_p + h * sk_h + offs_d[None, :] * sk_d, mask=nmask[:, None], other=0.0)
    kn = tl.load(KMIN + pages[:, None] * sn_p + h * sn_h + offs_d[None, :] * sn_d, mask=nmask[:, None], other=0.0)
    qp = tl.maximum(q, 0.0)
    qn = tl.minimum(q, 0.0)
    if UPCAST:
        s = tl.dot(qp, tl.trans(kx.to(tl.float32)), input_precision="ieee")
        s += tl.dot(qn, tl.trans(kn.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(qp.to(kx.dtype), tl.trans(kx)) + tl.dot(qn.to(kn.dtype), tl.trans(kn))
    if REDUCE_MAX:
        r = tl.max(tl.where(gmask[:, None], s, _NEG_INF), axis=0)
    else:
        r = tl.sum(tl.where(gmask[:, None], s, 0.0), axis=0)
    r = tl.where(nmask, r, _NEG_INF)
    tl.store(OUT + b * so_b + h * so_h + offs_n * so_n, r, mask=offs_n < N)


def block_scores(
    q: Tensor, kmax: Tensor, kmin: Tensor, table: Tensor | None, n_valid: Tensor, group_reduce: str = "max"
) -> Tensor:
    """See :func:`kvplug.kernels.reference.block_scores`."""
    b, hq, d = q.shape
    h = kmax.shape[1]
    if table is None:
        table = torch.arange(kmax.shape[0], device=q.device, dtype=torch.int32).expand(b, -1)
    n = table.shape[1]
    if d & (d - 1) or d < 16:
        raise ValueError(f"block_scores: head dim {d} must be a power of two >= 16")
    out = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    if n == 0 or b == 0:
        return out
    g = hq // h
    block_n = min(64, _pow2_at_least(n))
    grid = (b, h, triton.cdiv(n, block_n))
    _block_scores_kernel[grid](
        q, kmax, kmin, table, n_valid.to(device=q.device, dtype=torch.int32), out,
        q.stride(0), q.stride(1), q.stride(2),
        kmax.stride(0), kmax.stride(1), kmax.stride(2),
        kmin.stride(0), kmin.stride(1), kmin.stride(2),
        table.stride(0), table.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        n,
        G=g, BLOCK_G=_pow2_at_least(g), BLOCK_N=block_n, D=d,
        REDUCE_MAX=group_reduce == "max", UPCAST=_upcast(kmax.dtype),
    )  # fmt: skip
    return out


@triton.jit
def _paged_decode_kernel(
    Q, K, V, TABLES, SEQ_LENS, M_OUT, L_OUT, ACC_OUT,
    sq_b, sq_h, sq_d,
    sk_n, sk_h, sk_t, sk_d,
    sv_n, sv_h, sv_t, sv_d,
    st_b, st_h, st_s,
    ss_b, ss_h,
    sm_b, sm_h, sm_s,
    sa_b, sa_h, sa_s, sa_g,
    scale, BLOCKS_PER_SPLIT,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, BS)
    gmask = offs_g < G
    seq_len = tl.load(SEQ_LENS + b * ss_b + h * ss_h)
    n_blocks = (seq_len + BS - 1) // BS  # not tl.cdiv: a jit helper, not interpretable once triton is loaded
    start = sp * BLOCKS_PER_SPLIT
    end = tl.minimum(start + BLOCKS_PER_SPLIT, n_blocks)
    q = tl.load(
        Q + b * sq_b + (h * G + offs_g)[:, None] * sq_h + offs_d[None, :] * sq_d, mask=gmask[:, None], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32) * scale
    else:
        q = (q.to(tl.float32) * scale).to(q.dtype)
    m_i = tl.full([BLOCK_G], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for i in range(start, end):
        blk = tl.load(TABLES + b * st_b + h * st_h + i * st_s).to(tl.int64)
        tmask = i * BS + offs_t < seq_len
        k = tl.load(
            K + blk * sk_n + h * sk_h + offs_t[:, None] * sk_t + offs_d[None, :] * sk_d, mask=tmask[:, None], other=0.0
        )
        v = tl.load(
            V + blk * sv_n + h * sv_h + offs_t[:, None] * sv_t + offs_d[None, :] * sv_d, mask=tmask[:, None], other=0.0
        )
        if UPCAST:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(tmask[None, :], s, _NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    tl.store(M_OUT + b * sm_b + h * sm_h + sp * sm_s + offs_g, m_i)
    tl.store(L_OUT + b * sm_b + h * sm_h + sp * sm_s + offs_g, l_i)
    tl.store(ACC_OUT + b * sa_b + h * sa_h + sp * sa_s + offs_g[:, None] * sa_g + offs_d[None, :], acc)


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
    blocks_per_split: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """See :func:`kvplug.kernels.reference.paged_decode_attention`."""
    b, hq, d = q.shape
    h, bs = k_cache.shape[1], k_cache.shape[2]
    s = tables.shape[2]
    g = hq // h
    if d & (d - 1) or d < 16 or bs & (bs - 1) or bs < 16:
        raise ValueError(f"paged_decode_attention: head dim {d} and block size {bs} must be powers of two >= 16")
    block_g = _pow2_at_least(g)
    bps = blocks_per_split or max(1, triton.cdiv(s, 16))
    splits = max(1, triton.cdiv(s, bps))
    seq_lens = seq_lens.to(device=q.device, dtype=torch.int32)
    m = torch.empty(b, h, splits, block_g, device=q.device, dtype=torch.float32)
    l_ = torch.empty_like(m)
    acc = torch.empty(b, h, splits, block_g, d, device=q.device, dtype=torch.float32)
    if b:
        _paged_decode_kernel[(b, h, splits)](
            q, k_cache, v_cache, tables, seq_lens, m, l_, acc,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
            tables.stride(0), tables.stride(1), tables.stride(2),
            seq_lens.stride(0), seq_lens.stride(1),
            m.stride(0), m.stride(1), m.stride(2),
            acc.stride(0), acc.stride(1), acc.stride(2), acc.stride(3),
            scale, bps,
            G=g, BLOCK_G=block_g, BS=bs, D=d, UPCAST=_upcast(k_cache.dtype),
        )  # fmt: skip
    m, l_, acc = m[..., :g], l_[..., :g], acc[..., :g, :]  # [B, H, splits, G(, D)]
    if extra_k is not None:
        assert extra_v is not None and extra_logw is not None
        qf = q.float().view(b, h, g, d)
        el = torch.einsum("bhgd,bhed->bhge", qf, extra_k.float()) * scale + extra_logw.float().unsqueeze(2)
        em = el.amax(-1)  # [B, H, G]
        ep = torch.exp(el - em.unsqueeze(-1)).nan_to_num(0.0)
        m = torch.cat([m, em.unsqueeze(2)], dim=2)
        l_ = torch.cat([l_, ep.sum(-1).unsqueeze(2)], dim=2)
        acc = torch.cat([acc, torch.einsum("bhge,bhed->bhgd", ep, extra_v.float()).unsqueeze(2)], dim=2)
    mx = m.amax(2, keepdim=True)
    w = torch.exp(m - mx).nan_to_num(0.0)
    denom = (l_ * w).sum(2)  # [B, H, G]
    out = (acc * w.unsqueeze(-1)).sum(2) / denom.unsqueeze(-1)
    out = out.reshape(b, hq, d).to(q.dtype)
    if return_lse:
        return out, (mx.squeeze(2) + denom.log()).reshape(b, hq)
    return out
