"""Expected Attention: the attention future queries are expected to pay, from the prompt queries' statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.base import Evictor, LayerKV
from kvplug.methods.eviction.baselines import first
from kvplug.methods.registry import register


@register("expectedattention")
@dataclass
class ExpectedAttention(Evictor):
    """Expected Attention (Devoto et al., arXiv 2510.00636): model the next ``n_future_positions`` queries as a
    Gaussian (mean and covariance of the prompt's pre-RoPE queries, rotated by RoPE averaged over those
    positions); score = ``softmax(k.mu * s + s^2/2 * k^T Sigma k)`` (mean over the GQA group) times ``||v||``;
    the first ``n_sink`` tokens are kept. Defaults as kvpress's ExpectedAttentionPress."""

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if self.n_future_positions < 1 or self.n_sink < 0:
            raise ConfigError("expectedattention: n_future_positions must be >= 1 and n_sink >= 0")
        super().__post_init__()

    def forced_keeps(self) -> tuple[int, str]:
        return max(1, self.n_sink), "the sink tokens"

    @property
    def query_window(self) -> int | None:
        return None  # statistics over every prompt query

    def query_stats(self, layer: LayerKV) -> tuple[Tensor, Tensor | None]:
        """Mean ``[B, H, G, D]`` and covariance ``[B, H, G, D, D]`` of the expected future (post-RoPE) query."""
        if layer.queries is None or layer.rope is None:
            raise ValueError("expectedattention: needs the prompt queries and the model's RoPE (layer.rope)")
        n, d = layer.length, layer.head_dim
        w = layer.queries.shape[2]
        pos = torch.arange(n - w, n, device=layer.queries.device)
        skip = max(0, self.n_sink - (n - w))  # leave out the sink positions' queries (outliers)
        if w - skip < 2:  # a prompt hardly longer than the sinks: use every query
            skip = 0
        q = layer.rope.invert(layer.queries[:, :, skip:], pos[skip:])  # pre-RoPE [B, Hq, W', D]
        mu = q.mean(dim=2)
        cov = None
        if self.use_covariance:
            c = q - mu.unsqueeze(2)
            cov = torch.einsum("bhni,bhnj->bhij", c, c) / q.shape[2]
        rot = layer.rope.mean_rotation(torch.arange(n, n + self.n_future_positions), d).to(q.device)
        mu = mu @ rot.T
        if cov is not None:
            cov = rot @ cov @ rot.T
        g = q.shape[1] // layer.heads
        b = q.shape[0]
        mu = mu.reshape(b, layer.heads, g, d)
        return mu, None if cov is None else cov.reshape(b, layer.heads, g, d, d)

    def score(self, layer: LayerKV) -> Tensor:
        n, s = layer.length, min(self.n_sink, layer.length)
        mu, cov = self.query_stats(layer)
        k = layer.keys[:, :, s:].float()  # [B, H, M, D]
        scale = layer.scale
        logits = torch.einsum("bhmd,bhgd->bhgm", k, mu) * scale
        if cov is not None:
            logits = logits + torch.einsum("bhmi,bhgij,bhmj->bhgm", k, cov, k) * (scale * scale / 2)
        probs = torch.softmax(logits, dim=-1).mean(dim=2)  # [B, H, M]
        if self.use_vnorm:
            probs = (probs + self.epsilon) * layer.values[:, :, s:].float().norm(dim=-1)
        out = torch.zeros(layer.batch, layer.heads, n, device=probs.device)
        out[..., s:] = probs
        return out

    def protected(self, n: int, budget: int, device: torch.device) -> Tensor:
        return first(n, self.n_sink, device)
