"""kvplug.methods: registry, budgets, every method's shapes/budgets/determinism/forced keeps, hand-built cases,
decode-time eviction, quantizer error bounds and byte accounting, composition, attention helpers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvplug.methods as km
from kvplug.errors import ConfigError
from kvplug.methods.attention import accumulated_attention, window_attention
from kvplug.methods.base import topk_keep
from kvplug.methods.rope import default_inv_freq

B, H, G, N, D, L = 2, 2, 2, 96, 16, 4
ROPE = km.Rope(default_inv_freq(D))
REQUIRED = [
    "streamingllm", "h2o", "snapkv", "pyramidkv", "tova", "scissorhands", "cake", "knorm", "random", "recent",
    "razorattention", "think", "minicache", "kivi", "kvquant", "int8", "fp8", "expectedattention", "keydiff", "kvzip",
]  # fmt: skip
EVICTORS = [n for n in km.available() if issubclass(km.method_class(n), km.Evictor)]
TRANSFORMS = [n for n in km.available() if issubclass(km.method_class(n), km.Transform)]
DECODERS = [n for n in EVICTORS if km.method_class(n).supports_decode]
DECODE_PARAMS = {"scissorhands": {"recent_window": 4}}


def make_layers(n=N, layers=L, dtype=torch.float32, seed=0, b=B, h=H, g=G, d=D, chunk=32):
    """Random layers with every query, and replays (KVzip) re-reading ``chunk``-token pieces with 3 prompt
    tokens in front."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(layers):
        k = torch.randn(b, h, n, d, generator=gen)
        v = torch.randn(b, h, n, d, generator=gen)
        q = torch.randn(b, h * g, n, d, generator=gen)
        replays = []
        for s in range(0, n, chunk):
            r = min(chunk, n - s) + 3
            rq, rk = torch.randn(b, h * g, r, d, generator=gen), torch.randn(b, h, r, d, generator=gen)
            replays.append(km.Replay(rq.to(dtype), rk.to(dtype), s, min(n, s + chunk)))
        la = km.LayerKV(k.to(dtype), v.to(dtype), q.to(dtype), layer_idx=i, num_layers=layers, rope=ROPE)
        la.replays = replays
        out.append(la)
    return out


def uniform(n, ratio):
    return min(n, max(1, math.floor(round(n * (1 - ratio), 9) + 0.5)))


def check_eviction(layers, outs, per_layer_total):
    """Shapes, ascending unique indices, gathered K/V equal to the originals, total kept exactly as asked."""
    total = 0
    for la, c in zip(layers, outs, strict=True):
        bb, hh, kk, dd = c.keys.shape
        assert (bb, hh, dd) == (la.batch, la.heads, la.head_dim) and c.values.shape == c.keys.shape
        assert c.keys.dtype == la.keys.dtype and c.indices.shape == (bb, hh, kk)
        vis = torch.ones_like(c.indices, dtype=torch.bool) if c.keep is None else c.keep
        real = vis & (c.indices >= 0)
        idx = c.indices.clamp_min(0)
        assert torch.equal(c.keys[real], torch.gather(la.keys, 2, idx[..., None].expand(-1, -1, -1, dd))[real])
        assert torch.equal(c.values[real], torch.gather(la.values, 2, idx[..., None].expand(-1, -1, -1, dd))[real])
        for bi in range(bb):
            for hi in range(hh):
                pos = c.indices[bi, hi][real[bi, hi]]
                assert bool((pos[1:] > pos[:-1]).all()), "kept positions ascend, no duplicates"
                m = int(vis[bi, hi].sum())
                assert bool(vis[bi, hi, :m].all()) and not bool(vis[bi, hi, m:].any()), "visible first"
        assert not c.keys[~vis].any(), "padding is zero"
        total += int(vis.sum())
    assert total == per_layer_total * len(layers)


# --------------------------------------------------------------------------------------------------- registry
def test_registry_has_every_method_with_a_docstring_citation():
    assert set(REQUIRED) <= set(km.available())
    for name in km.available():
        cls = km.method_class(name)
        assert cls.name == name
        assert cls.__doc__ and ("arXiv" in cls.__doc__ or "baseline" in cls.__doc__ or "Per-token" in cls.__doc__)
        km.get(name)  # the defaults are valid


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("snapkvv", {}, "available: cake"),
        ("snapkv", {"windw": 3}, "valid: compression_ratio"),
        ("snapkv", {"compression_ratio": 1.0}, r"\[0, 1\)"),
        ("snapkv", {"compression_ratio": -0.1}, r"\[0, 1\)"),
        ("snapkv", {"compression_ratio": 0.5, "token_budget": 64}, "not both"),
        ("snapkv", {"token_budget": 16}, "observation window"),
        ("snapkv", {"pooling": "min"}, "pooling"),
        ("snapkv", {"compression_ratio": "half"}, "expects float"),
        ("streamingllm", {"token_budget": 4}, "sinks"),
        ("h2o", {"token_budget": 0}, ">= 1"),
        ("kivi", {"bits": 3}, "2, 4 or 8"),
        ("kivi", {"residual_length": 100}, "multiple of group_size"),
        ("kvquant", {"bits": 5}, "2, 3, 4 or 8"),
        ("think", {"key_channel_ratio": 1.0}, r"\[0, 1\)"),
        ("minicache", {"interpolation": 2.0}, r"\[0, 1\]"),
        ("kivi+snapkv", {}, "not an evictor"),
        ("snapkv+h2o", {}, "cannot wrap an evictor"),
        ("snapkv+kivi+int8", {}, "evictor\\+transform"),
        ("snapkv+think", {"window_size": 8}, "ambiguous"),
        ("snapkv+kivi", {"nope": 1}, "valid: kivi.bits"),
        ("snapkv+kivi", {"int8.bits": 1}, "not part of"),
    ],
)
def test_registry_errors_name_the_problem(name, params, match):
    with pytest.raises(ConfigError, match=match):
        km.get(name, **params)


def test_registry_converts_flag_strings_and_routes_composed_parameters():
    m = km.get("snapkv", compression_ratio="0.5", window_size="8", pooling="avg")
    assert (m.compression_ratio, m.window_size, m.pooling) == (0.5, 8, "avg")
    assert km.get("h2o", token_budget="none").token_budget is None
    assert km.get("kvquant", pre_rope="false").pre_rope is False
    assert km.get("snapkv", compression_ratio=0).compression_ratio == 0.0
    c = km.get("snapkv+think", compression_ratio=0.5, **{"snapkv.window_size": 8, "think.window_size": 4})
    assert c.name == "snapkv+think" and c.evictor.window_size == 8 and c.transform.window_size == 4
    c = km.get("h2o+kivi", token_budget=64, bits=4)
    assert c.evictor.token_budget == 64 and c.transform.bits == 4 and c.query_window is None
    assert "kivi.bits=4" in c.spec
    with pytest.raises(ValueError, match="taken"):
        km.register("snapkv")(type("Other", (km.SnapKV,), {}))


# ------------------------------------------------------------------------------------------------------ budgets
@given(st.integers(1, 5000), st.floats(0, 0.999))
def test_uniform_budget_is_round_half_up(n, ratio):
    k = km.uniform_budget(n, ratio)
    assert k == uniform(n, ratio) and 1 <= k <= n
    assert km.uniform_budget(n, token_budget=7) == min(n, 7)


def test_uniform_budget_examples():
    assert [km.uniform_budget(10, r) for r in (0.0, 0.25, 0.35, 0.5, 0.65, 0.95, 0.99)] == [10, 8, 7, 5, 4, 1, 1]


@given(
    st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=12),
    st.integers(0, 60),
    st.data(),
)
def test_allocate_sums_exactly_under_caps(weights, cap, data):
    caps = [data.draw(st.integers(0, cap)) for _ in weights]
    total = data.draw(st.integers(0, sum(caps)))
    out = km.allocate(weights, total, caps)
    assert int(out.sum()) == total
    assert all(0 <= o <= c for o, c in zip(out.tolist(), caps, strict=True))


def test_allocate_is_proportional_when_caps_do_not_bind():
    assert km.allocate([1, 2, 1], 40, [100] * 3).tolist() == [10, 20, 10]
    assert km.allocate([1, 1, 1], 10, [100] * 3).tolist() == [4, 3, 3]  # remainder to the lower index
    assert km.allocate([10, 1, 1], 30, [12, 100, 100]).tolist() == [12, 9, 9]  # capped share moves on


@pytest.mark.parametrize("layers,budget,window,n", [(32, 128, 32, 1000), (30, 300, 32, 1000), (5, 40, 8, 41)])
def test_pyramid_budgets_decrease_and_sum_to_uniform(layers, budget, window, n):
    b = km.pyramid_budgets(layers, budget, window, n)
    assert int(b.sum()) == layers * budget
    assert bool((b[1:] <= b[:-1]).all()) and int(b.max()) <= n and int(b.min()) >= window
    if (2 * (budget - window) - (budget - window) / 20) <= n - window:  # uncapped: the paper's end points
        c = budget - window
        assert abs(int(b[0]) - window - (2 * c - c / 20)) <= 1 and abs(int(b[-1]) - window - c / 20) <= 1


@given(st.integers(1, 40), st.lists(st.integers(0, 40), min_size=1, max_size=4), st.integers(0, 3))
def test_topk_keep_exact_counts_sorted_and_prefers_later_ties(n, budgets, seed):
    budgets = torch.tensor([min(b, n) for b in budgets])
    s = torch.randint(0, 3, (2, budgets.numel(), n), generator=torch.Generator().manual_seed(seed)).float()
    idx, valid = topk_keep(s, budgets)
    assert torch.equal(valid.sum(-1), budgets.expand(2, -1))
    for bi in range(2):
        for h, k in enumerate(budgets.tolist()):
            kept = idx[bi, h, :k]
            assert bool((kept[1:] > kept[:-1]).all()) and bool((idx[bi, h, k:] == -1).all())
            if k:  # every kept score >= every dropped score; among equal scores the later ones are kept
                dropped = torch.ones(n, dtype=torch.bool)
                dropped[kept] = False
                kmin = s[bi, h, kept].min()
                assert bool((s[bi, h, dropped] <= kmin).all())
                tie_kept = kept[s[bi, h, kept] == kmin]
                tie_dropped = torch.nonzero(dropped & (s[bi, h] == kmin)).flatten()
                if tie_dropped.numel():
                    assert int(tie_dropped.max()) < int(tie_kept.min())


# ---------------------------------------------------------------------------------------------- every evictor
@pytest.mark.parametrize("name", EVICTORS)
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_evictor_shapes_exact_budget_and_determinism(name, ratio):
    layers = make_layers()
    m = km.get(name, compression_ratio=ratio)
    a, b = m.compress(layers), m.compress(make_layers())
    check_eviction(layers, a, B * H * uniform(N, ratio))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.keys, y.keys)
        entries = int(x.kept.sum())
        assert x.nbytes == entries * (2 * D * 4 + km.INDEX_BYTES)


@pytest.mark.parametrize("name", EVICTORS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_evictor_token_budget_low_precision_and_no_op(name, dtype):
    layers = make_layers(dtype=dtype, layers=2)
    out = km.get(name, token_budget=40).compress(layers)
    check_eviction(layers, out, B * H * 40)
    assert all(c.keys.dtype == dtype and torch.isfinite(c.keys.float()).all() for c in out)
    whole = km.get(name, compression_ratio=0.0).compress(layers)
    for la, c in zip(layers, whole, strict=True):
        assert c.keep is None and torch.equal(c.keys, la.keys) and c.nbytes == B * H * N * D * 2 * 2


@pytest.mark.parametrize("name", EVICTORS)
@settings(max_examples=25)
@given(n=st.integers(1, 70), extra=st.integers(0, 40), ratio=st.floats(0, 0.95), seed=st.integers(0, 3))
def test_evictor_edge_shapes(name, n, extra, ratio, seed):
    """Prompts shorter than windows, one token, budgets at the forced minimum: counts stay exact."""
    layers = make_layers(n=n, layers=2, b=1, seed=seed)
    need = km.method_class(name)(token_budget=1000).forced_keeps()[0]
    check_eviction(layers, km.get(name, token_budget=need + extra).compress(layers), 2 * min(n, need + extra))
    check_eviction(layers, km.get(name, compression_ratio=ratio).compress(layers), 2 * uniform(n, ratio))


def test_per_layer_budgets_vary_but_sum_exactly():
    layers = make_layers(layers=6)
    k = uniform(N, 0.6)
    for name in ("pyramidkv", "cake"):
        out = km.get(name, compression_ratio=0.6, window_size=8).compress(layers)
        per = [int(c.kept[0, 0]) for c in out]
        assert sum(per) == 6 * k and len(set(per)) > 1
        assert all(bool((c.kept == c.kept[0, 0]).all()) for c in out), "heads share the layer budget"
    pyr = [int(c.kept[0, 0]) for c in km.get("pyramidkv", compression_ratio=0.6, window_size=8).compress(layers)]
    assert pyr == sorted(pyr, reverse=True)
    one = km.get("pyramidkv", compression_ratio=0.6, window_size=8).compress([layers[5]])  # a per-layer hook
    assert int(one[0].kept[0, 0]) == pyr[5]


def test_razorattention_per_head_budgets_sum_to_the_model_total():
    layers = make_layers(layers=5, h=3)
    m = km.get("razorattention", compression_ratio=0.7, retrieval_fraction=0.2, num_sinks=2)
    out = m.compress(layers)
    per_head = torch.stack([c.kept[0] for c in out])  # [L, H]
    assert int(per_head.sum()) == 5 * 3 * uniform(N, 0.7)
    assert int((per_head == N).sum()) == 3  # round(0.2 * 15) retrieval heads keep everything
    others = per_head[per_head < N]
    assert int(others.max() - others.min()) <= 1
    plan = m.plan(layers)
    assert torch.equal(plan, per_head)


# ------------------------------------------------------------------------------------------- forced keeps
def kept_positions(c, b=0, h=0):
    vis = c.indices[b, h] >= 0 if c.keep is None else c.keep[b, h] & (c.indices[b, h] >= 0)
    return set(c.indices[b, h][vis].tolist())


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "cake"])
def test_observation_window_is_always_kept(name):
    layers = make_layers()
    for c in km.get(name, compression_ratio=0.7, window_size=12).compress(layers):
        for b in range(B):
            for h in range(H):
                assert set(range(N - 12, N)) <= kept_positions(c, b, h)


def test_streamingllm_and_recent_keep_sinks_and_the_latest():
    layers = make_layers(layers=1)
    (c,) = km.get("streamingllm", token_budget=20, num_sinks=4).compress(layers)
    assert all(kept_positions(c, b, h) == set(range(4)) | set(range(N - 16, N)) for b in range(B) for h in range(H))
    (c,) = km.get("recent", token_budget=20).compress(layers)
    assert kept_positions(c) == set(range(N - 20, N))
    (c,) = km.get("h2o", token_budget=20, recent_ratio=0.5).compress(layers)
    assert set(range(N - 10, N)) <= kept_positions(c)
    (c,) = km.get("scissorhands", token_budget=40, recent_window=8).compress(layers)
    assert set(range(N - 8, N)) <= kept_positions(c)


def test_razorattention_non_retrieval_heads_keep_sinks_window_and_compensation():
    layers = make_layers(layers=2, h=2)
    m = km.get("razorattention", token_budget=30, retrieval_heads=((1, 0),), num_sinks=4)
    assert m.query_window == 0
    out = m.compress([km.LayerKV(la.keys, la.values, layer_idx=la.layer_idx, num_layers=2) for la in layers])
    assert int(out[1].kept[0, 0]) == N and kept_positions(out[1], 0, 0) == set(range(N))
    budget_other = (4 * 30 - N) // 3
    c = out[0]
    assert int(c.kept[0, 0]) == budget_other
    local = budget_other - 4 - 1
    assert kept_positions(c, 1, 1) == set(range(4)) | set(range(N - local, N))
    assert int(c.indices[1, 1, 4]) == -1  # the compensation slot, right after the sinks
    dropped = torch.ones(N, dtype=torch.bool)
    dropped[list(kept_positions(c, 1, 1))] = False
    la = layers[0]
    assert torch.allclose(c.keys[1, 1, 4], la.keys[1, 1][dropped].mean(0), atol=1e-5)
    assert torch.allclose(c.values[1, 1, 4], la.values[1, 1][dropped].mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        km.get("razorattention", token_budget=10, retrieval_heads=((0, 0), (0, 1))).compress(layers)


# ------------------------------------------------------------------------------------------ hand-built cases
def aligned_layers(target, rows="window", n=N, layers=1, scale=8.0):
    """Every query (or only the last one / the window) points along one direction that key ``target`` has."""
    out = make_layers(n=n, layers=layers)
    u = torch.zeros(D)
    u[0] = 1.0
    for la in out:
        la.keys[:, :, target] = scale * u
        qrows = slice(n - 1, n) if rows == "last" else slice(None)
        la.queries[:, :, qrows] = la.queries[:, :, qrows] * 0.1 + scale * u
    return out


@pytest.mark.parametrize(
    "name,params,budget_extra",
    [
        ("snapkv", {}, 7),  # maxpool kernel 7 spreads the score to +-3 neighbours: the whole patch is kept
        ("pyramidkv", {}, 7),
        ("cake", {}, 5),
        ("snapkv", {"kernel_size": 1}, 1),
        ("scissorhands", {"history_window": 32, "recent_window": 32}, 7),  # max-pooled counts: the patch too
        ("scissorhands", {"history_window": 32, "recent_window": 32, "kernel_size": 1}, 1),
        ("h2o", {"recent_ratio": 0.0}, 1),
        ("h2o", {"recent_ratio": 0.0, "normalize": True}, 1),
        ("razorattention", {}, 0),
    ],
)
def test_the_key_the_queries_attend_to_is_kept(name, params, budget_extra):
    target = 20
    layers = aligned_layers(target, n=N, layers=2 if name == "razorattention" else 1)
    if name == "razorattention":  # layer 1 head 1 attends far back: it is the retrieval head
        m = km.get(name, token_budget=48, retrieval_fraction=0.25, num_sinks=4, **params)
        for la in layers:
            la.keys[:, :, target] = 0
        layers[1].keys[:, 1, target, 0] = 8.0
        out = m.compress(layers)
        assert int(out[1].kept[0, 1]) == N and int(out[0].kept[0, 0]) < N
        return
    window = params.get("window_size", params.get("recent_window", 32 if name != "h2o" else 0))
    m = km.get(name, token_budget=window + budget_extra, **params)
    for c in m.compress(layers):
        assert all(target in kept_positions(c, b, h) for b in range(B) for h in range(H))


def test_tova_knorm_random_hand_built():
    target = 33
    layers = aligned_layers(target, rows="last")
    (c,) = km.get("tova", token_budget=1).compress(layers)
    assert bool((c.indices == target).all()), "one choice for the whole layer: the token the last query sees"
    layers = make_layers(layers=1)
    layers[0].keys[:, :, 50] *= 1e-3
    (c,) = km.get("knorm", token_budget=1).compress(layers)
    assert bool((c.indices == 50).all())
    pick = [km.get("random", token_budget=10, seed=s).compress(layers)[0].indices for s in (0, 0, 1)]
    assert torch.equal(pick[0], pick[1]) and not torch.equal(pick[0], pick[2])


def test_h2o_prefill_keeps_the_heavy_hitter_over_recent_tokens():
    layers = aligned_layers(5, n=64)
    (c,) = km.get("h2o", token_budget=4, recent_ratio=0.5).compress(layers)
    assert all(kept_positions(c, b, h) >= {5, 62, 63} for b in range(B) for h in range(H))
    assert c.scores is not None and c.scores.shape == c.indices.shape


# ------------------------------------------------------------------------------------------------ decode
def decode_run(name, steps=24, budget=16, heavy=None, seed=0, **params):
    """Prefill to the budget, then append one token per step; returns the positions held after each step."""
    m = km.get(name, token_budget=budget, **params)
    gen = torch.Generator().manual_seed(seed)
    (la,) = make_layers(n=40, layers=1, seed=seed)
    if heavy is not None:
        la.keys[:, :, heavy] = 0
        la.keys[:, :, heavy, 0] = 8.0
        la.queries[..., 0] += 8.0
    qw = m.query_window
    (c,) = m.compress([km.LayerKV(la.keys, la.values, la.queries if qw is None else la.queries[:, :, -max(qw, 1) :])])
    keys, values, pos = c.keys, c.values, c.indices
    state = m.new_state(prefill=c)
    held = []
    for step in range(steps):
        k = torch.randn(B, H, 1, D, generator=gen)
        q = torch.randn(B, H * G, 1, D, generator=gen)
        if heavy is not None:
            q[..., 0] += 8.0
        keys, values = torch.cat([keys, k], 2), torch.cat([values, torch.randn(B, H, 1, D, generator=gen)], 2)
        pos = torch.cat([pos, torch.full((B, H, 1), 40 + step)], 2)
        sel = m.decode_select(km.LayerKV(keys, values, q, layer_idx=0), state)
        assert sel.shape[:2] == (B, H) and sel.shape[2] == min(keys.shape[2], budget)
        assert bool((sel[..., 1:] > sel[..., :-1]).all())
        keys, values = (torch.gather(t, 2, sel[..., None].expand(-1, -1, -1, D)) for t in (keys, values))
        pos = torch.gather(pos, 2, sel)
        if state.scores is not None:
            assert state.scores.shape == sel.shape
        held.append(pos.clone())
    return held


@pytest.mark.parametrize("name", DECODERS)
def test_decode_cache_never_exceeds_budget_and_is_deterministic(name):
    a, b = decode_run(name, **DECODE_PARAMS.get(name, {})), decode_run(name, **DECODE_PARAMS.get(name, {}))
    assert all(p.shape[2] == 16 for p in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    if name not in ("random", "knorm", "tova", "keydiff"):  # the newest token is protected by a window or sinks
        assert all(bool((p[..., -1] == 40 + i).all()) for i, p in enumerate(a))


def test_decode_streamingllm_keeps_sinks_and_most_recent():
    held = decode_run("streamingllm", budget=12, num_sinks=4)
    for i, p in enumerate(held):
        newest = 40 + i
        assert p[0, 0].tolist() == [0, 1, 2, 3, *range(newest - 7, newest + 1)]


@pytest.mark.parametrize("name", ["h2o", "scissorhands", "tova"])
def test_decode_attention_evictors_hold_a_heavy_hitter(name):
    params = {"recent_window": 4} if name == "scissorhands" else {}
    held = decode_run(name, heavy=3, steps=30, **params)
    assert all(bool((p == 3).any(-1).all()) for p in held)


def test_decode_small_cache_keeps_all_and_budget_rules():
    m = km.get("h2o", token_budget=8)
    state = m.new_state()
    (la,) = make_layers(n=5, layers=1)
    sel = m.decode_select(km.LayerKV(la.keys, la.values, la.queries[:, :, -1:]), state)
    assert torch.equal(sel, torch.arange(5).expand(B, H, 5)) and state.scores.shape == (B, H, 5)
    with pytest.raises(ConfigError, match="budget"):
        km.get("h2o", compression_ratio=0.5).new_state()
    assert km.get("h2o", compression_ratio=0.5).new_state(budget=12).budget == 12
    with pytest.raises(ValueError, match="current query"):
        m.decode_select(km.LayerKV(la.keys, la.values), state)
    for name in ("snapkv", "pyramidkv", "cake", "razorattention"):
        with pytest.raises(NotImplementedError, match="prefill-only"):
            km.get(name, token_budget=40).new_state()
    c = km.get("snapkv+kivi", token_budget=40, residual_length=0)
    assert not km.method_class("snapkv").supports_decode and c.query_window == 32


def test_decode_h2o_seeds_scores_from_prefill():
    (la,) = make_layers(n=64, layers=1)
    m = km.get("h2o", token_budget=16)
    (c,) = m.compress([la])
    state = m.new_state(prefill=c)
    assert state.budget == 16 and torch.equal(state.scores, c.scores)


# ---------------------------------------------------------------------------------------------- quantizers
def kv_layer(n=256, d=64, h=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(d, generator=gen) * 4 + 0.1
    k = torch.randn(1, h, n, d, generator=gen) * scale
    k[..., 3] += 20  # an outlier channel, as real keys have
    v = torch.randn(1, h, n, d, generator=gen) * scale
    return km.LayerKV(k.to(dtype), v.to(dtype), rope=km.Rope(default_inv_freq(d)))


def test_int8_per_token_error_at_most_half_a_step_and_nbytes():
    la = kv_layer()
    c = km.get("int8").compress([la])[0]
    for x, y in ((la.keys, c.keys), (la.values, c.values)):
        scale = x.abs().amax(-1, keepdim=True) * (1 + 2**-9) / 127
        assert bool(((y - x).abs() <= scale / 2 * (1 + 1e-3) + 1e-7).all())
    assert c.nbytes == 2 * 256 * 2 * (64 + 2)


def test_fp8_per_token_relative_error():
    la = kv_layer()
    c = km.get("fp8").compress([la])[0]
    for x, y in ((la.keys, c.keys), (la.values, c.values)):
        scale = x.abs().amax(-1, keepdim=True) / 448
        bound = torch.maximum(x.abs() * 2**-4, scale * 2**-9) * (1 + 1e-3)
        assert bool(((y - x).abs() <= bound).all())
    assert c.nbytes == 2 * 256 * 2 * (64 + 2)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kivi_group_error_bound_and_exact_residual(bits):
    la = kv_layer(n=300)  # keys: 256 quantized + 44 residual; values: 172 quantized + 128 residual
    c = km.get("kivi", bits=bits).compress([la])[0]
    levels = (1 << bits) - 1
    # half a step of the group's range, plus the fp16 rounding of the stored minimum (codec's _asym)
    k = la.keys[:, :, :256].reshape(1, 2, 8, 32, 64)
    step = (k.amax(3, keepdim=True) - k.amin(3, keepdim=True)) / levels
    slack = 1e-3 * k.abs().amax(3, keepdim=True) + 1e-6
    assert bool(((c.keys[:, :, :256].reshape(1, 2, 8, 32, 64) - k).abs() <= step * 0.51 + slack).all())
    v = la.values[:, :, :172].reshape(1, 2, 172, 2, 32)
    step = (v.amax(4, keepdim=True) - v.amin(4, keepdim=True)) / levels
    slack = 1e-3 * v.abs().amax(4, keepdim=True) + 1e-6
    assert bool(((c.values[:, :, :172].reshape(1, 2, 172, 2, 32) - v).abs() <= step * 0.51 + slack).all())
    assert torch.equal(c.keys[:, :, 256:], la.keys[:, :, 256:])  # the residual is stored exactly
    assert torch.equal(c.values[:, :, 172:], la.values[:, :, 172:])
    if bits == 4:
        rel = (c.keys - la.keys).norm() / la.keys.norm()
        assert rel < 0.05


def test_kivi_nbytes_is_bits_per_value_plus_scales():
    la = kv_layer(n=256, dtype=torch.bfloat16)
    c = km.get("kivi", bits=4, residual_length=0).compress([la])[0]
    n, d, h = 256, 64, 2
    scales = (n // 32) * d * h * 2 * 2 + n * (d // 32) * h * 2 * 2  # key groups + value groups, min and scale
    assert c.nbytes == n * d * h // 2 * 2 + scales  # 4-bit K and V: N*D*H/2 bytes each
    c2 = km.get("kivi", bits=2, residual_length=128).compress([la])[0]  # keys: all 256 quantized; values: 128
    k_part = n * d * h // 4 + (n // 32) * d * h * 2 * 2
    v_part = 128 * d * h // 4 + 128 * (d // 32) * h * 2 * 2 + 128 * d * h * 2
    assert c2.nbytes == k_part + v_part


def test_kvquant_pre_rope_beats_post_rope_and_keeps_outliers_and_first_token():
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(1, 2, 256, 64, generator=gen) * 0.5 + 4 * torch.randn(64, generator=gen)  # channel offsets
    rope = km.Rope(default_inv_freq(64))
    la = km.LayerKV(rope.apply(pre, torch.arange(256)), torch.randn(1, 2, 256, 64, generator=gen), rope=rope)
    err = {}
    for flag in (True, False):
        c = km.get("kvquant", bits=3, pre_rope=flag).compress([la])[0]
        err[flag] = float((c.keys - la.keys).norm() / la.keys.norm())
        assert torch.equal(c.keys[:, :, 0], la.keys[:, :, 0]) and torch.equal(c.values[:, :, 0], la.values[:, :, 0])
        big = la.values[:, :, 1:].abs().argmax(-1, keepdim=True)
        assert torch.equal(c.values[:, :, 1:].gather(-1, big), la.values[:, :, 1:].gather(-1, big))
    assert err[True] < 0.4 * err[False] and err[True] < 0.03
    c4 = km.get("kvquant", bits=4).compress([la])[0]
    int8 = km.get("int8").compress([la])[0]
    assert c4.nbytes < 0.7 * int8.nbytes
    with pytest.raises(ValueError, match="rope"):
        km.get("kvquant").compress([km.LayerKV(la.keys, la.values)])


def test_rope_round_trip_and_rotate_half_convention():
    x = torch.randn(1, 2, 10, D)
    pos = torch.arange(10)
    for rope in (ROPE, km.Rope(default_inv_freq(D), 1.3, interleaved=True), km.Rope(default_inv_freq(8))):
        assert torch.allclose(rope.invert(rope.apply(x, pos), pos), x, atol=1e-5)
    ang = pos[:, None].float() * default_inv_freq(D)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1)
    assert torch.allclose(ROPE.apply(x, pos), x * cos + half * sin, atol=1e-6)


# ---------------------------------------------------------------------------------------------- ThinK, MiniCache
def test_think_prunes_the_least_used_key_channels():
    (la,) = make_layers(n=64, layers=1, d=20)
    la.queries[..., 7] *= 50  # channel 7 matters to the queries
    la.keys[..., 2] *= 1e-3  # channel 2 carries nothing
    m = km.get("think")
    c = m.compress([la])[0]
    pruned = m.pruned_channels(la)
    assert bool((pruned.sum(-1) == int(20 * 0.4)).all())
    assert bool(pruned[..., 2].all()) and not bool(pruned[..., 7].any())
    old = c.keys[:, :, : 64 - 32]
    assert not old[pruned.unsqueeze(2).expand_as(old)].any()
    assert torch.equal(c.keys[:, :, 32:], la.keys[:, :, 32:]) and torch.equal(c.values, la.values)
    full = B * H * 64 * 20 * 4 * 2
    assert c.nbytes == full - B * H * 32 * 8 * 4 + B * H * 3


def test_minicache_merges_pairs_from_the_middle():
    layers = make_layers(n=40, layers=6)
    layers[4] = km.LayerKV(layers[3].keys * 2, layers[3].values.clone(), layer_idx=4, num_layers=6)
    out = km.get("minicache").compress(layers)
    for i in range(3):  # below the middle: untouched
        assert torch.equal(out[i].keys, layers[i].keys) and out[i].nbytes == B * H * 40 * D * 8
    # pair (3, 4): same directions, so the merge is exact; magnitudes are each layer's own
    assert torch.allclose(out[3].keys, layers[3].keys, atol=1e-5)
    assert torch.allclose(out[4].keys, layers[4].keys, atol=1e-5)
    assert torch.equal(out[5].keys, layers[5].keys)  # unpaired last layer
    rand = make_layers(n=40, layers=2, seed=3)
    a, b = km.get("minicache", start_layer=0, retention_ratio=0.1, min_similarity=0.0).compress(rand)
    assert torch.allclose(a.keys.norm(dim=-1), rand[0].keys.norm(dim=-1), atol=1e-4)
    assert torch.allclose(b.values.norm(dim=-1), rand[1].values.norm(dim=-1), atol=1e-4)
    exact = (a.keys == rand[0].keys).all(-1) & (b.keys == rand[1].keys).all(-1)
    assert bool((exact.sum(-1) >= 4).all())  # round(0.1 * 40) retained tokens per head, unmerged in both
    assert a.nbytes + b.nbytes < 2 * B * H * 40 * D * 8 * 0.65


def test_minicache_merges_only_similar_pairs():
    """The gate: dissimilar adjacent layers (random, cosine ~0) stay whole at full bytes; similar ones merge."""
    rand = make_layers(n=40, layers=2, seed=3)
    assert abs(km.MiniCache.similarity(rand[0].keys, rand[1].keys)) < 0.1
    a, b = km.get("minicache", start_layer=0).compress(rand)
    assert torch.equal(a.keys, rand[0].keys) and torch.equal(b.values, rand[1].values)
    assert a.nbytes + b.nbytes == 2 * B * H * 40 * D * 8
    gen = torch.Generator().manual_seed(1)
    near = km.LayerKV(rand[0].keys + 0.3 * torch.randn(rand[0].keys.shape, generator=gen), rand[1].values)
    sim = km.MiniCache.similarity(rand[0].keys, near.keys)
    assert sim > 0.9
    a, b = km.get("minicache", start_layer=0, min_similarity=0.9).compress([rand[0], near])
    assert not torch.equal(a.keys, rand[0].keys)  # keys merged ...
    assert torch.equal(b.values, rand[1].values)  # ... values (dissimilar) not
    a2, _ = km.get("minicache", start_layer=0, min_similarity=sim + 0.01).compress([rand[0], near])
    assert torch.equal(a2.keys, rand[0].keys) and a2.nbytes > a.nbytes


# --------------------------------------------------------------------------------------------- composition
def test_compose_evicts_then_quantizes_the_kept_tokens():
    layers = make_layers()
    snap = km.get("snapkv", compression_ratio=0.5)
    kivi = km.get("kivi", bits=4, residual_length=0)
    c = km.compose(snap, kivi)
    assert c.name == "snapkv+kivi" and c.query_window == 32
    ev, out = snap.compress(layers), c.compress(layers)
    for e, o in zip(ev, out, strict=True):
        assert torch.equal(o.indices, e.indices)
        q = kivi.compress([km.LayerKV(e.keys, e.values)])[0]
        assert torch.equal(o.keys, q.keys) and torch.equal(o.values, q.values)
        assert o.nbytes == q.nbytes + km.INDEX_BYTES * int(e.kept.sum())
        assert o.nbytes < 0.2 * (B * H * N * D * 8)


def test_compose_with_per_head_budgets_keeps_padding_out_of_quantization():
    layers = make_layers(layers=3)
    c = km.get("razorattention+kivi", compression_ratio=0.6, bits=4, residual_length=0, group_size=8)
    ev = c.evictor.compress(layers)
    out = c.compress(layers)
    assert any(o.keep is not None for o in out)
    for e, o in zip(ev, out, strict=True):
        if o.keep is None:
            continue
        assert not o.keys[~o.keep].any() and not o.values[~o.keep].any()
        vis = o.keep.unsqueeze(-1)
        err = ((o.keys - e.keys) * vis).abs().max()
        assert err < 0.5
    for name in ("h2o+kvquant", "snapkv+think", "streamingllm+fp8", "pyramidkv+int8"):
        m = km.get(name, compression_ratio=0.5)
        for o in m.compress(layers):
            assert o.keys.shape[2] <= N and torch.isfinite(o.keys).all()
            assert o.nbytes < B * H * N * D * 8


# ------------------------------------------------------------------------------------------- attention helpers
def test_window_and_accumulated_attention_match_the_full_matrix():
    gen = torch.Generator().manual_seed(0)
    n, w = 50, 9
    q = torch.randn(1, 4, n, 8, generator=gen)
    k = torch.randn(1, 2, n, 8, generator=gen)
    kr = k.repeat_interleave(2, dim=1)  # HF repeat_kv: query heads 2j, 2j+1 read KV head j
    logits = q @ kr.transpose(-1, -2) / math.sqrt(8)
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    full = logits.softmax(-1)  # [1, 4, n, n]
    win = window_attention(q[:, :, -w:], k)
    assert torch.allclose(win.reshape(1, 4, w, n), full[:, :, -w:], atol=1e-6)
    acc = accumulated_attention(q, k, block=7)
    assert torch.allclose(acc.reshape(1, 4, n), full.sum(2), atol=1e-5)
    acc_w = accumulated_attention(q[:, :, -w:], k, block=4)
    assert torch.allclose(acc_w.reshape(1, 4, n), full[:, :, -w:].sum(2), atol=1e-5)
    la = km.LayerKV(k, k, attentions=full[:, :, -w:])  # given attention probabilities are used as they are
    assert torch.allclose(
        km.get("snapkv", window_size=w).score(la),
        km.get("snapkv", window_size=w).score(km.LayerKV(k, k, q[:, :, -w:])),
        atol=1e-6,
    )


# ------------------------------------------------------------------------------- the kvpress-matched variants
def full_attention(la):
    """Causal softmax of every query against every key, ``[B, Hq, N, N]`` (float32)."""
    g = la.queries.shape[1] // la.heads
    kr = la.keys.float().repeat_interleave(g, dim=1)
    logits = la.queries.float() @ kr.transpose(-1, -2) * la.scale
    n = la.length
    return logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


def test_h2o_normalize_is_the_mean_attention_each_key_received():
    """kvpress ObservedAttentionPress: sum over queries / number of queries that see the key, GQA mean."""
    (la,) = make_layers(n=40, layers=1)
    probs = full_attention(la)
    ref = (probs.sum(2) / torch.arange(40, 0, -1)).reshape(B, H, G, 40).mean(2)
    got = km.get("h2o", normalize=True).score(la)
    assert torch.allclose(got, ref, atol=1e-5)
    plain = km.get("h2o").score(la)
    assert torch.allclose(plain, probs.sum(2).reshape(B, H, G, 40).mean(2), atol=1e-5)
    # the plain sum favours early keys (more queries see them), the normalised score does not
    assert plain[..., :10].mean() > 3 * plain[..., -10:].mean()
    # decode seeds stay plain sums whatever the prefill ranking was
    (c,) = km.get("h2o", normalize=True, token_budget=20).compress([la])
    assert torch.allclose(c.scores, plain.gather(-1, c.indices), atol=1e-5)
    # shared sums (an engine computing them once for several methods) give the same choice
    shared = km.LayerKV(la.keys, la.values, la.queries, attention_sums=probs.sum(2))
    assert torch.allclose(km.get("h2o", normalize=True).score(shared), ref, atol=1e-5)
    capped = km.get("h2o", normalize=True, prefill_queries=8).score(la)  # the last 8 queries only
    ref8 = (probs[:, :, -8:].sum(2) / torch.arange(40, 0, -1).clamp(max=8)).reshape(B, H, G, 40).mean(2)
    assert torch.allclose(capped, ref8, atol=1e-5)


def test_pyramidkv_kvpress_schedule():
    """kvpress 0.5.5: the window inside each layer's budget, uniform SnapKV when the pyramid's top layer would
    get less than the window; the official schedule adds the window on top."""
    kv = km.get("pyramidkv", compression_ratio=0.5, window_size=64, schedule="kvpress")
    b = kv.layer_budgets(30, 1024)
    assert b[0] == 960 and b[-1] == 64 and sum(b) == pytest.approx(30 * 512, abs=30)
    assert kv.layer_budgets(30, 2048) != [1024] * 30
    assert km.get("pyramidkv", compression_ratio=0.75, window_size=64, schedule="kvpress").layer_budgets(
        30, 1024
    ) == [256] * 30  # falls back to uniform SnapKV
    factory = km.get("pyramidkv", compression_ratio=0.75, window_size=64).layer_budgets(30, 1024)
    assert factory[0] > 256 > factory[-1] and sum(factory) == 30 * 256 and min(factory) > 64  # window on top
    with pytest.raises(ConfigError, match="schedule"):
        km.get("pyramidkv", schedule="cake")
    layers = make_layers(layers=3)
    out = km.get("pyramidkv", compression_ratio=0.5, window_size=8, schedule="kvpress").compress(layers)
    budgets = km.get("pyramidkv", compression_ratio=0.5, window_size=8, schedule="kvpress").layer_budgets(3, N)
    assert [int(c.kept[0, 0]) for c in out] == budgets


def test_scissorhands_pooling_keeps_a_needle_whole():
    """Counts pooled over neighbours: a multi-token needle that one query row singles out survives whole even
    when its tokens' own counts tie with the noise."""
    n = 96
    (la,) = make_layers(n=n, layers=1)
    u = torch.zeros(D)
    u[0] = 1.0
    la.keys[:, :, 40] = 6 * u  # the needle's key token; its neighbours 37..43 carry the digits
    la.queries[:, :, -32:] = la.queries[:, :, -32:] * 0.1 + 6 * u
    pooled = km.get("scissorhands", token_budget=32 + 7).compress([la])[0]
    assert all(set(range(37, 44)) <= kept_positions(pooled, b, h) for b in range(B) for h in range(H))
    plain = km.get("scissorhands", token_budget=32 + 7, kernel_size=1).compress([la])[0]
    assert all(40 in kept_positions(plain, b, h) for b in range(B) for h in range(H))
    assert not all(set(range(37, 44)) <= kept_positions(plain, b, h) for b in range(B) for h in range(H))


def test_keydiff_keeps_the_keys_least_like_the_mean_direction():
    (la,) = make_layers(n=64, layers=1)
    common = torch.randn(D)
    la.keys[:] = common + 0.05 * la.keys  # all keys nearly the same direction ...
    la.keys[:, :, 9] = -common  # ... but one
    (c,) = km.get("keydiff", token_budget=1).compress([la])
    assert bool((c.indices == 9).all())
    anchor = torch.nn.functional.normalize(la.keys, dim=-1).mean(2, keepdim=True)
    ref = -torch.nn.functional.cosine_similarity(la.keys, anchor, dim=-1)  # kvpress KeyDiffPress
    assert torch.allclose(km.get("keydiff").score(la), ref, atol=1e-6)


def test_rope_mean_rotation_is_the_average_of_rotations():
    pos = torch.arange(100, 108)
    m = ROPE.mean_rotation(pos, D)
    x = torch.randn(3, D)
    ref = torch.stack([ROPE.apply(x, torch.full((3,), int(p))) for p in pos]).mean(0)
    assert torch.allclose(x @ m.T, ref, atol=1e-5)


def test_expected_attention_matches_its_formula_and_keeps_sinks():
    """Pre-RoPE query mean/covariance (sinks' queries left out), rotated by the mean RoPE of the next positions;
    score = softmax(k.mu * s + s^2 / 2 k^T S k), GQA mean, times ||v||; sinks kept."""
    n, f = 48, 16
    (la,) = make_layers(n=n, layers=1, b=1)
    m = km.get("expectedattention", n_future_positions=f, compression_ratio=0.5)
    q = ROPE.invert(la.queries, torch.arange(n))[:, :, 4:]  # pre-RoPE, without the 4 sink positions
    mu = q.mean(2)
    c = q - mu.unsqueeze(2)
    cov = c.transpose(-1, -2) @ c / q.shape[2]
    rot = ROPE.mean_rotation(torch.arange(n, n + f), D)
    mu, cov = mu @ rot.T, rot @ cov @ rot.T
    k = la.keys[:, :, 4:].repeat_interleave(G, dim=1)
    s = la.scale
    logits = (k @ mu.unsqueeze(-1)).squeeze(-1) * s + ((k @ cov) * k).sum(-1) * s * s / 2
    ref = logits.softmax(-1).reshape(1, H, G, n - 4).mean(2) * la.values[:, :, 4:].norm(dim=-1)
    got = m.score(la)
    assert torch.allclose(got[..., 4:], ref, atol=1e-5)
    (out,) = m.compress([la])
    assert all({0, 1, 2, 3} <= kept_positions(out, 0, h) for h in range(H))
    mean_only = km.get("expectedattention", n_future_positions=f, use_covariance=False, use_vnorm=False)
    ref2 = ((k @ mu.unsqueeze(-1)).squeeze(-1) * s).softmax(-1).reshape(1, H, G, n - 4).mean(2)
    assert torch.allclose(mean_only.score(la)[..., 4:], ref2, atol=1e-5)
    with pytest.raises(ValueError, match="RoPE"):
        m.score(km.LayerKV(la.keys, la.values, la.queries))


def test_kvzip_replay_inputs_chunk_the_context_with_the_papers_prompts():
    m = km.get("kvzip", chunk_size=4, overlap=2)

    def enc(text):
        return [-len(text)]  # stands for the prompt's tokens

    ins = m.replay_inputs(list(range(10)), enc)
    assert [(s, e) for s, e, _ in ins] == [(0, 4), (4, 8), (8, 10)]
    assert ins[0][2] == [-len(m.prompt), -1, 0, 1, 2, 3]  # prompt, "\n" suffix, the chunk
    assert ins[1][2] == [-len(m.continue_prompt), 2, 3, -1, 4, 5, 6, 7]  # quotes the previous chunk's end


def test_kvzip_scores_by_reconstruction_attention_and_ranks_across_layers():
    n = 64
    layers = make_layers(n=n, layers=3, b=1)
    u = torch.zeros(D)
    u[0] = 1.0
    layers[2].keys[:, 1, 30] = 8 * u  # the replay of layer 2 attends to token 30 in head 1
    for r in layers[2].replays:
        r.queries[:, 2:4] = r.queries[:, 2:4] * 0.1 + 8 * u  # query heads of KV head 1 (G = 2)
    m = km.get("kvzip", compression_ratio=0.75)
    scores = [m.score(la) for la in layers]
    assert int(scores[2][0, 1].argmax()) == 30
    # reference for one chunk: softmax over sinks + chunk + the replay's own keys (causal), max over group, rows
    la, r = layers[0], layers[0].replays[1]
    keys = torch.cat([la.keys[:, :, :4], la.keys[:, :, r.start : r.end], r.keys], 2)
    qk = r.queries @ keys.repeat_interleave(G, dim=1).transpose(-1, -2) * la.scale
    rr, w = r.queries.shape[2], keys.shape[2]
    qk = qk.masked_fill(torch.arange(w).view(1, -1) > (w - rr + torch.arange(rr)).view(-1, 1), float("-inf"))
    ref = qk.softmax(-1)[..., 4 : 4 + r.end - r.start].reshape(1, H, G, rr, -1).amax(dim=(2, 3))
    assert torch.allclose(scores[0][..., r.start : r.end], ref, atol=1e-6)
    out = m.compress(layers)
    per = torch.stack([c.kept[0] for c in out])  # [L, H]
    assert int(per.sum()) == 3 * H * uniform(n, 0.75) and len(set(per.flatten().tolist())) > 1
    assert all(30 in kept_positions(out[2], 0, 1) and {0, 1, 2, 3} <= kept_positions(c, 0, 0) for c in out)
    flat = km.get("kvzip", compression_ratio=0.75, layerwise=True).compress(layers)
    assert all(bool((c.kept == uniform(n, 0.75)).all()) for c in flat)
    bare = km.LayerKV(la.keys, la.values)
    with pytest.raises(ValueError, match="replays"):
        m.compress([bare])
