"""Greedy decoding with transformers under the block masks of kvplug's in-engine eviction: the references that
vLLM with ``kvplug_evict`` must reproduce token for token (docs/engine-eviction.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

Dropped = Callable[[int], Iterable[int]]  # query position -> logical blocks it must not see


def streaming_dropped(num_sinks: int, window: int, block_size: int) -> Dropped:
    """StreamingLLM: a query at ``q`` sees the sink blocks and the blocks from ``floor((q + 1 - window) / bs)``."""
    sink = -(-num_sinks // block_size)
    return lambda q: range(sink, max(sink, (q + 1 - window) // block_size))


def block_mask(total: int, n_prompt: int, block_size: int, dropped: Dropped) -> torch.Tensor:
    """``[total, total]`` additive mask: prompt rows causal; a row ``q`` after the prompt causal minus the blocks
    ``dropped(q)``."""
    mask = torch.full((total, total), float("-inf")).triu(1)
    for q in range(n_prompt, total):
        for b in dropped(q):
            mask[q, b * block_size : (b + 1) * block_size] = float("-inf")
    return mask


@torch.no_grad()
def greedy(model: Any, prompt: list[int], n: int, block_size: int, dropped: Dropped) -> list[int]:
    """``n`` greedy tokens after ``prompt`` under :func:`block_mask`. ``model`` is a transformers causal LM loaded
    with ``attn_implementation="eager"``. The prompt is prefilled once (causal); each new token then runs alone on
    the cache with its row of the mask, which is exact: a token's KV depends only on the mask it had when it was
    the query."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    ids = list(prompt)
    while True:
        ids.append(int(out.logits[0, -1].argmax()))
        if len(ids) - len(prompt) == n:
            return ids[len(prompt) :]
        q = len(ids) - 1
        row = block_mask(q + 1, len(prompt), block_size, dropped)[q : q + 1]
        out = model(
            torch.tensor([[ids[-1]]]),
            past_key_values=cache,
            use_cache=True,
            attention_mask=row[None, None],
            position_ids=torch.tensor([[q]]),
        )


def streaming_greedy(model: Any, prompt: list[int], n: int, num_sinks: int, window: int, block_size: int) -> list[int]:
    """:func:`greedy` under StreamingLLM's block mask."""
    return greedy(model, prompt, n, block_size, streaming_dropped(num_sinks, window, block_size))


def scored_holes(model: Any, prompt: list[int], method: Any, block_size: int) -> tuple[int, ...]:
    """The prompt blocks a score-based method gives up, computed on transformers' prefill (kvplug's HF press
    captures the post-RoPE queries and keys) with the engine's own selection rule."""
    from kvplug.integrations.hf.press import KVPress
    from kvplug.integrations.vllm.evict import blocks_to_drop, layer_token_scores

    with KVPress(model, None, prefill=True, capture_all=True) as press, torch.no_grad():
        model(torch.tensor([prompt]), past_key_values=press.new_cache(), use_cache=True)
        layers = press.prefill_layers(dtype=torch.float32)
    scores = sum(layer_token_scores(method, la) for la in layers)
    return blocks_to_drop(method, scores, len(prompt), block_size)
