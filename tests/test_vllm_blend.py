"""Blending on the real vLLM CPU engine (SmolLM2-135M, float32): stored documents reused at other positions and
repaired by selective recompute, through engine flags and per-request options. Each engine runs in a new
process."""

from __future__ import annotations

import pytest

from tests.vllm_helpers import engine, metric, require_vllm, tokens

require_vllm()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Two documents stored in isolation (warm requests), and a prompt that reuses them in another order after a
    preamble: preamble + doc B + doc A + question, with explicit segment ranges."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    from kvplug.models import smollm2_dir

    model = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(model)
    doc_a = tok(topics["assert"][:900], add_special_tokens=False).input_ids[:200]
    doc_b = tok(topics["break"][:900], add_special_tokens=False).input_ids[:160]
    pre = tok("Read the two documents below.\n\n", add_special_tokens=False).input_ids
    sep = tok("\n\n", add_special_tokens=False).input_ids
    question = tok("\n\nQuestion: which statement is described first? Answer:", add_special_tokens=False).input_ids
    prompt = pre + doc_b + sep + doc_a + question
    b0 = len(pre)
    a0 = b0 + len(doc_b) + len(sep)
    segments = [[b0, b0 + len(doc_b)], [a0, a0 + len(doc_a)]]
    store = f"file://{tmp_path_factory.mktemp('blend')}/s"
    warm = engine(
        {
            "model": model,
            "prompts": [doc_a, doc_b],
            "max_tokens": 1,
            "extra": {"store": store},
            "params": [{"blend": {"warm": True}}] * 2,
        }
    )
    assert metric(warm, "kvplug_blend_segments_total", result="miss") == 2
    base = engine({"model": model, "prompts": [prompt], "connector": False, "max_tokens": 8})
    return {
        "model": model,
        "prompt": prompt,
        "segments": segments,
        "store": store,
        "base": base,
        "docs": (doc_a, doc_b),
    }


def blend_run(case, blend, **kw):
    spec = {
        "model": case["model"],
        "prompts": [case["prompt"]],
        "max_tokens": 8,
        "extra": {"store": case["store"], **kw.pop("extra", {})},
        "params": [{"blend": {"segments": case["segments"], **blend}}],
        **kw,
    }
    return engine(spec)


def test_full_recompute_equals_the_normal_prefill(case):
    r = blend_run(case, {"strategy": "full"})
    assert tokens(r) == tokens(case["base"])
    assert metric(r, "kvplug_blend_segments_total", result="hit") == 2
    assert metric(r, "kvplug_blend_requests_total", outcome="blended") == 1


def test_cacheblend_reuses_the_documents_and_recomputes_a_fraction(case):
    r = blend_run(case, {"strategy": "cacheblend", "params": {"recompute_ratio": 0.3}})
    assert metric(r, "kvplug_blend_requests_total", outcome="blended") == 1
    reused = metric(r, "kvplug_blend_tokens_total", kind="reused")
    recomputed = metric(r, "kvplug_blend_tokens_total", kind="recomputed")
    assert reused == sum(len(d) for d in case["docs"])
    assert 0.2 * reused <= recomputed <= 0.4 * reused
    # the first answer tokens agree with the full prefill on this case (a robust one: the docs lead the answer)
    assert tokens(r)[0][:2] == tokens(case["base"])[0][:2]


def test_no_recompute_differs_and_a_corrupt_segment_is_recomputed(case, tmp_path):
    r = blend_run(case, {"strategy": "none"})
    assert metric(r, "kvplug_blend_requests_total", outcome="blended") == 1
    assert metric(r, "kvplug_blend_tokens_total", kind="recomputed") == 0
    # break every stored segment: refused (checksum), the request runs as a full prefill, the answer is right
    import shutil
    from pathlib import Path

    src = Path(case["store"].removeprefix("file://"))
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    for f in (dst / "data").rglob("*"):
        if f.is_file():
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 1
            f.write_bytes(bytes(b))
    broken = dict(case, store=f"file://{dst}")
    r = blend_run(broken, {"strategy": "cacheblend"})
    assert tokens(r) == tokens(case["base"])
    assert metric(r, "kvplug_payload_errors_total", kind="checksum") == 2
    assert metric(r, "kvplug_blend_requests_total", outcome="blended") == 0


def test_other_tenant_never_blends_and_plain_requests_are_untouched(case):
    plain = case["prompt"][:300]
    r = engine(
        {
            "model": case["model"],
            "prompts": [case["prompt"], plain],
            "max_tokens": 8,
            "extra": {"store": case["store"]},
            "params": [{"blend": {"segments": case["segments"]}, "tenant_salt": "another"}, None],
        }
    )
    assert metric(r, "kvplug_blend_segments_total", result="hit") == 0  # another tenant's namespace
    assert tokens(r)[0] == tokens(case["base"])[0]
    ref = engine({"model": case["model"], "prompts": [plain], "max_tokens": 8, "connector": False})
    assert tokens(r)[1] == tokens(ref)[0]


def test_a_blend_request_batched_with_a_normal_one_gives_the_same_outputs(case):
    plain = case["prompt"][-250:]
    spec = {"strategy": "cacheblend", "params": {"recompute_ratio": 0.3}}
    alone = blend_run(case, spec)
    both = engine(
        {
            "model": case["model"],
            "prompts": [case["prompt"], plain],
            "max_tokens": 8,
            "batch": True,
            "extra": {"store": case["store"]},
            "params": [{"blend": {"segments": case["segments"], **spec}}, None],
        }
    )
    ref = engine({"model": case["model"], "prompts": [plain], "max_tokens": 8, "connector": False})
    assert metric(both, "kvplug_blend_requests_total", outcome="blended") == 1
    assert tokens(both) == [tokens(alone)[0], tokens(ref)[0]]
