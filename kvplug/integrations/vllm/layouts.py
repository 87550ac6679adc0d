"""Adapters between vLLM's paged per-layer KV tensors and kvplug's ``[2, tokens, kv_heads, head_dim]`` per layer.

vLLM 0.32 hands every attention backend a per-layer logical view ``[num_blocks, kv_heads, block_size, C]`` with
``C = 2 * head_dim``; what ``C`` holds differs:

* ``bhnc-kv`` (FlashAttention, FlashInfer, Triton on CUDA): for each token and head, ``K`` then ``V``
  (``kv_cache.transpose(1, 2).split(head_size, -1)`` in the backends). Any physical stride order works: the
  adapter indexes the logical view.
* ``cpu-vec`` (CPU_ATTN with the ``vec`` ISA): each (block, head) slab of ``block_size * 2 * head_dim``
  values holds ``K`` transposed, ``[head_dim, block_size]``, then ``V`` as ``[block_size, head_dim]``. Verified
  against Hugging Face's KV for SmolLM2 (``tests/test_vllm_layouts.py``).

Nothing here imports vLLM: the adapters are plain torch and tested on synthetic tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


def token_slots(block_ids: torch.Tensor, start: int, end: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, offset in block) of tokens ``start..end-1`` of a request whose blocks are ``block_ids``."""
    t = torch.arange(start, end)
    if end > block_ids.numel() * block_size:
        raise ValueError(f"tokens up to {end} need {-(-end // block_size)} blocks, request has {block_ids.numel()}")
    return block_ids[t // block_size], t % block_size


class LayoutAdapter(ABC):
    """Gather/scatter one layer's KV for a token range of one request."""

    name: str

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim

    @abstractmethod
    def gather(self, kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """A new tensor ``[2, T, H, D]`` with the KV at (block, offset) pairs."""

    @abstractmethod
    def scatter(self, kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, kv: torch.Tensor) -> None:
        """Write ``kv`` ``[2, T, H, D]`` into the (block, offset) slots."""

    def check(self, kv_layer: torch.Tensor) -> None:
        if kv_layer.ndim != 4 or kv_layer.shape[-1] != 2 * self.head_dim:
            raise ValueError(
                f"{self.name}: expected [blocks, heads, block_size, {2 * self.head_dim}], got {tuple(kv_layer.shape)}"
            )


class BHNCAdapter(LayoutAdapter):
    """CUDA backends: content is ``K`` then ``V`` per token and head."""

    name = "bhnc-kv"

    def gather(self, kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        d = self.head_dim
        sel = kv_layer[blocks, :, offsets]  # [T, H, 2D] (advanced indices first)
        return torch.stack([sel[..., :d], sel[..., d:]])

    def scatter(self, kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, kv: torch.Tensor) -> None:
        kv_layer[blocks, :, offsets] = torch.cat([kv[0], kv[1]], dim=-1).to(kv_layer.dtype)


class CpuVecAdapter(LayoutAdapter):
    """CPU_ATTN ``vec`` ISA: per (block, head), ``K^T [D, N]`` then ``V [N, D]``."""

    name = "cpu-vec"

    def _views(self, kv_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not kv_layer.is_contiguous():
            raise ValueError("cpu-vec: the KV cache tensor must be contiguous")
        b, h, n, _ = kv_layer.shape
        d = self.head_dim
        slab = kv_layer.view(b, h, 2, d * n)
        return slab[:, :, 0].unflatten(-1, (d, n)), slab[:, :, 1].unflatten(-1, (n, d))

    def gather(self, kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        kt, v = self._views(kv_layer)
        return torch.stack([kt[blocks, :, :, offsets], v[blocks, :, offsets]])  # both [T, H, D]

    def scatter(self, kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, kv: torch.Tensor) -> None:
        kt, v = self._views(kv_layer)
        kt[blocks, :, :, offsets] = kv[0].to(kv_layer.dtype)
        v[blocks, :, offsets] = kv[1].to(kv_layer.dtype)


ADAPTERS: dict[str, type[LayoutAdapter]] = {a.name: a for a in (BHNCAdapter, CpuVecAdapter)}
CUDA_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")


def adapter_for(backend: str, head_dim: int, cpu_isa: str | None = None) -> LayoutAdapter:
    """The adapter for a vLLM attention backend name; a clear error for an untested one."""
    if backend == "CPU_ATTN":
        if cpu_isa == "vec":
            return CpuVecAdapter(head_dim)
        raise NotImplementedError(
            f"kvplug: CPU_ATTN with ISA {cpu_isa!r} uses a KV layout kvplug has not verified (verified: vec)"
        )
    if backend in CUDA_BACKENDS:
        return BHNCAdapter(head_dim)
    raise NotImplementedError(
        f"kvplug: attention backend {backend!r} is not supported (supported: CPU_ATTN, {', '.join(CUDA_BACKENDS)})"
    )
