"""From the harness's rows to cells with intervals: per (method, ratio, task, context length), the full cache's
calibration (which cells it passes) and the ranking over the cells it passes.

- accuracy: exact match in percent, Wilson 95% interval; ``ppl`` cells hold next-token accuracy (bootstrap);
- token accuracy (per digit for numbers) and mean answer log-prob: percentile bootstrap 95% intervals over
  samples (seeded: the same rows give the same intervals);
- a (task, length) cell *passes* when the full cache's exact match is at least ``PASS`` (90%); cells it fails
  are reported and never used to rank methods (``ppl`` has no pass mark and is never ranked);
- the ranking pools every sample of the passing cells (exact match, Wilson interval). Two methods differ only
  where their intervals do not overlap: ``tier`` groups methods whose interval overlaps the best remaining one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvplug.eval.stats import bootstrap_mean, overlaps, wilson

PASS = 0.9
RANKED_TASKS = ("needle", "multikey", "multivalue", "qa")


@dataclass
class Cell:
    model: str
    method: str
    ratio: float | None
    task: str
    context: int  # the context length asked for (tokens)
    n: int
    accuracy: float  # exact match % (ppl: next-token accuracy %)
    ci_low: float
    ci_high: float
    logprob: float  # mean answer log-prob
    logprob_ci_low: float
    logprob_ci_high: float
    token_accuracy: float  # % of scored tokens that are the greedy choice (per digit for numbers)
    token_ci_low: float
    token_ci_high: float
    kv_kept: float  # stored bytes after the method / full bf16 KV bytes
    prefill_overhead: float  # (prefill + compression) / prefill
    ppl: float | None = None  # ppl cells: exp(total NLL / total tokens)

    @property
    def logprob_ci(self) -> float:
        """Half-width of the log-prob interval (the larger side: bootstrap intervals need not be symmetric)."""
        return max(self.logprob - self.logprob_ci_low, self.logprob_ci_high - self.logprob)


def rows_of(rows: Iterable[dict[str, Any]], model: str | None = None) -> list[dict[str, Any]]:
    """One model's rows of one setting (mixing settings is refused)."""
    rows = [r for r in rows if model is None or r["model"] == model]
    settings = {r.get("setting") for r in rows}
    if len(settings) > 1:
        raise ValueError(f"results mix {len(settings)} settings ({sorted(map(str, settings))}): one file per setting")
    return rows


def aggregate(rows: Iterable[dict[str, Any]], model: str | None = None) -> list[Cell]:
    """Cells per (method, ratio, task, length) for one model."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows_of(rows, model):
        groups.setdefault((r["model"], r["method"], r["ratio"], r["task"], r["length"]), []).append(r)
    cells = []
    for (mdl, m, ratio, task, length), rs in groups.items():
        n = len(rs)
        tok_acc = [100.0 * r["correct"] / max(r["answer_tokens"], 1) for r in rs]
        t_lo, t_hi = bootstrap_mean(tok_acc)
        lp = [r["logprob"] for r in rs]
        lp_lo, lp_hi = bootstrap_mean(lp)
        if task == "ppl":
            acc, lo, hi = sum(tok_acc) / n, t_lo, t_hi
            ppl = math.exp(sum(r["nll"] for r in rs) / sum(r["answer_tokens"] for r in rs))
        else:
            k = sum(bool(r["exact"]) for r in rs)
            acc = 100.0 * k / n
            lo, hi = (100.0 * x for x in wilson(k, n))
            ppl = None
        cells.append(
            Cell(
                model=mdl,
                method=m,
                ratio=ratio,
                task=task,
                context=length,
                n=n,
                accuracy=acc,
                ci_low=lo,
                ci_high=hi,
                logprob=sum(lp) / n,
                logprob_ci_low=lp_lo,
                logprob_ci_high=lp_hi,
                token_accuracy=sum(tok_acc) / n,
                token_ci_low=t_lo,
                token_ci_high=t_hi,
                kv_kept=sum(r["kv_fraction"] for r in rs) / n,
                prefill_overhead=sum((r["prefill_s"] + r["compress_s"]) / r["prefill_s"] for r in rs) / n,
                ppl=ppl,
            )
        )
    return sorted(cells, key=lambda c: (c.method != "full", c.method, c.ratio or 0.0, c.task, c.context))


def calibration(cells: Sequence[Cell]) -> dict[tuple[str, int], bool]:
    """(task, length) -> whether the full cache passes it (ranked tasks only)."""
    full = [c for c in cells if c.method == "full" and c.task in RANKED_TASKS]
    return {(c.task, c.context): c.accuracy >= 100 * PASS for c in full}


@dataclass
class Rank:
    method: str
    ratio: float | None
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    logprob: float
    logprob_ci_low: float
    logprob_ci_high: float
    kv_kept: float
    prefill_overhead: float
    tier: int = 0
    below_full: bool = False  # interval entirely below the full cache's


def ranking(rows: Iterable[dict[str, Any]], ratio: float, model: str | None = None) -> list[Rank]:
    """Methods at ``ratio`` (ratio-free methods and the full cache included), pooled over the passing cells;
    samples a method lacks in some cell are not pooled (every method is ranked on the samples it ran)."""
    rows = rows_of(rows, model)
    passing = {k for k, ok in calibration(aggregate(rows)).items() if ok}
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for r in rows:
        if (r["task"], r["length"]) in passing and (r["ratio"] is None or r["ratio"] == ratio):
            groups.setdefault((r["method"], r["ratio"]), []).append(r)
    out = []
    for (m, rt), rs in groups.items():
        n = len(rs)
        k = sum(bool(r["exact"]) for r in rs)
        lo, hi = wilson(k, n)
        lp = [r["logprob"] for r in rs]
        lp_lo, lp_hi = bootstrap_mean(lp)
        out.append(
            Rank(
                method=m,
                ratio=rt,
                n=n,
                accuracy=100.0 * k / n,
                ci_low=100.0 * lo,
                ci_high=100.0 * hi,
                logprob=sum(lp) / n,
                logprob_ci_low=lp_lo,
                logprob_ci_high=lp_hi,
                kv_kept=sum(r["kv_fraction"] for r in rs) / n,
                prefill_overhead=sum((r["prefill_s"] + r["compress_s"]) / r["prefill_s"] for r in rs) / n,
            )
        )
    out.sort(key=lambda x: (-x.accuracy, -x.logprob, x.method))
    full = next((x for x in out if x.method == "full"), None)
    tier, left = 0, list(out)
    while left:
        tier += 1
        top = left[0]
        same = [x for x in left if overlaps((x.ci_low, x.ci_high), (top.ci_low, top.ci_high))]
        for x in same:
            x.tier = tier
        left = [x for x in left if x not in same]
    if full is not None:
        for x in out:
            x.below_full = x.ci_high < full.ci_low
    return out


def cells_to_dicts(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    return [{**asdict(c), "logprob_ci": c.logprob_ci} for c in cells]
