"""Sparse attention on the HF path with the real SmolLM2 (float32): a budget covering the context reproduces dense
decoding through the sparse path, a small budget changes the logits, and host-memory KV (SentenceKV's memory
saving) gives the same logits as in-cache KV while fetching only the selected blocks."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from kvplug.methods import sparse  # noqa: E402


@pytest.fixture(scope="module")
def model_and_ids():
    from pydoc_data.topics import topics

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvplug.models import smollm2_dir

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text).input_ids[:400]
    return model, tok, ids


def _run(model, ids: list[int], cont: list[int], sa=None) -> torch.Tensor:
    """Logits of ``cont`` teacher-forced after a prefill of ``ids`` (decode steps inside ``sa``)."""
    from transformers import DynamicCache

    with torch.no_grad():
        if sa is None:
            cache = DynamicCache(config=model.config)
            model(torch.tensor([ids]), past_key_values=cache)
            return model(torch.tensor([cont]), past_key_values=cache).logits[0]
        with sa:
            cache = sa.new_cache()
            model(torch.tensor([ids]), past_key_values=cache)
            return model(torch.tensor([cont]), past_key_values=cache).logits[0]


def test_full_budget_equals_dense_and_small_budget_differs(model_and_ids) -> None:
    from kvplug.integrations.hf.sparse import SparseAttention

    model, _, ids = model_and_ids
    prompt, cont = ids[:384], ids[384:390]
    dense = _run(model, prompt, cont)
    full = _run(model, prompt, cont, SparseAttention(model, sparse.Quest(budget=4096, dense_layers=0)))
    torch.testing.assert_close(full, dense, rtol=1e-4, atol=1e-4)
    small = _run(model, prompt, cont, SparseAttention(model, sparse.Quest(budget=64, dense_layers=0)))
    assert (small - dense).abs().max() > 1e-2
    assert model.config._attn_implementation == "sdpa"  # restored on exit


def test_host_memory_kv_fetches_only_the_selection(model_and_ids) -> None:
    from kvplug.integrations.hf.sparse import HostKVLayer, SparseAttention

    model, tok, ids = model_and_ids
    method = sparse.SentenceKV(budget=64, punctuation_ids=sparse.sentence_end_ids(tok))
    prompt, cont = ids[:384], ids[384:389]
    in_cache = _run(model, prompt, cont, SparseAttention(model, method))
    sa = SparseAttention(model, method, offload=True)
    offloaded = _run(model, prompt, cont, sa)
    torch.testing.assert_close(offloaded, in_cache, rtol=1e-4, atol=1e-4)
    cache = sa.new_cache()
    assert all(isinstance(la, HostKVLayer) for la in cache.layers)
    per_token = 2 * 3 * 64 * 4 * sum(1 for la in cache.layers)  # K and V, 3 heads x 64, float32, every layer
    everything = per_token * sum(len(prompt) + i + 1 for i in range(len(cont)))  # what dense steps would fetch
    # SentenceKV's first generated token is a dense step (the sentence holds one token), the rest fetch ~64 tokens
    assert 0 < sa.fetched_bytes < 0.5 * everything
