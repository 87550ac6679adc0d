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
        if "kmax" not in state.summaries:
            state.summaries["kmax"] = Growing(h, (d,), state.device, state.dtype)
            state.summaries["kmin"] = Growing(h, (d,), state.device, state.dtype)
        p = self._page(state)
        k = keys.to(state.device, state.dtype).view(t // p, p, h, d).permute(2, 0, 1, 3)  # [H, pages, p, D]
        state.summaries["kmax"].extend(k.amax(2))
        state.summaries["kmin"].extend(k.amin(2))
        state.n_units += t // state.unit

    def unit_scores(self, q: Tensor, state: SparseState, k: int) -> Tensor:
        kmax = state.summaries["kmax"].data.transpose(0, 1)  # [pages, H, D] view
        kmin = state.summaries["kmin"].data.transpose(0, 1)
        pages = kmax.shape[0]
        n_valid = torch.tensor([pages], device=q.device)
        s = kernels.block_scores(q.unsqueeze(0), kmax, kmin, None, n_valid, self.group_reduce)[0]  # [H, pages]
        per_unit = state.unit // self._page(state)
        return s.view(state.heads, state.n_units, per_unit).amax(-1)
