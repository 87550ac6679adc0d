"""SentenceKV: sentences as variable-length pages, each summarised by its mean key."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.sparse.base import Growing, SparseMethod, SparseState

#: Sentence-ending tokens of the official code (``run_longbench.py``), matched on each token's decoded text.
PUNCTUATION = (".", "!", "?", ". ", "! ", "? ", "...", "\n\n", "\n\n\n", "。", "！", "？", "。。")


def sentence_end_ids(tokenizer: Any, marks: Iterable[str] = PUNCTUATION) -> frozenset[int]:
    """Ids of the tokens whose text (leading spaces dropped) is one of ``marks`` (a Hugging Face tokenizer)."""
    wanted = set(marks) | {m.strip(" ") for m in marks}
    out = set()
    for tok, i in tokenizer.get_vocab().items():
        if len(tok) > 8:
            continue
        text = tokenizer.convert_tokens_to_string([tok])
        if text in wanted or text.lstrip(" ") in wanted:
            out.add(int(i))
    return frozenset(out)


@dataclass
class SentenceKV(SparseMethod):
    """SentenceKV (Zhu, Falahati, Yang, Amiri, 2025, arXiv 2504.00970, "Efficient LLM Inference via Sentence-Level
    Semantic KV Caching").

    Tokens are grouped into sentences (a sentence ends at a punctuation token: ``. ! ? ... \\n\\n`` ...); each
    sentence is summarised per KV head by its mean key. A decode step ranks sentences by the mean query of the
    sentence being generated and fills the budget with the best ones, plus the first ``sink_tokens`` and last
    ``recent_tokens`` (official code: 32 and 32, all layers, ``length_threshold`` 1: while the generated sentence
    holds at most that many tokens the step attends densely). Here all KV is kept (the paper also compresses the
    prompt SnapKV-style first) and, in an engine whose unit is a block, a block counts as good as the best
    sentence touching it. ``punctuation_ids`` come from the tokenizer (:func:`sentence_end_ids`).
    """

    budget: int = 1024
    sink_tokens: int = 32
    recent_tokens: int = 32
    length_threshold: int = 1
    dense_layers: int = 0
    reuse_threshold: float | None = None
    group_reduce: str = "max"
    punctuation_ids: frozenset[int] = field(default_factory=frozenset)

    name = "sentencekv"

    def validate(self) -> None:
        super().validate()
        if self.length_threshold < 0:
            raise ConfigError(f"sentencekv: length_threshold must be >= 0, got {self.length_threshold}")
        self.punctuation_ids = frozenset(int(i) for i in self.punctuation_ids)

    def append(self, state: SparseState, keys: Tensor, values: Tensor | None, token_ids: Sequence[int] | None) -> None:
        t, h, d = keys.shape
        if t % state.unit:
            raise ValueError(f"sentencekv: append {t} tokens, not a multiple of the unit {state.unit}")
        if t == 0:
            return
        if token_ids is None or len(token_ids) != t:
            raise ValueError("sentencekv: append needs the token ids of the appended tokens")
        sm = state.summaries
        if "ksum" not in sm:
            sm["ksum"] = Growing(h, (d,), state.device, state.dtype)
            sm["count"] = Growing(1, (), state.device, state.dtype)
            sm["cur"], sm["next_new"] = -1, True
        ends = torch.tensor([int(x) in self.punctuation_ids for x in token_ids], device=state.device)
        starts = torch.empty_like(ends)
        starts[0] = bool(sm["next_new"])
        starts[1:] = ends[:-1]
        sid = sm["cur"] + torch.cumsum(starts.long(), 0)
        n_sent = int(sid[-1]) + 1
        for name, tail in (("ksum", (h, d)), ("count", (1,))):
            g = sm[name]
            if g.n < n_sent:
                g.extend(torch.zeros(tail[0], n_sent - g.n, *tail[1:], device=state.device, dtype=state.dtype))
        sm["ksum"].data.index_add_(1, sid, keys.to(state.device, state.dtype).transpose(0, 1))
        sm["count"].data.index_add_(1, sid, torch.ones(1, t, device=state.device, dtype=state.dtype))
        per_unit = sid.view(-1, state.unit)
        if "lo" not in sm:
            sm["lo"] = Growing(1, (), state.device, torch.long)  # first and last sentence touching each unit
            sm["hi"] = Growing(1, (), state.device, torch.long)
            sm["span"] = 1
        sm["lo"].extend(per_unit[:, 0].view(1, -1))
        sm["hi"].extend(per_unit[:, -1].view(1, -1))
        sm["span"] = max(sm["span"], int((per_unit[:, -1] - per_unit[:, 0]).max()) + 1)
        sm["cur"], sm["next_new"] = int(sid[-1]), bool(ends[-1])
        state.n_units += t // state.unit

    def step_query(self, q: Tensor, state: SparseState, token_id: int | None) -> Tensor | None:
        """The mean query of the sentence being generated; ``None`` (dense) while it holds at most
        ``length_threshold`` tokens, and on the step whose input token ends a sentence."""
        sm = state.summaries
        if token_id is not None and int(token_id) in self.punctuation_ids:
            sm["q_sum"], sm["q_n"] = None, 0
            return None
        qs = sm.get("q_sum")
        sm["q_sum"] = q.float().clone() if qs is None else qs + q.float()
        sm["q_n"] = sm.get("q_n", 0) + 1
        if sm["q_n"] <= self.length_threshold:
            return None
        return sm["q_sum"] / sm["q_n"]

    def unit_scores(self, q: Tensor, state: SparseState, k: int) -> Tensor:
        sm = state.summaries
        h = state.heads
        means = sm["ksum"].data / sm["count"].data.view(1, -1, 1)  # [H, S, D]
        s = torch.matmul(q.float().view(h, -1, q.shape[-1]), means.float().transpose(1, 2))  # [H, G, S]
        s = s.amax(1) if self.group_reduce == "max" else s.sum(1)
        lo, hi = sm["lo"].data[0], sm["hi"].data[0]  # sentences touching a unit are the range [lo, hi]
        cols = torch.minimum(lo.view(-1, 1) + torch.arange(sm["span"], device=lo.device), hi.view(-1, 1))
        return s[:, cols].amax(-1)  # [H, N]: a unit is as good as the best sentence touching it
