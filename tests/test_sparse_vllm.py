"""Sparse decode attention end to end on the real vLLM CPU engine (SmolLM2, float32), one engine run with the
kvplug connector: a budget covering the prompt gives dense's greedy output through the sparse path for every
method, a small Quest budget still finds the needle, a budget spent on sink and recent tokens loses it (the
sparse path really runs), and blocks loaded by the connector get their summaries (same output as computed)."""

from __future__ import annotations

import pytest

from tests.vllm_helpers import cached, engine, metric, require_vllm, tokens

require_vllm()

pytestmark = pytest.mark.slow
FULL = {"budget": 8192, "dense_up_to": 0}  # every block selected, but through the sparse path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[int], str]:
    from transformers import AutoTokenizer

    from kvplug.eval import tasks
    from kvplug.models import smollm2_dir

    path = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(path)
    sample = tasks.needle(lambda s: tok(s, add_special_tokens=False).input_ids, 1000, 3)[2]
    prompt = tok(sample.context + sample.question, add_special_tokens=False).input_ids
    answer = tok(sample.answer, add_special_tokens=False).input_ids
    params = [
        {"sparse": False},  # dense reference (computes the prefix and saves it)
        {"sparse": {"method": "quest", **FULL}},
        {"sparse": {"method": "hierarchical", **FULL}},
        {"sparse": {"method": "sentencekv", **FULL}},
        {"sparse": {"method": "quest", "budget": 256}, "skip_load": True},  # computed prefix
        {"sparse": {"method": "quest", "budget": 256}},  # the same, prefix loaded by the connector
        {"sparse": {"method": "quest", "budget": 64, "dense_layers": 0}},  # only sink + recent: the needle is lost
    ]
    store = tmp_path_factory.mktemp("sparse-kv")
    report = engine(
        {
            "model": path,
            "prompts": [prompt] * len(params),
            "params": params,
            "max_tokens": 8,
            "extra": {"store": f"file://{store}"},
            "additional_config": {"kvplug_sparse": {"method": "quest", "budget": 1024}},
            "metric_prefixes": ["kvplug_sparse"],
        }
    )
    return report, answer, tok.decode(answer)


def test_full_budget_equals_dense_through_the_sparse_path(run) -> None:
    report, _, _ = run
    out = tokens(report)
    assert out[1] == out[0] and out[2] == out[0] and out[3] == out[0]
    assert metric(report, "kvplug_sparse_selections_total", kind="dense") > 0


def test_small_budget_finds_the_needle_and_sink_recent_only_does_not(run) -> None:
    report, answer, text = run
    out = tokens(report)
    digits = [t for t in answer if t in out[0]]
    assert out[0][: len(answer)] == answer, f"dense itself misses the needle {text!r}"
    assert out[4][: len(answer)] == answer  # Quest with 256 of ~950 tokens
    assert out[6][: len(answer)] != answer and digits  # sink + recent only: the sparse path changes the answer
    ranked = metric(report, "kvplug_sparse_selections_total", kind="ranked")
    assert ranked > 0
    attended = metric(report, "kvplug_sparse_attended_tokens_total", method="quest")
    context = metric(report, "kvplug_sparse_context_tokens_total", method="quest")
    assert 0 < attended < context
    assert metric(report, "kvplug_sparse_errors_total", kind="attention") == 0


def test_connector_loaded_blocks_get_summaries(run) -> None:
    report, _, _ = run
    assert cached(report)[4] == 0 and cached(report)[5] >= 512  # computed vs loaded by the connector
    assert tokens(report)[5] == tokens(report)[4]
