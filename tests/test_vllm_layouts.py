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
