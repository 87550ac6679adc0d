"""KVzip: query-agnostic eviction by context reconstruction (how much each KV pair helps re-read the context)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.attention import grouped
from kvplug.methods.base import Evictor, LayerKV, Replay, same_length
from kvplug.methods.eviction.baselines import first
from kvplug.methods.registry import register


@register("kvzip")
@dataclass
class KVzip(Evictor):
    """KVzip (Kim et al., arXiv 2505.23416): after the prefill the model is asked to repeat the context, chunk by
    chunk (``chunk_size`` tokens); a KV pair's score is the largest attention any reconstruction query (any head
    of its GQA group) pays it. Pairs are pruned by one ranking over all layers and heads (``layerwise=False``,
    the paper's non-uniform budgets) or per layer; the first ``n_sink`` tokens are kept. Defaults and prompts as
    kvpress's KVzipPress; ``suffix`` stands for the chat template's turn marker (plain-completion models)."""

    chunk_size: int = 2048
    n_sink: int = 4
    layerwise: bool = False
    prompt: str = "\n\nRepeat the previous context exactly."
    continue_prompt: str = "\n\nRepeat the part of the previous context exactly, starting with"
    overlap: int = 8  # tokens of the previous chunk quoted after ``continue_prompt``
    suffix: str = "\n"
    needs_replay = True

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.n_sink < 0 or self.overlap < 0:
            raise ConfigError("kvzip: chunk_size must be >= 1, n_sink and overlap >= 0")
        super().__post_init__()

    def forced_keeps(self) -> tuple[int, str]:
        return max(1, self.n_sink), "the sink tokens"

    @property
    def whole_model(self) -> bool:  # type: ignore[override]
        return not self.layerwise

    def replay_inputs(
        self, context_ids: Sequence[int], encode: Callable[[str], list[int]]
    ) -> list[tuple[int, int, list[int]]]:
        """``(start, end, token ids)`` per chunk: the ids the engine runs after the context (on its full KV) to
        reconstruct context tokens ``start:end``."""
        ids = list(context_ids)
        out = []
        suffix = encode(self.suffix) if self.suffix else []
        for i, start in enumerate(range(0, len(ids), self.chunk_size)):
            end = min(len(ids), start + self.chunk_size)
            if i == 0:
                head = encode(self.prompt)
            else:
                head = encode(self.continue_prompt) + ids[max(0, start - self.overlap) : start]
            out.append((start, end, head + suffix + ids[start:end]))
        return out

    def score(self, layer: LayerKV) -> Tensor:
        if not layer.replays:
            raise ValueError("kvzip: needs the reconstruction passes (LayerKV.replays; run replay_inputs first)")
        n = layer.length
        out = torch.zeros(layer.batch, layer.heads, n, device=layer.keys.device)
        for r in layer.replays:
            out[..., r.start : r.end] = self.chunk_scores(layer, r)
        return out

    def chunk_scores(self, layer: LayerKV, r: Replay) -> Tensor:
        """Max attention ``[B, H, end - start]`` of the replay's queries over sinks + the chunk + themselves."""
        sink = min(self.n_sink, r.start)
        keys = torch.cat([layer.keys[:, :, :sink], layer.keys[:, :, r.start : r.end], r.keys.to(layer.keys.dtype)], 2)
        q = grouped(r.queries, layer.heads).float()  # [B, H, G, R, D]
        b, h, g, m, d = q.shape
        logits = torch.matmul(q.reshape(b, h, g * m, d), keys.float().transpose(-1, -2)) * layer.scale
        logits = logits.reshape(b, h, g, m, -1)
        width = keys.shape[2]
        cols = torch.arange(width, device=keys.device)
        future = cols.view(1, -1) > (width - m + torch.arange(m, device=keys.device)).view(-1, 1)  # causal in replay
        probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
        return probs[..., sink : sink + r.end - r.start].amax(dim=(2, 3))

    def protected(self, n: int, budget: int, device: torch.device) -> Tensor:
        return first(n, self.n_sink, device)

    def head_budgets(self, layers: Sequence[LayerKV], scores: Sequence[Tensor]) -> list[Tensor]:
        if self.layerwise:
            return super().head_budgets(layers, scores)
        n = same_length(self.name, layers)
        k = self.budget(n)
        base = min(self.n_sink, k)  # every head keeps its sinks; the rest is one ranking over all of them
        flat = torch.cat([s[..., base:].mean(0).reshape(-1) for s in scores])  # (layer, head, token) order
        total = (k - base) * sum(la.heads for la in layers)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.sort(flat, descending=True, stable=True).indices[:total]] = True
        counts = keep.reshape(len(layers), -1, n - base).sum(-1) + base  # [L, H]
        return [c.long() for c in counts]
