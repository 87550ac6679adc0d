"""Layout adapters: round trips on synthetic tensors (every CUDA stride order, on CPU), and the CPU layout
against Hugging Face's own KV."""

import pytest
import torch

from kvplug.integrations.vllm.layouts import BHNCAdapter, CpuVecAdapter, adapter_for, token_slots

B, H, N, D = 10, 3, 32, 64


def physical(order):
    """A logical [B, H, N, 2D] view over storage in another physical order (as vLLM's KVCacheLayout does)."""
    logical = (B, H, N, 2 * D)
    phys = torch.zeros([logical[i] for i in order])
    inverse = [order.index(i) for i in range(4)]
    return phys.permute(*inverse)


@pytest.mark.parametrize("adapter_cls", [BHNCAdapter, CpuVecAdapter])
def test_round_trip_non_contiguous_blocks_partial_range(adapter_cls):
    a = adapter_cls(D)
    cache = torch.zeros(B, H, N, 2 * D)
    blocks = torch.tensor([7, 2, 9])  # block ids are not contiguous
    kv = torch.randn(2, 70, H, D)
    b, o = token_slots(blocks, 10, 80, N)
    a.scatter(cache, b, o, kv)
    assert torch.equal(a.gather(cache, b, o), kv)
    untouched = [i for i in range(B) if i not in (7, 2, 9)]
    assert cache[untouched].abs().sum() == 0
    b0, o0 = token_slots(blocks, 0, 10, N)
    assert a.gather(cache, b0, o0).abs().sum() == 0  # tokens before the range untouched


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (0, 2, 1, 3), (1, 0, 2, 3)])
def test_bhnc_any_physical_order(order):
    cache = physical(order)
    a = BHNCAdapter(D)
    blocks = torch.tensor([3, 4])
    kv = torch.randn(2, 64, H, D)
    b, o = token_slots(blocks, 0, 64, N)
    a.scatter(cache, b, o, kv)
    assert torch.equal(a.gather(cache, b, o), kv)
    # matches how vLLM's CUDA backends split the view
    k_cache, v_cache = cache.transpose(1, 2).split(D, dim=-1)
    assert torch.equal(k_cache[3, 5], kv[0, 5]) and torch.equal(v_cache[4, 1], kv[1, 33])


def test_cpu_vec_layout_is_transposed_keys_then_values():
    cache = torch.zeros(B, H, N, 2 * D)
    kv = torch.randn(2, N, H, D)
    b, o = token_slots(torch.tensor([1]), 0, N, N)
    CpuVecAdapter(D).scatter(cache, b, o, kv)
    slab = cache[1].reshape(H, -1)
    assert torch.equal(slab[:, : D * N].reshape(H, D, N), kv[0].permute(1, 2, 0))
    assert torch.equal(slab[:, D * N :].reshape(H, N, D), kv[1].permute(1, 0, 2))


def test_adapter_selection_and_refusals():
    assert isinstance(adapter_for("CPU_ATTN", D, "vec"), CpuVecAdapter)
    assert isinstance(adapter_for("FLASHINFER", D), BHNCAdapter)
    for isa in ("amx", "vec16", "neon"):
        with pytest.raises(NotImplementedError, match=isa):
            adapter_for("CPU_ATTN", D, isa)
    with pytest.raises(NotImplementedError, match="not supported"):
        adapter_for("FLEX_ATTENTION", D)
    with pytest.raises(ValueError, match="blocks"):
        token_slots(torch.tensor([0]), 0, 40, N)


@pytest.mark.parametrize("adapter_cls", [BHNCAdapter, CpuVecAdapter])
def test_block_copies_equal_token_copies(adapter_cls):
    a = adapter_cls(D)
    blocks = torch.tensor([7, 2, 9])
    kv = torch.randn(2, 3 * N, H, D)
    by_token, by_block = torch.zeros(B, H, N, 2 * D), torch.zeros(B, H, N, 2 * D)
    b, o = token_slots(blocks, 0, 3 * N, N)
    a.scatter(by_token, b, o, kv)
    a.scatter_blocks(by_block, blocks, kv)
    assert torch.equal(by_token, by_block)
    assert torch.equal(a.gather_blocks(by_block, blocks), kv)
    assert torch.equal(a.gather_blocks(by_block, blocks[1:]), kv[:, N:])


@pytest.mark.parametrize("adapter_cls", [BHNCAdapter, CpuVecAdapter])
def test_stacked_layers_write_every_layer_in_one_copy(adapter_cls):
    from kvplug.integrations.vllm.layouts import stacked_layers

    L = 4
    buf = torch.zeros(L * B * H * N * 2 * D)
    layers = [buf[i * B * H * N * 2 * D : (i + 1) * B * H * N * 2 * D].view(B, H, N, 2 * D) for i in range(L)]
    stacked = stacked_layers(layers)
    assert stacked is not None and stacked.shape == (L, B, H, N, 2 * D)
    a = adapter_cls(D)
    blocks = torch.tensor([5, 1])
    kv = torch.randn(L, 2, 2 * N, H, D)
    a.scatter_blocks(stacked, blocks, kv)
    for i in range(L):  # each layer holds its own slice, exactly as a per-layer write leaves it
        ref = torch.zeros(B, H, N, 2 * D)
        a.scatter_blocks(ref, blocks, kv[i])
        assert torch.equal(layers[i], ref)
    assert torch.equal(a.gather_blocks(stacked, blocks), kv)
    assert stacked_layers([layers[0], layers[2], layers[1]]) is None  # not a constant stride
    assert stacked_layers([torch.zeros(B, H, N, 2 * D), torch.zeros(B, H, N, 2 * D)]) is None  # two allocations


def test_grouped_paged_kv_model_order_and_null_blocks():
    """Hybrid models: vLLM groups layers (e.g. Gemma-3: 0,6,12 | 1,7,13 | ... ) and the groups share memory
    regions with group-owned block ids; out-of-window slots hold the null block 0."""
    from kvplug.integrations.vllm.loading import PagedKV

    regions = [torch.zeros(B, H, N, 2 * D) for _ in range(2)]  # layer j of every group lives in region j
    groups = [[regions[0], regions[1]], [regions[0], regions[1]]]
    paged = PagedKV(groups, CpuVecAdapter(D), N, positions=[[0, 2], [1, 3]])  # model layers 0,2 | 1,3
    kv = torch.randn(4, 2, 2 * N, H, D)
    ids = [torch.tensor([0, 5]), torch.tensor([3, 7])]  # group 0's first block is out of its window
    paged.write(kv, ids)
    a = CpuVecAdapter(D)
    assert torch.equal(a.gather_blocks(regions[0], torch.tensor([5])), kv[0, :, N:])  # group 0 layer 0 = model 0
    assert torch.equal(a.gather_blocks(regions[1], torch.tensor([5])), kv[2, :, N:])  # group 0 layer 1 = model 2
    assert torch.equal(a.gather_blocks(regions[0], torch.tensor([3, 7])), kv[1])  # group 1 layer 0 = model 1
    assert torch.equal(a.gather_blocks(regions[1], torch.tensor([3, 7])), kv[3])
    assert regions[0][0].abs().sum() == 0  # the null block was never written
    assert paged.read(ids) is None  # a group lost these tokens: nothing whole to read
    back = paged.read([torch.tensor([5]), torch.tensor([7])])
    assert torch.equal(back[[0, 2]], kv[[0, 2], :, N:]) and torch.equal(back[[1, 3]], kv[[1, 3], :, N:])
    with pytest.raises(ValueError, match="exactly once"):
        PagedKV(groups, CpuVecAdapter(D), N, positions=[[0, 1], [1, 3]])
