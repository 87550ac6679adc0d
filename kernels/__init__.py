"""kvplug kernels: Triton kernels for sparse decode attention and the torch reference each one must match.

``block_scores`` and ``paged_decode_attention`` dispatch to Triton for CUDA tensors when Triton is importable and to
the torch reference otherwise (CPU always runs the reference). ``backend="triton"`` forces the kernel (on CPU only
under ``TRITON_INTERPRET=1``, which is how CI checks kernel logic without a GPU); ``backend="reference"`` forces
the reference.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

from torch import Tensor

from kvplug.kernels import reference

__all__ = ["block_scores", "paged_decode_attention", "reference", "triton_available", "triton_module"]

_TRITON: ModuleType | None = None


def triton_available() -> bool:
    """Triton is importable (it does not say a GPU is present)."""
    return importlib.util.find_spec("triton") is not None


def triton_module() -> ModuleType:
    """:mod:`kvplug.kernels.triton_sparse`, imported on first use (its kernels are defined at import time, when
    Triton reads ``TRITON_INTERPRET``)."""
    global _TRITON
    if _TRITON is None:
        _TRITON = importlib.import_module("kvplug.kernels.triton_sparse")
    return _TRITON


def _use_triton(t: Tensor, backend: str) -> bool:
    if backend == "reference":
        return False
    if backend == "triton":
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    return t.is_cuda and triton_available()


def block_scores(
    q: Tensor,
    kmax: Tensor,
    kmin: Tensor,
    table: Tensor | None,
    n_valid: Tensor,
    group_reduce: str = "max",
    backend: str = "auto",
) -> Tensor:
    """Quest page bounds ``[B, H, N]`` (see :func:`kvplug.kernels.reference.block_scores`)."""
    if group_reduce not in ("max", "sum"):
        raise ValueError(f"group_reduce must be 'max' or 'sum', got {group_reduce!r}")
    if _use_triton(q, backend):
        return triton_module().block_scores(q, kmax, kmin, table, n_valid, group_reduce)
    return reference.block_scores(q, kmax, kmin, table, n_valid, group_reduce)


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
    backend: str = "auto",
    **kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """Decode attention over selected blocks (see :func:`kvplug.kernels.reference.paged_decode_attention`)."""
    if _use_triton(q, backend):
        return triton_module().paged_decode_attention(
            q, k_cache, v_cache, tables, seq_lens, scale, extra_k, extra_v, extra_logw, return_lse, **kwargs
        )
    return reference.paged_decode_attention(
        q, k_cache, v_cache, tables, seq_lens, scale, extra_k, extra_v, extra_logw, return_lse
    )
