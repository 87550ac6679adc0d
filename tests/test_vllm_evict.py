"""Eviction inside the real vLLM CPU engine (SmolLM2, float32), StreamingLLM and SnapKV: blocks really go back to
vLLM's free pool (its own counter), the output equals an HF reference that masks exactly the evicted blocks (for
SnapKV, the blocks chosen from transformers' own prefill by the same rule), a request the window covers is
bit-for-bit the normal path, and vLLM's prefix cache never serves a block computed after an eviction. Three engine
runs (StreamingLLM, SnapKV, none), each request stepped alone so the pool count is the request's."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from tests.vllm_helpers import cached, engine, metric, require_vllm, tokens

require_vllm()

SINKS, WINDOW, BLOCK, GEN = 4, 128, 32, 64
EVICT = {"kvplug_evict": {"method": "streamingllm", "num_sinks": SINKS, "window": WINDOW}}
SNAPKV = {"method": "snapkv", "compression_ratio": 0.5}


def hf_reference(path: str, prompt: list[int], n: int, window: int = WINDOW) -> list[int]:
    """Greedy tokens from transformers with the engine's block mask (kvplug.eval.masked)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvplug.eval.masked import streaming_greedy

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return streaming_greedy(model, prompt, n, SINKS, window, BLOCK)


def snapkv_reference(path: str, prompt: list[int], n: int) -> tuple[tuple[int, ...], list[int]]:
    """SnapKV's dropped blocks from transformers' prefill (kvplug.eval.masked.scored_holes) and the greedy tokens
    with those blocks masked for every query after the prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvplug.eval.masked import greedy, scored_holes
    from kvplug.methods import registry

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    holes = scored_holes(model, prompt, registry.get("snapkv", compression_ratio=0.5), BLOCK)
    return holes, greedy(model, prompt, n, BLOCK, lambda q: holes)


@pytest.fixture(scope="module")
def runs() -> dict:
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    from kvplug.models import smollm2_dir

    path = str(smollm2_dir())
    ids = AutoTokenizer.from_pretrained(path)(topics["assert"] + topics["assignment"], add_special_tokens=False)
    long_prompt = ids.input_ids[:300]  # longer than the window: evicted right after its prefill
    short_prompt = ids.input_ids[400:430]  # 30 + 64 generated < 128: the window covers it
    ref = hf_reference(path, long_prompt, GEN)
    full_ref = hf_reference(path, long_prompt, GEN, window=1 << 30)  # no eviction: plain causal attention
    holes, snap_ref = snapkv_reference(path, long_prompt, GEN)
    spec = {
        "model": path,
        "max_tokens": GEN,
        "connector": False,
        "prefix_caching": True,
        "trace_blocks": True,
        "metric_prefixes": ["kvplug_evict"],
    }
    # the third prompt repeats the long request's prompt and (reference) output
    return {
        "evict": engine(
            {**spec, "prompts": [long_prompt, short_prompt, long_prompt + ref], "additional_config": EVICT}
        ),
        "plain": engine({**spec, "prompts": [long_prompt, short_prompt, long_prompt + full_ref]}),
        # per request: the engine's setting, opted out, a higher ratio (both after a prefix-cache hit on the prompt)
        "snapkv": engine(
            {
                **spec,
                "prompts": [long_prompt] * 3,
                "params": [None, {"evict": False}, {"evict": {"compression_ratio": 0.75}}],
                "additional_config": {"kvplug_evict": SNAPKV},
            }
        ),
        "holes": holes,
        "snap_ref": snap_ref,
        "ref": ref,
        "prompt_blocks": len(long_prompt) // BLOCK,
    }


@pytest.mark.slow
def test_blocks_go_back_to_the_pool(runs) -> None:
    ev, plain = runs["evict"]["outputs"][0]["blocks_used"], runs["plain"]["outputs"][0]["blocks_used"]
    bound = -(-SINKS // BLOCK) + WINDOW // BLOCK + 2  # sinks, the window, the block being filled
    assert ev[0] == plain[0] == 10  # the 300-token prompt is prefilled whole (full attention)
    assert max(ev[1:]) <= bound < 10, ev  # then the request holds sinks + window, whatever its length
    assert plain[-2] == 12 and max(plain) >= 12  # without eviction it grows with the generation
    assert metric(runs["evict"], "kvplug_evict_blocks_freed_total", method="streamingllm") >= 10 - bound


@pytest.mark.slow
def test_output_equals_the_masked_hf_reference_and_differs_from_full_attention(runs) -> None:
    assert tokens(runs["evict"])[0] == runs["ref"]
    assert tokens(runs["plain"])[0] != runs["ref"]  # eviction really changed what was attended


@pytest.mark.slow
def test_a_request_the_window_covers_is_bit_for_bit_the_normal_path(runs) -> None:
    assert tokens(runs["evict"])[1] == tokens(runs["plain"])[1]
    assert max(runs["evict"]["outputs"][1]["blocks_used"]) == max(runs["plain"]["outputs"][1]["blocks_used"])


@pytest.mark.slow
def test_prefix_cache_serves_the_prompt_never_blocks_computed_after_eviction(runs) -> None:
    # the follow-up prompt repeats the long request's prompt and output: without eviction vLLM's prefix cache
    # serves the output's full blocks too; with eviction only the prompt's (computed with full attention)
    assert tokens(runs["evict"])[0] == runs["ref"]  # so the follow-up really repeats what the engine computed
    assert cached(runs["evict"])[2] == runs["prompt_blocks"] * BLOCK
    assert cached(runs["plain"])[2] >= (runs["prompt_blocks"] + 1) * BLOCK


@pytest.mark.slow
def test_snapkv_frees_the_blocks_chosen_from_the_same_scores_as_transformers(runs) -> None:
    holes, used = runs["holes"], runs["snapkv"]["outputs"][0]["blocks_used"]
    assert len(holes) == 5  # 300 tokens, 50%: 150 kept -> 5 of 10 blocks
    assert 9 not in holes  # the observation window (the last 32 tokens) is never evicted
    assert used[0] == 10 and max(used[1:]) == 10 - 5 + 2  # freed after the prompt; the output then adds 2 blocks
    assert tokens(runs["snapkv"])[0] == runs["snap_ref"]  # so the engine dropped exactly the blocks HF chose
    assert tokens(runs["snapkv"])[0] != tokens(runs["plain"])[0]


@pytest.mark.slow
def test_a_request_opts_out_or_sets_its_own_ratio(runs) -> None:
    out, used = tokens(runs["snapkv"]), [o["blocks_used"] for o in runs["snapkv"]["outputs"]]
    assert out[1] == tokens(runs["plain"])[0] and max(used[1][1:]) == 12  # opted out: the normal path
    assert used[2][1] == 3  # 75%: 75 tokens kept -> 3 blocks (the observation window's two among them)
    assert metric(runs["snapkv"], "kvplug_evict_blocks_freed_total", method="snapkv") == 5 + 7


# ---- configuration (no engine) --------------------------------------------------------------------------------------
def _full_spec():  # a real vLLM FullAttentionSpec as a SmolLM2 layer reports it
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=3, head_size=64, dtype=torch.float32)


def test_layer_spec_follows_the_engine_config() -> None:
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    from kvplug.integrations.vllm.evict import StreamingSpec, _layer_spec

    full = _full_spec()
    on = SimpleNamespace(additional_config=EVICT, kv_transfer_config=None)
    spec = _layer_spec(full, on)
    assert isinstance(spec, StreamingSpec) and (spec.num_sinks, spec.window) == (SINKS, WINDOW)
    assert spec.page_size_bytes == full.page_size_bytes  # same KV layout: only what is freed changes
    assert StreamingSpec.merge([spec, spec]) == spec
    assert _layer_spec(full, SimpleNamespace(additional_config={}, kv_transfer_config=None)) is full
    swa = SlidingWindowSpec(
        **{
            f.name: getattr(full, f.name)
            for f in dataclasses.fields(full)
            if f.init and f.name not in ("attention_chunk_size", "non_causal")
        }
        | {"sliding_window": 64}
    )
    assert _layer_spec(swa, on) is swa  # local layers keep vLLM's own window


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"method": "h2o", "compression_ratio": 0.5}, "unknown eviction method 'h2o'"),
        ({"method": "snapkv"}, "needs compression_ratio"),
        ({"method": "snapkv", "compression_ratio": 1.5}, "compression_ratio must be in [0, 1)"),
        ({"method": "streamingllm", "window": 0}, "window must be >= 1"),
        ({"method": "streamingllm", "budget": 3}, "unknown option(s) ['budget']"),
        ({"method": "streamingllm", "window": "big"}, "window must be an integer"),
        ([1, 2], "expected an object"),
    ],
)
def test_bad_config_names_the_problem(raw, needle) -> None:
    from kvplug.errors import ConfigError
    from kvplug.integrations.vllm.evict import _layer_spec

    with pytest.raises(ConfigError, match="additional_config.kvplug_evict") as e:
        _layer_spec(_full_spec(), SimpleNamespace(additional_config={"kvplug_evict": raw}, kv_transfer_config=None))
    assert needle in str(e.value)


def test_refused_alongside_a_kv_connector_or_sparse_attention() -> None:
    from kvplug.errors import ConfigError
    from kvplug.integrations.vllm.evict import _layer_spec

    ktc = SimpleNamespace(kv_connector="KVPlugConnector", kv_connector_extra_config={})
    with pytest.raises(ConfigError, match="KV connector"):
        _layer_spec(_full_spec(), SimpleNamespace(additional_config=EVICT, kv_transfer_config=ktc))
    both = {**EVICT, "kvplug_sparse": {"method": "quest", "budget": 256}}
    with pytest.raises(ConfigError, match="sparse attention"):
        _layer_spec(_full_spec(), SimpleNamespace(additional_config=both, kv_transfer_config=None))


def test_block_choice_keeps_the_budget_the_protected_window_and_the_partial_block() -> None:
    import torch

    from kvplug.integrations.vllm.evict import blocks_to_drop, layer_token_scores
    from kvplug.methods import registry
    from kvplug.methods.base import LayerKV

    snap = registry.get("snapkv", compression_ratio=0.5)  # window_size 32: the last 32 tokens are protected
    n, bs = 300, 32  # 9 full blocks + a 12-token partial block
    scores = torch.arange(n, dtype=torch.float32).flip(0)  # earlier tokens score higher
    drop = blocks_to_drop(snap, scores, n, bs)
    assert len(drop) == 10 - 5  # 150 tokens kept -> 5 blocks kept of 10
    assert 9 not in drop and 8 not in drop  # the partial block and the window's blocks (268..299 -> 8, 9)
    assert drop == (3, 4, 5, 6, 7)  # then the lowest-scored whole blocks go
    assert blocks_to_drop(registry.get("snapkv", compression_ratio=0.0), scores, n, bs) == ()
    # KNorm's scores are negative norms: shifted and normalised, the largest-norm keys still score lowest
    keys = torch.ones(1, 2, 64, 8)
    keys[:, :, :32] *= 5.0
    s = layer_token_scores(registry.get("knorm", compression_ratio=0.5), LayerKV(keys=keys, values=keys))
    assert float(s.sum()) == pytest.approx(1.0) and float(s[:32].max()) < float(s[32:].min())
    assert blocks_to_drop(registry.get("knorm", compression_ratio=0.5), s, 64, bs) == (0,)


@pytest.mark.slow
def test_snapkv_through_preemption() -> None:
    """Three 300-token prompts in a 20-block pool: two prefill together (20 blocks), SnapKV frees 10, the third is
    admitted, and the growing outputs force vLLM to preempt. A preempted request's choice is forgotten and made
    again from its recomputed prompt; requests never preempted give transformers' masked output token for token."""
    from pydoc_data.topics import topics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvplug.eval.masked import greedy, scored_holes
    from kvplug.methods import registry
    from kvplug.models import smollm2_dir

    path, n = str(smollm2_dir()), 100
    ids = AutoTokenizer.from_pretrained(path)("\n\n".join(topics[k] for k in sorted(topics))).input_ids
    prompts = [ids[i * 1000 : i * 1000 + 300] for i in (1, 2, 3)]
    report = engine(
        {
            "model": path,
            "prompts": prompts,
            "batch": True,
            "max_tokens": n,
            "max_model_len": 512,
            "num_blocks": 21,  # + vLLM's null block
            "connector": False,
            "log_stats": True,
            "additional_config": {"kvplug_evict": SNAPKV},
            "metric_prefixes": ["kvplug_evict"],
        }
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    method = registry.get("snapkv", compression_ratio=0.5)
    holes = [scored_holes(model, p, method, BLOCK) for p in prompts]
    refs = [greedy(model, p, n, BLOCK, lambda q, h=h: h) for p, h in zip(prompts, holes, strict=True)]
    outs, pre = tokens(report), [o["num_preemptions"] for o in report["outputs"]]
    assert sum(pre) >= 1, pre
    assert all(len(o) == n for o in outs)
    assert metric(report, "kvplug_evict_requests_scored_total", method="snapkv") >= 3
    for o, r, p in zip(outs, refs, pre, strict=True):
        if p == 0:
            assert o == r
        else:
            assert o[0] == r[0]  # the first token comes from the full-attention prefill
