"""KV chunk shapes of real models, ``[layers, 2, tokens, kv_heads, head_dim]``."""

from __future__ import annotations

import torch

SHAPES: dict[str, tuple[int, int, int]] = {
    # name: (layers, kv_heads, head_dim)
    "llama3-8b": (32, 8, 128),
    "smollm2-135m": (30, 3, 64),
}


def kv_shape(model: str, tokens: int = 256) -> tuple[int, int, int, int, int]:
    if model not in SHAPES:
        raise ValueError(f"unknown model shape {model!r}; known: {sorted(SHAPES)}")
    layers, heads, dim = SHAPES[model]
    return (layers, 2, tokens, heads, dim)


def synthetic_kv(model: str, tokens: int = 256, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Random KV with per-channel scales (a rough stand-in where no real model runs)."""
    g = torch.Generator().manual_seed(seed)
    shape = kv_shape(model, tokens)
    scale = torch.rand(shape[-1], generator=g) * 3 + 0.1
    return (torch.randn(shape, generator=g) * scale).to(dtype)
