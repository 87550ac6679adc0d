"""Blend configuration and segment finding, without an engine (the tokenizer is SmolLM2's real one)."""

from __future__ import annotations

import pytest

from kvplug.errors import ConfigError
from kvplug.integrations.vllm.blend.plan import BlendConfig
from kvplug.integrations.vllm.blend.segmenting import (
    MessageMarkers,
    explicit_segments,
    find_all,
    keep_long,
    message_segments,
    separator_segments,
)


def test_config_engine_defaults_and_request_overrides():
    base = BlendConfig.parse({"strategy": "cacheblend", "params": {"recompute_ratio": 0.3}, "separator": " # # "})
    assert base is not None and base.params == {"recompute_ratio": 0.3}
    assert BlendConfig.parse(None, base) is base  # a request that says nothing takes the engine's
    assert BlendConfig.parse(False, base) is None  # ... or turns it off
    req = BlendConfig.parse({"params": {"recompute_ratio": 0.5}}, base)
    assert req.strategy == "cacheblend" and req.params == {"recompute_ratio": 0.5} and req.separator == " # # "
    other = BlendConfig.parse({"strategy": "epic"}, base)
    assert other.strategy == "epic" and other.params == {}  # another strategy starts from its own defaults
    assert BlendConfig.parse(True) == BlendConfig()


@pytest.mark.parametrize(
    "value, match",
    [
        ({"strategy": "nope"}, "nope"),
        ({"params": {"recompute_ratio": 2}}, "recompute_ratio"),
        ({"colour": 1}, "unknown key"),
        ({"min_tokens": 0}, "min_tokens"),
        ({"messages": "yes"}, "messages"),
        ({"strategy": "ape"}, "changes attention"),
        ("on", "true, false or an object"),
        ({"unsupported": "ignore"}, "unsupported"),
    ],
)
def test_bad_blend_config_is_named(value, match):
    with pytest.raises(ConfigError, match=match):
        BlendConfig.parse(value)


def test_explicit_segments_are_checked():
    assert explicit_segments([[2, 5], [7, 9]], 10) == [(2, 5), (7, 9)]
    for bad in ([[5, 2]], [[0, 11]], [[2, 5], [4, 8]], [[1, "x"]], "0-3"):
        with pytest.raises(ConfigError):
            explicit_segments(bad, 10)


def test_separator_and_length_filter():
    toks = [1, 9, 9, 5, 5, 5, 9, 9, 6, 6, 9, 9, 7]
    assert find_all(toks, [9, 9]) == [1, 6, 10]
    assert separator_segments(toks, [9, 9]) == [(3, 6), (8, 10)]  # prefix and question are not segments
    assert separator_segments([1, 2, 3], [9]) == []
    assert keep_long([(3, 6), (8, 10)], 3) == [(3, 6)]


def test_message_segments_from_the_chat_template():
    from transformers import AutoTokenizer

    from kvplug.models import smollm2_dir

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    markers = MessageMarkers.from_tokenizer(tok)
    docs = ["The first document talks about llamas.", "The second one is about the river Tagus."]
    msgs = [{"role": "system", "content": "Answer from the documents."}]
    msgs += [{"role": "user", "content": d} for d in docs] + [{"role": "user", "content": "Which river?"}]
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
    got = [tok.decode(ids[s:e]) for s, e in message_segments(ids, markers)]
    assert got == ["Answer from the documents.", *docs]  # every message but the question
