"""Gemma-3-270M (15 sliding-window layers, 3 global) on vLLM CPU with its hybrid KV cache manager ON: kvplug
stores and loads with one KV cache group per layer set, payloads in model layer order."""

from __future__ import annotations

import pytest

from tests.vllm_helpers import cached, engine, load_failures, metric, require_vllm, tokens

require_vllm()

pytestmark = pytest.mark.slow
CHUNK = 256


@pytest.fixture(scope="module")
def gemma3() -> str:
    from kvplug.models import gemma3_dir

    return str(gemma3_dir())


def test_gemma3_stores_and_loads_with_the_hybrid_manager_on(gemma3, tmp_path):
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(gemma3)("\n\n".join(topics[k] for k in sorted(topics))).input_ids
    # 1000 tokens: longer than the 512-token window, so loads must skip the null blocks of out-of-window slots
    prompts = [ids[:1000]]
    spec = {"model": gemma3, "prompts": prompts, "max_tokens": 12, "max_model_len": 2048}
    base = engine({**spec, "connector": False})
    store = {"store": f"file://{tmp_path}/g"}
    first = engine({**spec, "extra": store})
    assert tokens(first) == tokens(base)
    assert metric(first, "kvplug_connector_saved_tokens_total", engine="vllm") == 3 * CHUNK
    second = engine({**spec, "extra": store})
    assert cached(second) == [3 * CHUNK]  # loaded (asynchronously: several KV cache groups)
    assert tokens(second) == tokens(base)
    assert load_failures(second) == 0
    # the load really is what the engine attends to: broken payloads are refused and the request recomputed whole
    for f in (tmp_path / "g" / "data").rglob("*"):
        if f.is_file():
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 1
            f.write_bytes(bytes(b))
    third = engine({**spec, "extra": store})
    assert tokens(third) == tokens(base) and load_failures(third) == 1
    assert metric(third, "kvplug_payload_errors_total", kind="checksum") >= 1
