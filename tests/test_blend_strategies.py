"""Blend strategies on constructed tensors: planted high-deviation tokens are the ones selected, selections always
hold the never-reused tokens, budgets follow the papers' rules, the guard falls back with a reason, bad parameters
are refused with a clear message."""

from __future__ import annotations

import pytest
import torch

from kvplug.errors import ConfigError
from kvplug.methods.blend import (
    BlendInput,
    CacheBlend,
    CacheCraft,
    KVShare,
    available,
    corrupt_segments,
    get_strategy,
    relative_deviation,
)

T, H, D = 100, 2, 8
SEGS = [(10, 50), (55, 95)]  # fresh: 0..9 (system prompt), 50..54 (separator), 95..99 (question)


def reused() -> torch.Tensor:
    r = torch.zeros(T, dtype=torch.bool)
    for s, e in SEGS:
        r[s:e] = True
    return r


def planted(hot: list[int], noise: float = 0.01, big: float = 3.0, layer: int = 1) -> BlendInput:
    g = torch.Generator().manual_seed(0)
    kf, vf = torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)
    ko = kf + noise * torch.randn(T, H, D, generator=g)
    vo = vf + noise * torch.randn(T, H, D, generator=g)
    vo[hot] += big * torch.randn(len(hot), H, D, generator=g)
    return BlendInput(reused(), list(SEGS), kf, vf, ko, vo, layer)


HOT = [12, 20, 33, 47, 58, 70, 91]


def test_cacheblend_selects_the_planted_tokens() -> None:
    inp = planted(HOT)
    sel = CacheBlend(recompute_ratio=len(HOT) / 80).select(inp)  # 80 reused tokens: budget = 7
    assert sel[~reused()].all()  # every never-reused token
    assert sorted(torch.nonzero(sel & reused()).flatten().tolist()) == HOT
    key_only = CacheBlend(recompute_ratio=len(HOT) / 80, on="key").select(inp)  # planted in values: keys miss them
    assert sorted(torch.nonzero(key_only & reused()).flatten().tolist()) != HOT


def test_cacheblend_gradual_filtering_narrows_within_the_rows_still_computed() -> None:
    s = CacheBlend(check_layers=(1, 3), ratios=(0.2, 0.05))
    first = s.select(planted(HOT, layer=1))
    assert int((first & reused()).sum()) == 16 and all(first[h] for h in HOT)
    later = planted(HOT[:4], layer=3)
    later.active = first
    second = s.select(later)
    assert not (second & ~first).any()  # only rows computed at layer 3
    assert int((second & reused()).sum()) == 4 and all(second[h] for h in HOT[:4])
    assert second[~reused()].all()


def test_kvshare_threshold_is_conditional() -> None:
    s = KVShare(deviation_threshold=0.5, recompute_ratio=0.5)
    assert sorted(torch.nonzero(s.select(planted(HOT)) & reused()).flatten().tolist()) == HOT
    quiet = s.select(planted([]))  # nothing deviates: nothing reused is recomputed
    assert not (quiet & reused()).any() and quiet[~reused()].all()
    capped = KVShare(deviation_threshold=0.5, recompute_ratio=3 / 80).select(planted(HOT))
    assert int((capped & reused()).sum()) == 3


def test_kvshare_decode_trigger() -> None:
    s = KVShare(deviation_threshold=0.5, decode_attention=0.2, decode_tokens=2)
    dev = torch.zeros(T)
    dev[HOT] = 2.0
    stale = reused()
    attn = torch.full((4, T), 0.1 / T)
    assert s.decode_select(attn, dev, stale, budget_left=10) is None  # little attention on stale hot tokens
    attn[:, 33] = 0.5
    attn[:, 70] = 0.3
    got = s.decode_select(attn, dev, stale, budget_left=10)
    assert got is not None and sorted(got.tolist()) == [33, 70]
    assert s.decode_select(attn, dev, stale, budget_left=0) is None


def test_epic_recomputes_the_first_tokens_of_each_segment() -> None:
    sel = get_strategy("epic", initial_tokens=4).select(BlendInput(reused(), list(SEGS)))
    assert torch.nonzero(sel & reused()).flatten().tolist() == [10, 11, 12, 13, 55, 56, 57, 58]
    assert sel[~reused()].all()


def test_cacheraft_budget_follows_context_impact() -> None:
    s = CacheCraft(recompute_ratio=0.25)
    inter_a = torch.full((40,), 0.1)
    inter_a[[3, 7]] = 0.9
    inter_b = torch.full((40,), 0.6)
    inter_b[[5, 9, 11]] = 0.95
    meta = [s.segment_meta(inter=inter_a), s.segment_meta(inter=inter_b)]
    inp = BlendInput(reused(), list(SEGS), meta=meta, keys=["a", "b"])
    cci = s.cci(inp)
    assert cci[0] == 0.0  # first segment: its context (the shared prefix) is unchanged
    assert cci[1] > 0.5
    sel = s.select(inp)
    assert not (sel[10:50]).any()  # no budget for the unaffected segment
    picked = torch.nonzero(sel[55:95]).flatten().tolist()
    assert len(picked) == 20 and {5, 9, 11} <= set(picked)  # the whole budget, highest inter-attention first
    assert CacheCraft(max_cci=0.3).select(inp)[55:95].all()  # not reusable: recomputed whole
    # a segment that was computed after the one now preceding it, in the same order, needs nothing
    seen = [meta[0], {**meta[1], "context": ["a"]}]
    assert s.cci(BlendInput(reused(), list(SEGS), meta=seen, keys=["a", "b"]))[1] == 0.0
    assert s.overlap_and_order(["a", "b", "c"], ["c", "b", "a"]) == (1.0, 1.0)


def test_bounds_and_guard() -> None:
    inp = planted(HOT)
    assert get_strategy("full").select(inp).all()
    none = get_strategy("none").select(inp)
    assert torch.equal(none, ~reused())
    assert get_strategy("ape").select(inp).equal(~reused())
    assert CacheBlend().guard(inp) is None  # no threshold: never
    assert CacheBlend(max_deviation=10.0).guard(inp) is None
    reason = CacheBlend(max_deviation=0.01).guard(inp)
    assert reason is not None and "deviation" in reason and "layer 1" in reason
    g = torch.Generator().manual_seed(5)
    garbage = BlendInput(reused(), list(SEGS), inp.k_fresh, inp.v_fresh, torch.randn(T, H, D, generator=g),
                         torch.randn(T, H, D, generator=g), 1)  # fmt: skip
    assert relative_deviation(garbage) > 1.0 > relative_deviation(inp)


def test_corrupt_segments_flags_only_the_bad_one() -> None:
    inp = planted([], noise=1e-4, layer=0)
    assert corrupt_segments(inp) == []
    inp.v_old[60:70] = 5.0
    assert corrupt_segments(inp) == [1]


def test_parameters_are_validated_with_clear_errors() -> None:
    assert available() == ["ape", "cacheblend", "cacheraft", "epic", "full", "kvshare", "none"]
    s = get_strategy("cacheblend", recompute_ratio="0.3", check_layers="1,2", ratios="0.3,0.2", max_deviation="none")
    assert (s.recompute_ratio, s.check_layers, s.ratios, s.max_deviation) == (0.3, (1, 2), (0.3, 0.2), None)
    bad = [
        ("cacheblend", {"recompute_ratio": 1.5}, "recompute_ratio"),
        ("cacheblend", {"check_layers": (2, 1)}, "strictly increasing"),
        ("cacheblend", {"check_layers": ()}, "check layer"),
        ("cacheblend", {"check_layers": (1, 2), "ratios": (0.1, 0.2)}, "must not increase"),
        ("cacheblend", {"ratios": (0.1, 0.2)}, "2 ratios for 1 check layers"),
        ("cacheblend", {"on": "query"}, "on must be"),
        ("cacheblend", {"recompute_ratio": "lots"}, "expects float"),
        ("cacheblend", {"max_deviation": 0}, "max_deviation"),
        ("cacheblend", {"ratio": 0.1}, "unknown parameter"),
        ("kvshare", {"check_layers": (1, 2)}, "exactly one"),
        ("kvshare", {"deviation_threshold": -1}, "deviation_threshold"),
        ("epic", {"initial_tokens": -1}, "initial_tokens"),
        ("epic", {"check_layers": (1,)}, "static"),
        ("cacheraft", {"stat_layers": ()}, "stat_layers"),
        ("ape", {"temperature": 0}, "temperature"),
        ("blendy", {}, "unknown blend strategy"),
    ]
    for name, params, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            get_strategy(name, **params)


def test_input_validation() -> None:
    inp = BlendInput(reused(), [(10, 50), (40, 95)])
    with pytest.raises(ValueError, match="overlaps"):
        inp.check()
    with pytest.raises(ValueError, match="union"):
        BlendInput(reused(), [(10, 50)]).check()
    planted(HOT).check()
    with pytest.raises(ValueError, match="meta"):
        CacheCraft().select(BlendInput(reused(), list(SEGS)))
