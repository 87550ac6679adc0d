"""Sparse selection methods on constructed cases: the planted relevant unit is chosen, forced units are kept,
full budgets equal dense attention, pooled tokens are exact where the pooled keys are, reuse behaves."""

from __future__ import annotations

import pytest
import torch

from kvplug.errors import ConfigError
from kvplug.kernels.reference import dense_decode_attention
from kvplug.methods import sparse
from kvplug.methods.sparse.attention import attend_contiguous

H, HQ, D = 2, 4, 32


def _keys(t: int, seed: int = 0, scale: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, H, D, generator=g) * scale, torch.randn(t, H, D, generator=g)


def _plant(keys: torch.Tensor, q: torch.Tensor, start: int, n: int) -> None:
    """Make tokens start..start+n strongly aligned with the query of every head group."""
    for h in range(H):
        keys[start : start + n, h] = q.view(H, -1, D)[h].mean(0) * 3


def _state(method: sparse.SparseMethod, keys, values, unit: int, ids=None):
    st = method.new_state(H, D, unit)
    n = (keys.shape[0] - 1) // unit * unit  # the unit holding the last token stays the tail
    method.append(st, keys[:n], values[:n], None if ids is None else ids[:n])
    return st


@pytest.mark.parametrize("method", [sparse.Quest(budget=256), sparse.HierarchicalTopK(budget=256, pooled=False)])
def test_planted_unit_is_selected(method: sparse.SparseMethod) -> None:
    t, unit = 2048 + 5, 16
    keys, values = _keys(t)
    q = torch.randn(HQ, D)
    _plant(keys, q, 992, 16)  # exactly unit 62
    st = _state(method, keys, values, unit)
    sel = method.select(q, st, t)
    assert not sel.dense
    assert sel.units.shape == (H, 256 // unit - 1)  # the tail unit takes one unit of the budget
    for h in range(H):
        chosen = set(sel.units[h].tolist())
        assert 62 in chosen
        assert set(range(2)) <= chosen  # sink (32 tokens)
        assert {(t - 32) // unit, st.n_units - 1} <= chosen  # recent window
    # the opposite query ranks the planted unit last: the selection depends on the query
    miss = method.select(-q, st, t)
    assert all(62 not in set(miss.units[h].tolist()) for h in range(H))


def test_sentencekv_selects_the_planted_sentence() -> None:
    t, unit = 1500 + 3, 1
    keys, values = _keys(t, 1)
    q = torch.randn(HQ, D)
    dot = 7
    ids = [5] * t
    for end in range(19, t, 20):  # a sentence every 20 tokens
        ids[end] = dot
    _plant(keys, q, 700, 20)  # sentence 35: tokens 700..719
    method = sparse.SentenceKV(budget=128, punctuation_ids=frozenset({dot}))
    st = _state(method, keys, values, unit, ids)
    assert method.select(q, st, t, token_id=5).dense  # first generated token: the sentence holds 1 token
    sel = method.select(q, st, t, token_id=5)  # second: mean query of 2 (the same q)
    assert not sel.dense
    for h in range(H):
        assert set(range(700, 720)) <= set(sel.units[h].tolist())
    assert method.select(q, st, t, token_id=dot).dense  # a sentence end resets the query: dense step


def test_sentencekv_sentence_means_and_blocks() -> None:
    keys, values = _keys(64, 2)
    ids = [1] * 64
    ids[9] = ids[40] = 99
    method = sparse.SentenceKV(budget=32, punctuation_ids=frozenset({99}))
    st = method.new_state(H, D, 16)
    method.append(st, keys[:32], values[:32], ids[:32])
    method.append(st, keys[32:64], values[32:64], ids[32:64])
    means = st.summaries["ksum"].data / st.summaries["count"].data.view(1, -1, 1)
    torch.testing.assert_close(means[:, 0], keys[:10].mean(0))
    torch.testing.assert_close(means[:, 1], keys[10:41].mean(0))  # spans the append boundary
    torch.testing.assert_close(means[:, 2], keys[41:64].mean(0))
    # a unit scores as the best sentence touching it (unit 1: tokens 0..15 -> sentences 0, 1; unit 2: 1, 2 ...)
    q = torch.randn(HQ, D)
    sent = torch.einsum("hgd,hsd->hgs", q.view(H, 2, D), means).amax(1)  # [H, 3]
    sid = torch.tensor([0] * 10 + [1] * 31 + [2] * 23)
    want = torch.stack([sent[:, sid[u * 16 : (u + 1) * 16].unique()].amax(-1) for u in range(4)], dim=1)
    torch.testing.assert_close(method.unit_scores(q, st, 2), want)
    with pytest.raises(ValueError, match="token ids"):
        method.append(st, keys[:16], values[:16], None)


@pytest.mark.parametrize(
    "method",
    [
        sparse.Quest(budget=4096, dense_layers=0),
        sparse.HierarchicalTopK(budget=4096),
        sparse.SentenceKV(budget=4096, length_threshold=0, punctuation_ids=frozenset({3})),
    ],
)
def test_budget_covering_everything_equals_dense(method: sparse.SparseMethod) -> None:
    t, unit = 1000, 16
    keys, values = _keys(t, 3, scale=1.0)
    q = torch.randn(HQ, D)
    ids = [3 if i % 17 == 0 else 4 for i in range(t)]
    st = _state(method, keys, values, unit, ids)
    sel = method.select(q, st, t, token_id=4)
    assert sel.dense and sel.units.shape == (H, st.n_units)
    got = attend_contiguous(q, keys, values, sel, unit, st.n_units, 0.2)
    want = dense_decode_attention(q[None], keys[None], values[None], 0.2)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sparse_attention_changes_output_and_tracks_budget() -> None:
    t, unit = 1000, 16
    keys, values = _keys(t, 4, scale=1.0)
    q = torch.randn(HQ, D)
    method = sparse.Quest(budget=128, dense_layers=0)
    st = _state(method, keys, values, unit)
    sel = method.select(q, st, t)
    got = attend_contiguous(q, keys, values, sel, unit, st.n_units, 0.2)
    want = dense_decode_attention(q[None], keys[None], values[None], 0.2)[0]
    assert (got - want).abs().max() > 1e-3
    # the same as attending exactly the selected tokens
    mask = torch.zeros(H, t, dtype=torch.bool)
    for h in range(H):
        for u in sel.units[h].tolist():
            mask[h, u * unit : (u + 1) * unit] = True
        mask[h, st.n_units * unit :] = True
        assert int(mask[h].sum()) <= 128
    logits = torch.einsum("hgd,thd->hgt", q.view(H, 2, D), keys) * 0.2
    p = torch.softmax(logits.masked_fill(~mask[:, None], float("-inf")), -1)
    torch.testing.assert_close(got, torch.einsum("hgt,thd->hgd", p, values).reshape(HQ, D), rtol=1e-5, atol=1e-6)


def test_dense_layers_and_short_contexts_are_dense() -> None:
    keys, values = _keys(600, 5)
    q = torch.randn(HQ, D)
    method = sparse.Quest(budget=128)
    st = _state(method, keys, values, 16)
    assert method.select(q, st, 600, layer=0).dense and method.select(q, st, 600, layer=1).dense
    assert not method.select(q, st, 600, layer=2).dense
    short = _state(method, keys[:100], values[:100], 16)
    assert method.select(q, short, 100, layer=5).dense


def test_hierarchical_pooled_tokens_are_exact_for_constant_blocks() -> None:
    """Where every super-block's keys and values are constant, a pooled token weighted by its token count is
    exactly the tokens it stands for: hierarchical attention with pooling then equals dense attention."""
    unit, sup = 16, 64
    t = 40 * sup + 7
    g = torch.Generator().manual_seed(6)
    kb, vb = torch.randn(t // sup + 1, H, D, generator=g), torch.randn(t // sup + 1, H, D, generator=g)
    idx = torch.arange(t) // sup
    keys, values = kb[idx].clone(), vb[idx].clone()
    q = torch.randn(HQ, D)
    method = sparse.HierarchicalTopK(budget=160, super_tokens=sup, top_super=2)
    st = _state(method, keys, values, unit)
    sel = method.select(q, st, t)
    assert sel.extra_k is not None and not sel.dense
    got = attend_contiguous(q, keys, values, sel, unit, st.n_units, 0.3)
    want = dense_decode_attention(q[None], keys[None], values[None], 0.3)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # every summarised token is represented exactly once: full units + pooled weights
    w = sel.extra_logw.exp().nan_to_num(0.0).sum(1)
    torch.testing.assert_close(w + sel.units.shape[1] * unit, torch.full((H,), float(st.n_units * unit)))
    plain = sparse.HierarchicalTopK(budget=160, super_tokens=sup, top_super=2, pooled=False)
    st2 = _state(plain, keys, values, unit)
    sel2 = plain.select(q, st2, t)
    assert sel2.extra_k is None
    assert (attend_contiguous(q, keys, values, sel2, unit, st2.n_units, 0.3) - want).abs().max() > 1e-3


def test_hierarchical_scores_only_units_of_top_super_blocks() -> None:
    keys, values = _keys(4096 + 3, 7)
    q = torch.randn(HQ, D)
    method = sparse.HierarchicalTopK(budget=128, super_tokens=256, top_super=4, pooled=False)
    st = _state(method, keys, values, 16)
    s = method.unit_scores(q, st, 8)
    finite = torch.isfinite(s).sum(1)
    assert (finite <= 4 * 16).all()  # 4 super-blocks of 16 units each, not all 255 units


def test_selection_reuse() -> None:
    keys, values = _keys(2000, 8)
    q = torch.randn(HQ, D)
    method = sparse.Quest(budget=128, dense_layers=0, reuse_threshold=0.9)
    st = _state(method, keys, values, 16)
    a = method.select(q, st, 2000)
    b = method.select(q * 1.01 + 0.001, st, 2000)  # nearly the same query: reused
    assert not a.reused and b.reused and torch.equal(a.units, b.units)
    c = method.select(torch.randn(HQ, D), st, 2000)  # an unrelated query ranks again
    assert not c.reused
    assert (st.selections, st.reuses) == (2, 1)
    off = sparse.Quest(budget=128, dense_layers=0)
    st2 = _state(off, keys, values, 16)
    off.select(q, st2, 2000)
    assert not off.select(q, st2, 2000).reused


def test_state_grows_across_appends() -> None:
    keys, values = _keys(64 * 40, 9)
    method = sparse.Quest(budget=128)
    st = method.new_state(H, D, 32)
    for i in range(40):
        method.append(st, keys[i * 64 : (i + 1) * 64], None, None)
    assert st.n_units == 80
    bounds = st.summaries["bounds"].data  # [H, pages, 2D]: page max then min
    torch.testing.assert_close(bounds[:, 5, :D], keys[80:96].amax(0))  # page 5 of 16 tokens
    torch.testing.assert_close(bounds[:, 5, D:], keys[80:96].amin(0))
    with pytest.raises(ValueError, match="multiple of the unit"):
        method.append(st, keys[:10], None, None)


def test_quest_scores_are_the_kernel_bound() -> None:
    """The fused CPU scoring equals kvplug.kernels.block_scores on the same page bounds (max over a unit's pages)."""
    from kvplug.kernels import reference

    keys, values = _keys(64 * 10, 10, scale=1.0)
    q = torch.randn(HQ, D)
    for reduce in ("max", "sum"):
        method = sparse.Quest(budget=128, group_reduce=reduce)
        st = _state(method, keys, values, 32)
        pages = keys[: st.n_units * 32].view(-1, 16, H, D)
        want = reference.block_scores(q[None], pages.amax(1), pages.amin(1), None, torch.tensor([len(pages)]), reduce)
        got = method.unit_scores(q, st, 4)
        torch.testing.assert_close(got, want[0].view(H, -1, 2).amax(-1))


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="unknown sparse method 'nope'"):
        sparse.get("nope")
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['budgt'\]"):
        sparse.get("quest", budgt=5)
    with pytest.raises(ConfigError, match="budget must be >= 1"):
        sparse.get("quest", budget=0)
    with pytest.raises(ConfigError, match="reuse_threshold"):
        sparse.get("sentencekv", reuse_threshold=1.5)
    with pytest.raises(ConfigError, match="group_reduce"):
        sparse.get("hierarchical", group_reduce="mean")
    assert sparse.get("quest", budget=512).budget == 512


def test_sentence_end_ids_from_a_tokenizer() -> None:
    class Tok:
        vocab = {".": 1, "Ġ.": 2, "!": 3, "ĊĊ": 4, "the": 5, "a.b": 6}
        text = {".": ".", "Ġ.": " .", "!": "!", "ĊĊ": "\n\n", "the": "the", "a.b": "a.b"}

        def get_vocab(self):
            return self.vocab

        def convert_tokens_to_string(self, toks):
            return "".join(self.text[t] for t in toks)

    assert sparse.sentence_end_ids(Tok()) == {1, 2, 3, 4}
