"""The HF blending path on tiny random-weight models built offline (Llama, Qwen3, Gemma-3 with sliding windows):
100% recompute equals a full prefill, 0% recompute equals plain concatenation built with HF's own forward, planted
deviations are what CacheBlend recomputes, corrupted or foreign segments are refused and recomputed, another model
or tenant never finds a segment, APE and KVShare's decode stage run, the cache feeds ``model.generate``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

from kvplug.chunks import Namespace
from kvplug.connectors.memory import MemoryStore
from kvplug.integrations.hf.blend import blend_prefill, compute_segment, full_prefill_logits
from kvplug.methods.blend import CacheBlend, KVShare, SegmentStore, get_strategy, rerotate, rope_for_layer
from tests.test_blend_rope import tiny_gemma3, tiny_llama


def tiny_qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, attn_implementation="sdpa",
    )  # fmt: skip
    return Qwen3ForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "qwen3": tiny_qwen3, "gemma3": lambda seed=0: tiny_gemma3(window=8, seed=seed)}


def prompt(seed: int = 0) -> tuple[list[int], list[int], list[list[int]], list[tuple[int, int]]]:
    """``prefix + doc0 + sep + doc1 + question`` token ids, the documents and their spans."""
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randint(1, 96, (n,), generator=g).tolist()  # noqa: E731
    prefix, docs, sep, question = r(5), [r(14), r(17)], r(2), r(6)
    ids = prefix + docs[0] + sep + docs[1] + question
    a = len(prefix)
    spans = [(a, a + len(docs[0])), (a + len(docs[0]) + len(sep), a + len(docs[0]) + len(sep) + len(docs[1]))]
    return ids, prefix, docs, spans


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request):
    model = MODELS[request.param]()
    ids, prefix, docs, spans = prompt()
    segs = [compute_segment(model, d, prefix=prefix) for d in docs]
    return request.param, model, ids, prefix, docs, spans, segs


def test_full_recompute_equals_full_prefill(setup) -> None:
    kind, model, ids, prefix, docs, spans, segs = setup
    ref = full_prefill_logits(model, ids)
    for strategy in (get_strategy("full"), CacheBlend(recompute_ratio=1.0)):
        res = blend_prefill(model, ids, spans, segs, strategy)
        torch.testing.assert_close(res.logits, ref, atol=2e-5, rtol=1e-5)
        assert res.selected.all() and res.refused == [] and res.fallback is None
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    for i, layer in enumerate(cache.layers):  # the blended K/V too (sliding layers hold their window)
        held = layer.keys.shape[-2]
        torch.testing.assert_close(res.session.k[i][..., -held:, :], layer.keys, atol=2e-5, rtol=1e-5)
    none = blend_prefill(model, ids, spans, segs, get_strategy("none"))
    assert (none.logits - ref).abs().max() > 1e-3  # reuse without repair really differs here
    assert none.flop_fraction < blend_prefill(model, ids, spans, segs, CacheBlend(recompute_ratio=0.5)).flop_fraction


def _concatenated(model, ids, spans, segs) -> torch.Tensor:
    """Plain concatenation with HF's own forward: fresh runs extend a DynamicCache, stored segments are appended
    (keys re-rotated), positions continue."""
    cache = DynamicCache()  # plain layers (also for Gemma-3's local ones: HF's mask applies the window)
    pos = 0
    logits = None
    bounds = [(s, e, seg) for (s, e), seg in zip(spans, segs, strict=True)] + [(len(ids), len(ids), None)]
    for s, e, seg in bounds:
        if s > pos:
            p = torch.arange(pos, s).unsqueeze(0)
            with torch.no_grad():
                logits = model(torch.tensor([ids[pos:s]]), past_key_values=cache, position_ids=p).logits[0, -1]
        if seg is not None:
            for i in range(model.config.num_hidden_layers):
                k = rerotate(
                    seg.keys(i).transpose(0, 1), seg.positions, torch.arange(s, e), rope_for_layer(model.config, i)
                )
                cache.update(k.unsqueeze(0), seg.values(i).transpose(0, 1).unsqueeze(0), i)
        pos = e
    assert logits is not None
    return logits.float()


def test_no_recompute_equals_plain_concatenation(setup) -> None:
    kind, model, ids, prefix, docs, spans, segs = setup
    res = blend_prefill(model, ids, spans, segs, get_strategy("none"))
    torch.testing.assert_close(res.logits, _concatenated(model, ids, spans, segs), atol=2e-5, rtol=1e-5)
    assert int((res.selected & res.reused).sum()) == 0
    assert not res.selected[torch.tensor([s for s in range(len(ids)) if not res.reused[s]])].logical_not().any()


def test_planted_deviation_is_what_cacheblend_recomputes() -> None:
    model = tiny_llama()
    ids, prefix, docs, spans, segs = *prompt(1), None
    segs = [compute_segment(model, d, prefix=prefix) for d in docs]
    hot = [spans[0][0] + 3, spans[0][0] + 9, spans[1][0] + 2, spans[1][0] + 15]
    for pos in hot:  # plant at the check layer only: layer 0 stays intact, so the integrity check passes
        j = 0 if pos < spans[0][1] else 1
        segs[j].kv[1, 1, pos - spans[j][0]] += 40.0
    res = blend_prefill(model, ids, spans, segs, CacheBlend(recompute_ratio=len(hot) / 31))
    assert res.refused == []
    assert torch.nonzero(res.selected & res.reused).flatten().tolist() == hot
    assert set(torch.topk(res.deviation, len(hot)).indices.tolist()) == set(hot)


def test_corrupted_segment_is_refused_and_recomputed() -> None:
    model = tiny_llama()
    ids, prefix, docs, spans = prompt(2)
    segs = [compute_segment(model, d, prefix=prefix) for d in docs]
    bad = [segs[0], compute_segment(model, docs[1], prefix=prefix)]
    bad[1].kv[:, 0] += torch.randn_like(bad[1].kv[:, 0])  # keys of every layer
    for name in ("none", "cacheblend", "epic"):
        res = blend_prefill(model, ids, spans, bad, get_strategy(name))
        assert res.refused == [1]
        ok = blend_prefill(model, ids, spans[:1], segs[:1], get_strategy(name))  # segment 1 computed fresh
        torch.testing.assert_close(res.logits, ok.logits, atol=2e-5, rtol=1e-5)
    unchecked = blend_prefill(model, ids, spans, bad, get_strategy("none"), verify=False)
    assert unchecked.refused == [] and (unchecked.logits - res.logits).abs().max() > 1e-3


def test_another_model_never_blends_this_ones_segment() -> None:
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)  # same shapes, other weights
    ids, prefix, docs, spans = prompt(3)
    foreign = [compute_segment(a, d, prefix=prefix) for d in docs]
    res = blend_prefill(b, ids, spans, foreign, get_strategy("none"))
    assert res.refused == [0, 1]
    torch.testing.assert_close(res.logits, full_prefill_logits(b, ids), atol=2e-5, rtol=1e-5)


def _ns(model_id: str, tenant: str = "") -> Namespace:
    return Namespace(model=model_id, dtype="float32", num_layers=3, num_kv_heads=2, head_dim=16, tenant_salt=tenant)


def test_keys_keep_models_and_tenants_apart() -> None:
    model = tiny_llama()
    ids, prefix, docs, spans = prompt(4)
    seg = compute_segment(model, docs[0], prefix=prefix)
    mem = MemoryStore()
    mine, other_model, other_tenant = (SegmentStore(mem, _ns("tiny-a")), SegmentStore(mem, _ns("tiny-b")),
                                       SegmentStore(mem, _ns("tiny-a", tenant="t2")))  # fmt: skip
    key = mine.put(seg, prefix)
    got = mine.get(docs[0], prefix)
    assert got is not None and torch.equal(got.kv, seg.kv) and torch.equal(got.positions, seg.positions)
    assert len({key, other_model.key(docs[0], prefix), other_tenant.key(docs[0], prefix)}) == 3
    assert other_model.get(docs[0], prefix) is None and other_tenant.get(docs[0], prefix) is None
    assert mine.get(docs[0], prefix=prefix[1:]) is None  # computed after another prefix: another key
    # bytes copied under another namespace's key are refused (key binding in the frame), and deleted
    mem.put(other_model.key(docs[0], prefix), mem.get(key))
    assert other_model.get(docs[0], prefix) is None and other_model.refused == 1
    assert mem.get(other_model.key(docs[0], prefix)) is None
    # a flipped byte in the body is refused too
    raw = bytearray(mem.get(key))
    raw[-5] ^= 0x01
    mem.put(key, bytes(raw))
    assert mine.get(docs[0], prefix) is None and mine.refused == 1


def test_generate_from_the_blended_cache() -> None:
    model = tiny_llama()
    ids, prefix, docs, spans = prompt(5)
    segs = [compute_segment(model, d, prefix=prefix) for d in docs]
    res = blend_prefill(model, ids, spans, segs, get_strategy("full"))
    first = int(res.logits.argmax())
    with torch.no_grad():
        ours = model.generate(torch.tensor([ids + [first]]), past_key_values=res.cache(), max_new_tokens=5,
                              do_sample=False)[0, len(ids):].tolist()  # fmt: skip
        plain = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :].tolist()
    assert ours == plain == res.generate(6)


def test_ape_reduces_to_concatenation_at_unit_temperature() -> None:
    model = tiny_llama()
    ids, prefix, docs, spans = prompt(6)
    one = [compute_segment(model, docs[0], prefix=prefix)]
    none = blend_prefill(model, ids, spans[:1], one, get_strategy("none"))
    unit = blend_prefill(model, ids, spans[:1], one, get_strategy("ape", temperature=1.0, scale=1.0))
    torch.testing.assert_close(unit.logits, none.logits, atol=2e-5, rtol=1e-5)
    segs = [compute_segment(model, d, prefix=prefix) for d in docs]
    ape = blend_prefill(model, ids, spans, segs, get_strategy("ape"))
    assert (ape.logits - blend_prefill(model, ids, spans, segs, get_strategy("none")).logits).abs().max() > 1e-3
    positions = ape.session.pos.tolist()
    assert positions[spans[0][0]] == positions[spans[1][0]] == len(prefix)  # parallel encoding: one position range
    assert len(ape.generate(3)) == 3 and ape.session.pos[-1] == max(positions) + 2
    with pytest.raises(ValueError, match="APE"):
        ape.cache()


def test_kvshare_decode_stage_recomputes_stale_tokens() -> None:
    model = tiny_llama()
    ids, prefix, docs, spans = prompt(7)
    segs = [compute_segment(model, d, prefix=prefix) for d in docs]
    eager = KVShare(deviation_threshold=0.0, recompute_ratio=0.1, decode_attention=0.0, decode_tokens=2)
    res = blend_prefill(model, ids, spans, segs, eager)
    res.generate(3)
    assert res.decode_triggers >= 1 and res.repaired is not None and 0 < int(res.repaired.sum()) <= 3
    assert not (res.repaired & res.selected).any()  # only rows the prefill left stale
    calm = blend_prefill(model, ids, spans, segs, KVShare(decode_attention=1.0))
    calm.generate(3)
    assert calm.decode_triggers == 0


def test_cacheraft_statistics_and_selection() -> None:
    model = tiny_llama()
    ids, prefix, docs, spans = prompt(8)
    s = get_strategy("cacheraft", recompute_ratio=0.3)
    segs = [compute_segment(model, d, prefix=prefix, strategy=s) for d in docs]
    inter = torch.tensor(segs[1].meta["inter"])
    assert inter.numel() == len(docs[1]) and 0 <= inter.min() and inter.max() <= 1 and inter.max() > 0
    res = blend_prefill(model, ids, spans, segs, s, keys=["d0", "d1"])
    picked = int((res.selected & res.reused).sum())
    assert not res.selected[spans[0][0] : spans[0][1]].any()  # the first document's context is unchanged
    assert abs(picked - round(0.3 * 31)) <= 1


def test_guard_falls_back_to_full_prefill() -> None:
    model = tiny_llama()
    ids, prefix, docs, spans = prompt(9)
    segs = [compute_segment(model, d, prefix=prefix) for d in docs]
    res = blend_prefill(model, ids, spans, segs, CacheBlend(max_deviation=1e-9))
    assert res.fallback is not None and "deviation" in res.fallback
    torch.testing.assert_close(res.logits, full_prefill_logits(model, ids), atol=2e-5, rtol=1e-5)


def test_unsupported_model_is_a_clear_error() -> None:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(NotImplementedError, match="gpt2"):
        blend_prefill(model, [1, 2, 3], [], [], get_strategy("none"))
