"""Quest: query-aware page selection from per-page key bounds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kvplug import kernels
from kvplug.errors import ConfigError
from kvplug.methods.sparse.base import Growing, SparseMethod, SparseState


@dataclass
class Quest(SparseMethod):
    """Quest (Tang et al., ICML 2024, "Query-Aware Sparsity for Efficient Long-Context LLM Inference").

    Per page of ``page_size`` tokens and per channel, the min and max key; a page's score is
    ``sum_d max(q_d * kmax_d, q_d * kmin_d)``, an upper bound of ``q . k`` in the page. The top pages fill the token
    budget; the first ``dense_layers`` layers stay dense (official code: page 16, budgets 512-4096, first 2 layers
    dense). A unit larger than a page (vLLM's 32-token block) scores as the max of its pages.
    """

    budget: int = 1024
    page_size: int = 16
    sink_tokens: int = 32
    recent_tokens: int = 32
    dense_layers: int = 2
    reuse_threshold: float | None = None
    group_reduce: str = "max"

    name = "quest"

    def validate(self) -> None:
        super().validate()
        if self.page_size < 1:
            raise ConfigError(f"quest: page_size must be >= 1, got {self.page_size}")

    def _page(self, state: SparseState) -> int:
        return self.page_size if state.unit % self.page_size == 0 else state.unit

    def append(self, state: SparseState, keys: Tensor, values: Tensor | None, token_ids: Sequence[int] | None) -> None:
        t, h, d = keys.shape
        if t % state.unit:
            raise ValueError(f"quest: append {t} tokens, not a multiple of the unit {state.unit}")
        if t == 0:
            return
        if "bounds" not in state.summaries:  # [H, pages, 2D]: the page's max key, then its min key
            state.summaries["bounds"] = Growing(h, (2 * d,), state.device, state.dtype)
        p = self._page(state)
        k = keys.to(state.device, state.dtype).view(t // p, p, h, d).permute(2, 0, 1, 3)  # [H, pages, p, D]
        state.summaries["bounds"].extend(torch.cat([k.amax(2), k.amin(2)], dim=-1))
        state.n_units += t // state.unit

    def unit_scores(self, q: Tensor, state: SparseState, k: int) -> Tensor:
        b = state.summaries["bounds"].data  # [H, pages, 2D]
        h, pages, d2 = b.shape
        d = d2 // 2
        if q.is_cuda:
            kx, kn = b[..., :d].transpose(0, 1), b[..., d:].transpose(0, 1)  # [pages, H, D] views
            n_valid = torch.full((1,), pages, device=q.device)
            s = kernels.block_scores(q.unsqueeze(0), kx, kn, None, n_valid, self.group_reduce)[0]  # [H, pages]
        else:  # the reference formula, fused: [relu(q), min(q, 0)] . [kmax, kmin] in one batched product
            qf = q.float().view(h, -1, d)
            qp = qf.clamp(min=0)
            s = torch.matmul(torch.cat([qp, qf - qp], dim=-1), b.float().transpose(1, 2))  # [H, G, pages]
            s = s.amax(1) if self.group_reduce == "max" else s.sum(1)
        return s.view(h, state.n_units, state.unit // self._page(state)).amax(-1)
