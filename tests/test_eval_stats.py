"""The harness's statistics and bookkeeping without a model: intervals, cells, calibration, ranking, resume."""

from __future__ import annotations

import json
import math
import random

import pytest

from kvplug.eval.harness import Results, Suite, plan, setting_of
from kvplug.eval.stats import bootstrap_mean, overlaps, wilson
from kvplug.eval.summary import aggregate, calibration, ranking


def test_wilson_matches_known_values_and_edges():
    # reference values of the Wilson score interval (z = 1.96)
    lo, hi = wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    lo, hi = wilson(0, 100)
    assert lo == 0.0 and hi == pytest.approx(0.0370, abs=1e-4)
    lo, hi = wilson(100, 100)
    assert hi == 1.0 and lo == pytest.approx(0.9630, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson(5, 4)
    # 100 samples: an interval about +-10 points at 50%, so 25-point steps of 4-sample tables are gone
    lo, hi = wilson(50, 100)
    assert 0.18 < hi - lo < 0.21


def test_wilson_coverage_is_about_95_percent():
    rng = random.Random(0)
    p, n, hits = 0.8, 100, 0
    for _ in range(2000):
        k = sum(rng.random() < p for _ in range(n))
        lo, hi = wilson(k, n)
        hits += lo <= p <= hi
    assert 0.93 < hits / 2000 < 0.97


def test_bootstrap_mean_is_deterministic_and_brackets_the_mean():
    rng = random.Random(1)
    vals = [rng.gauss(-0.5, 0.3) for _ in range(100)]
    a, b = bootstrap_mean(vals), bootstrap_mean(vals)
    assert a == b
    mean = sum(vals) / len(vals)
    assert a[0] < mean < a[1]
    se = 0.3 / math.sqrt(100)
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert bootstrap_mean([2.0]) == (2.0, 2.0) and bootstrap_mean([1.0, 1.0]) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_mean([])
    assert overlaps((0, 1), (1, 2)) and not overlaps((0, 1), (1.1, 2))


def row(method, ratio, task, length, i, exact, lp=-0.5, setting="s"):
    return {
        "model": "m", "setting": setting, "task": task, "sid": f"L{length}-{i}", "length": length, "method": method,
        "ratio": ratio, "exact": exact, "correct": 5 if exact else 3, "answer_tokens": 5, "logprob": lp,
        "nll": -5 * lp, "kv_fraction": 1.0 if method == "full" else 0.5, "prefill_s": 1.0, "compress_s": 0.1,
        "score_s": 0.01,
    }  # fmt: skip


def synthetic_rows():
    """Full passes needle (98%) and fails qa (40%); method a ~ full, b clearly worse, c between."""
    rows = []
    for i in range(100):
        rows.append(row("full", None, "needle", 1024, i, i >= 2))
        rows.append(row("full", None, "qa", 1024, i, i < 40))
        rows.append(row("a", 0.5, "needle", 1024, i, i >= 4))
        rows.append(row("b", 0.5, "needle", 1024, i, i < 30, lp=-2.0))
        rows.append(row("c", 0.5, "needle", 1024, i, i < 80, lp=-1.0))
        rows.append(row("b", 0.5, "qa", 1024, i, True))  # qa is never ranked: the full cache fails it
        rows.append(row("a", 0.25, "needle", 1024, i, True))  # another ratio: not in the 0.5 ranking
    return rows


def test_cells_carry_intervals_and_calibration_excludes_failing_tasks():
    rows = synthetic_rows()
    cells = {(c.method, c.ratio, c.task): c for c in aggregate(rows)}
    full = cells[("full", None, "needle")]
    assert full.n == 100 and full.accuracy == 98.0 and full.ci_low < 98.0 < full.ci_high
    assert (round(full.ci_low / 100, 4), round(full.ci_high / 100, 4)) == tuple(round(x, 4) for x in wilson(98, 100))
    assert full.token_accuracy == pytest.approx(0.98 * 100 + 0.02 * 60)
    b = cells[("b", 0.5, "needle")]
    assert b.logprob == pytest.approx(-2.0) and b.logprob_ci == pytest.approx(0.0) and b.kv_kept == 0.5
    assert calibration(aggregate(rows)) == {("needle", 1024): True, ("qa", 1024): False}


def test_ranking_pools_passing_cells_and_calls_only_non_overlapping_differences():
    ranks = {r.method: r for r in ranking(synthetic_rows(), 0.5)}
    assert set(ranks) == {"full", "a", "b", "c"}  # the 0.25 rows are not in the 0.5 ranking
    assert ranks["b"].n == 100  # its qa rows (full fails qa) are not pooled
    assert ranks["full"].tier == ranks["a"].tier == 1  # 98 vs 96: intervals overlap, no difference called
    assert not ranks["a"].below_full
    assert ranks["c"].below_full and ranks["c"].tier == 2
    assert ranks["b"].below_full and ranks["b"].tier == 3


def test_results_refuse_mixed_settings():
    rows = synthetic_rows() + [row("full", None, "needle", 2048, 0, True, setting="other")]
    with pytest.raises(ValueError, match="settings"):
        aggregate(rows)


def test_setting_depends_on_what_changes_rows_not_on_sample_counts():
    import torch

    a = setting_of(Suite(lengths=(1024,), samples=10), torch.bfloat16)
    assert a == setting_of(Suite(lengths=(2048, 4096), samples=100), torch.bfloat16)
    assert a != setting_of(Suite(question_in_context=False), torch.bfloat16)
    assert a != setting_of(Suite(), torch.float16)


def test_plan_runs_ratio_free_methods_once():
    assert plan(["snapkv", "kivi?bits=4", "snapkv+kivi"], [0.25, 0.5]) == [
        ("full", None), ("snapkv", 0.25), ("snapkv", 0.5), ("kivi?bits=4", None), ("snapkv+kivi", 0.25),
        ("snapkv+kivi", 0.5),
    ]  # fmt: skip


def test_results_resume_after_an_interrupted_write(tmp_path):
    """A run killed mid-line leaves a torn line: it is skipped on reload, the next row lands on its own line, and
    rows on file are never redone."""
    path = tmp_path / "r.jsonl"
    res = Results(path)
    first = row("full", None, "needle", 1024, 0, True)
    res.add(first)
    with path.open("a") as f:
        f.write(json.dumps(row("a", 0.5, "needle", 1024, 0, True))[:40])  # killed mid-write
    again = Results(path)
    assert len(again.rows) == 1 and again.done(**first)
    assert not again.done(**row("a", 0.5, "needle", 1024, 0, True))
    again.add(row("a", 0.5, "needle", 1024, 0, True))
    final = Results(path)
    assert len(final.rows) == 2 and final.done(**row("a", 0.5, "needle", 1024, 0, True))
