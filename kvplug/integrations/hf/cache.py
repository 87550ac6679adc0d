"""A transformers ``DynamicCache`` whose full-attention layers can lose tokens and still know where they are.

After a method drops tokens (or rewrites them), the engine must keep three facts straight:

- positions continue from the original length: :meth:`PrunedLayer.get_seq_length` returns the *logical*
  length (tokens seen), so ``generate`` and the model's ``cache_position`` give new tokens their true positions;
- attention uses what is actually held (``keys.shape[-2]`` entries) with a per-head visibility mask when heads
  kept different counts (``keep``): the kvplug attention function (:mod:`.attention`) builds that mask;
- sliding-window layers (Gemma-3's local layers) are left alone: they already hold a bounded window.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer


class PrunedLayer(DynamicLayer):
    """A full-attention cache layer that can be replaced by a compressed one (fewer entries, same positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.logical = 0  # tokens seen: the position of the next token
        self.keep: torch.Tensor | None = None  # [B, H, K] visibility of held entries, None = all visible
        self.pruned = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):  # type: ignore[override]
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.logical += key_states.shape[-2]
        if self.keep is not None:
            b, h, q = key_states.shape[0], key_states.shape[1], key_states.shape[-2]
            self.keep = torch.cat([self.keep, self.keep.new_ones(b, h, q)], dim=-1)
        return keys, values

    def replace(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Hold ``keys``/``values`` ``[B, H, K, D]`` from now on (the logical length does not change)."""
        self.keys, self.values = keys.to(self.dtype), values.to(self.dtype)
        self.keep = None if keep is None or bool(keep.all()) else keep.to(torch.bool)
        self.pruned = True

    @property
    def held(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.logical

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # HF builds one mask per layer type from the first layer of that type; pruned layers build their own
        # (their lengths may differ per layer), so this only has to be consistent for an unpruned cache.
        # transformers < 5.3 passes the cache positions of the new tokens, later versions their count.
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.logical + q, 0

    def truncate(self, length: int) -> None:
        """Drop every held entry after the first ``length`` (undo tokens appended to an unpruned layer)."""
        if self.pruned:
            raise RuntimeError("a compressed layer cannot be truncated")
        if self.held > length:
            self.keys, self.values = self.keys[..., :length, :], self.values[..., :length, :]
        self.logical = min(self.logical, length)

    def crop(self, max_length: int) -> None:  # generation utilities that crop cannot undo an eviction
        if self.pruned:
            raise NotImplementedError("a compressed cache cannot be cropped")
        super().crop(max_length)
        self.logical = self.held

    def reset(self) -> None:
        super().reset()
        self.logical, self.keep, self.pruned = 0, None, False


def layer_types(config: PretrainedConfig) -> list[str]:
    """``full_attention`` / ``sliding_attention`` per layer (all full when the config does not say)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    n = text.num_hidden_layers
    return list(types) if types else ["full_attention"] * n


def make_cache(config: PretrainedConfig) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` with :class:`PrunedLayer` in every full-attention layer."""
    cache = DynamicCache(config=config)
    for i, kind in enumerate(layer_types(config)):
        if kind == "full_attention":
            cache.layers[i] = PrunedLayer()
    return cache
