"""The vLLM sparse backend's attention path without an engine: vLLM's real CPU kernel on a synthetic paged cache
(scattered blocks, vLLM's CPU layout), checked against the torch reference of the same selection; plus the
engine and per-request configuration."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.vllm_helpers import require_vllm

require_vllm()

from kvplug.errors import ConfigError  # noqa: E402
from kvplug.kernels import reference  # noqa: E402
from kvplug.methods import sparse  # noqa: E402

HQ, H, D, BS = 9, 3, 64, 32
NAME = "model.layers.4.self_attn.attn"


@pytest.fixture(scope="module")
def sb():
    from kvplug.integrations.vllm import sparse_backend

    return sparse_backend


@pytest.fixture(scope="module")
def impl(sb):
    from vllm.v1.attention.backends import cpu_attn

    real = cpu_attn.get_current_vllm_config  # the impl reads the model dtype from the current config
    cpu_attn.get_current_vllm_config = lambda: SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))
    try:
        return sb.SparseCPUAttentionImpl(HQ, D, D**-0.5, H, None, None, "auto")
    finally:
        cpu_attn.get_current_vllm_config = real


LAYER = SimpleNamespace(layer_name=NAME, isa="vec", _k_scale_float=1.0, _v_scale_float=1.0)


def _cache(nb: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(nb, H, BS, 2 * D, generator=torch.Generator().manual_seed(seed))


def _row(sb, kv: torch.Tensor, method: sparse.SparseMethod, n: int, blocks: torch.Tensor, token: int):
    kt, v = sb._vec_views(kv, D)
    full = (n - 1) // BS
    st = method.new_state(H, D, BS)
    keys = kt[blocks[:full]].permute(0, 3, 1, 2).reshape(-1, H, D)
    values = v[blocks[:full]].permute(0, 2, 1, 3).reshape(-1, H, D)
    method.append(st, keys, values if method.needs_values else None, [5] * (full * BS))
    req = sb._Request(method, 0, {NAME: st})
    return sb._Row(token, req, n, 5, blocks[: full + 1])


def _expected(sb, kv, q, rows, method) -> torch.Tensor:
    """The reference attention of each row over the units ``method`` selects (deterministic for these methods)."""
    kt, v = sb._vec_views(kv, D)
    outs = []
    for r, row in enumerate(rows):
        st = row.req.states[NAME]
        sel = method.select(q[r], st, row.n, layer=4)
        n_units = (row.n - 1) // BS
        table = torch.cat([row.blocks[sel.units], row.blocks[n_units:].expand(H, -1)], dim=1)
        seq = torch.full((1, H), sel.units.shape[1] * BS + row.n - n_units * BS)
        extra = {}
        if sel.extra_k is not None:
            extra = {"extra_k": sel.extra_k[None], "extra_v": sel.extra_v[None], "extra_logw": sel.extra_logw[None]}
        o = reference.paged_decode_attention(q[r : r + 1], kt.transpose(-1, -2), v, table[None], seq, D**-0.5, **extra)
        outs.append(o[0])
    return torch.stack(outs)


@pytest.mark.parametrize(
    "method",
    [sparse.Quest(budget=256, dense_layers=0), sparse.HierarchicalTopK(budget=256, super_tokens=128)],
    ids=["quest-stock-kernel", "hierarchical-pooled"],
)
def test_sparse_rows_match_the_reference(sb, impl, method) -> None:
    kv = _cache(120)
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(1))
    rows = [_row(sb, kv, method, 1500, perm[:60], 0), _row(sb, kv, method, 2113, perm[50:117], 1)]  # shared blocks
    q = torch.randn(2, HQ, D)
    step = sb.SparseStep(rows, torch.tensor([0, 1]), {NAME: 4}, last_layer=4)
    out = torch.zeros(2, HQ, D)
    impl.forward(LAYER, q, q, q, kv, SimpleNamespace(sparse=step), out)
    torch.testing.assert_close(out, _expected(sb, kv, q, rows, method), rtol=1e-4, atol=1e-5)
    assert step.counts == {}  # flushed after the last layer


def _dense_meta(blocks: list[torch.Tensor], lens: list[int], qlens: list[int]):
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    from kvplug.integrations.vllm import _compat

    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    seq = torch.tensor(lens, dtype=torch.int32)
    width = max(len(b) for b in blocks)
    table = torch.zeros(len(blocks), width, dtype=torch.int32)
    for i, b in enumerate(blocks):
        table[i, : len(b)] = b
    sched = _compat.cpu_scheduler_metadata(len(lens), HQ, H, D, seq, torch.float32, qsl, -1, "vec", "auto")
    return CPUAttentionMetadata(sum(qlens), max(qlens), qsl, max(lens), seq, table, torch.empty(0), sched)


def test_full_selection_equals_the_stock_kernel_and_mixed_batches(sb, impl) -> None:
    """Row 0 sparse with a budget covering it (the compacted table is the whole table), row 1 a 3-token prefill
    on the stock path (its own sub-batch): both equal vLLM's kernel on the whole batch."""
    kv = _cache(80, 2)
    perm = torch.randperm(80, generator=torch.Generator().manual_seed(3))
    b0, b1 = perm[:40], perm[40:70]
    q = torch.randn(4, HQ, D)
    full = _dense_meta([b0[:32], b1], [1000, 940], [1, 3])
    want = torch.zeros(4, HQ, D)
    impl.forward(LAYER, q, q, q, kv, full, want)  # plain metadata: the stock path
    method = sparse.Quest(budget=4096, dense_layers=0)
    row = _row(sb, kv, method, 1000, b0, 0)
    fake_builder = SimpleNamespace(
        num_heads=HQ, num_kv_heads=H, head_dim=D, dtype=torch.float32, window_size=-1, isa="vec", kv_cache_dtype="auto"
    )
    dense_idx, dense_meta = sb.SparseCPUMetadataBuilder._sub_batch(fake_builder, full, [1])
    step = sb.SparseStep([row], torch.tensor([0]), {NAME: 4}, dense_idx, dense_meta, last_layer=4)
    got = torch.zeros(4, HQ, D)
    impl.forward(LAYER, q, q, q, kv, SimpleNamespace(sparse=step), got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(dense_idx, torch.tensor([1, 2, 3]))


def test_a_failing_sparse_path_falls_back_to_dense(sb, impl) -> None:
    kv = _cache(40, 4)
    blocks = torch.arange(40)
    method = sparse.Quest(budget=128, dense_layers=0)
    row = _row(sb, kv, method, 1200, blocks, 0)
    row.req.states[NAME].summaries.clear()  # a broken state: selection raises
    full = _dense_meta([blocks[:38]], [1200], [1])
    want = torch.zeros(1, HQ, D)
    q = torch.randn(1, HQ, D)
    impl.forward(LAYER, q, q, q, kv, full, want)
    step = sb.SparseStep([row], torch.tensor([0]), {NAME: 4}, last_layer=4)
    meta = sb.SparseCPUAttentionMetadata(**{k: getattr(full, k) for k in full.__dataclass_fields__}, sparse=step)
    got = torch.zeros(1, HQ, D)
    impl.forward(LAYER, q, q, q, kv, meta, got)
    torch.testing.assert_close(got, want)  # dense answer, no exception
    assert row.req.failed  # and the request stays dense from now on


def test_engine_and_request_config(sb) -> None:
    cfg = sb.SparseConfig.parse({"method": "quest", "budget": 512, "requests": "all"}, "test")
    m, dense_up_to = cfg.for_request(None)
    assert isinstance(m, sparse.Quest) and m.budget == 512 and dense_up_to == 512
    assert cfg.for_request(False) == (None, 0)
    m, dense_up_to = cfg.for_request({"budget": 256, "dense_up_to": 0})
    assert isinstance(m, sparse.Quest) and m.budget == 256 and dense_up_to == 0
    m, _ = cfg.for_request({"method": "sentencekv"})
    assert isinstance(m, sparse.SentenceKV) and m.budget == 1024  # another method: its own defaults
    opt_in = sb.SparseConfig.parse("hierarchical", "env")
    assert opt_in.method == "hierarchical"
    assert sb.SparseConfig.parse({"method": "quest", "requests": "opt-in"}, "t").for_request(None) == (None, 0)
    with pytest.raises(ConfigError, match="'method' is required"):
        sb.SparseConfig.parse({"budget": 5}, "t")
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['bugdet'\]"):
        sb.SparseConfig.parse({"method": "quest", "bugdet": 5}, "t")
    with pytest.raises(ConfigError, match="requests must be"):
        sb.SparseConfig.parse({"method": "quest", "requests": "some"}, "t")
    with pytest.raises(ConfigError, match="must be true, false or an object"):
        cfg.for_request("yes")
