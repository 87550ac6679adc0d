"""The sparse-attention kernels: torch references against brute force, Triton kernels against the references under
the Triton interpreter (``TRITON_INTERPRET=1``: kernel logic checked on CPU, no GPU needed)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from types import ModuleType

import pytest
import torch

from kvplug import kernels
from kvplug.kernels import reference as ref


def _cpu_vec_cache(nb: int, h: int, bs: int, d: int, dtype: torch.dtype = torch.float32):
    """A paged cache in vLLM's CPU layout (K transposed per block and head) and its [nb, H, bs, D] views."""
    kv = torch.randn(nb, h, bs, 2 * d).to(dtype)
    slab = kv.view(nb, h, 2, d * bs)
    return slab[:, :, 0].view(nb, h, d, bs).transpose(-1, -2), slab[:, :, 1].view(nb, h, bs, d)


def _brute(q, kc, vc, tables, seq_lens, scale, extra=None):
    """Gather the attended tokens one by one and run plain softmax attention."""
    b, hq, d = q.shape
    h, bs = kc.shape[1], kc.shape[2]
    g = hq // h
    out = torch.empty(b, hq, d)
    for i in range(b):
        for j in range(h):
            n = int(seq_lens[i, j])
            ks = torch.stack([kc[tables[i, j, t // bs], j, t % bs] for t in range(n)]).float()
            vs = torch.stack([vc[tables[i, j, t // bs], j, t % bs] for t in range(n)]).float()
            logw = torch.zeros(n)
            if extra is not None:
                ek, ev, el = extra
                keep = el[i, j] > float("-inf")
                ks, vs = torch.cat([ks, ek[i, j][keep]]), torch.cat([vs, ev[i, j][keep]])
                logw = torch.cat([logw, el[i, j][keep]])
            for gi in range(g):
                qq = q[i, j * g + gi].float()
                p = torch.softmax(ks @ qq * scale + logw, 0)
                out[i, j * g + gi] = p @ vs
    return out


def _case(seed: int = 0, b: int = 2, hq: int = 9, h: int = 3, d: int = 64, bs: int = 32, nb: int = 24, s: int = 6):
    torch.manual_seed(seed)
    kc, vc = _cpu_vec_cache(nb, h, bs, d)
    q = torch.randn(b, hq, d)
    tables = torch.stack([torch.stack([torch.randperm(nb)[:s] for _ in range(h)]) for _ in range(b)]).int()
    seq_lens = torch.randint((s - 1) * bs + 1, s * bs + 1, (b, h)).int()
    seq_lens[0, 0] = 1  # a single token
    return q, kc, vc, tables, seq_lens


def test_paged_reference_matches_brute_force() -> None:
    q, kc, vc, tables, seq_lens = _case()
    got = ref.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.125)
    torch.testing.assert_close(got, _brute(q, kc, vc, tables, seq_lens, 0.125), rtol=1e-4, atol=1e-5)


def test_paged_reference_with_pooled_entries() -> None:
    q, kc, vc, tables, seq_lens = _case(1)
    ek, ev = torch.randn(2, 3, 5, 64), torch.randn(2, 3, 5, 64)
    el = torch.tensor([0.0, 2.0, float("-inf"), 1.0, float("-inf")]).expand(2, 3, 5).clone()
    got, lse = ref.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.1, ek, ev, el, return_lse=True)
    torch.testing.assert_close(got, _brute(q, kc, vc, tables, seq_lens, 0.1, (ek, ev, el)), rtol=1e-4, atol=1e-5)
    plain = ref.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.1)
    assert (got - plain).abs().max() > 1e-3  # the pooled entries change the output


def test_paged_reference_all_blocks_equals_dense() -> None:
    torch.manual_seed(3)
    t, h, d, bs = 100, 2, 32, 16
    k, v, q = torch.randn(1, t, h, d), torch.randn(1, t, h, d), torch.randn(1, 4, d)
    nb = -(-t // bs)
    kp = torch.cat([k[0], torch.zeros(nb * bs - t, h, d)]).view(nb, bs, h, d).transpose(1, 2)
    vp = torch.cat([v[0], torch.zeros(nb * bs - t, h, d)]).view(nb, bs, h, d).transpose(1, 2)
    table = torch.arange(nb).expand(1, h, nb).int()
    got = ref.paged_decode_attention(q, kp, vp, table, torch.full((1, h), t), 0.2)
    torch.testing.assert_close(got, ref.dense_decode_attention(q, k, v, 0.2), rtol=1e-5, atol=1e-6)


def test_block_scores_is_the_quest_bound() -> None:
    torch.manual_seed(4)
    q = torch.randn(2, 6, 32)
    keys = torch.randn(40, 16, 3, 32)  # 40 pages of 16 tokens
    kmax, kmin = keys.amax(1), keys.amin(1)
    table = torch.stack([torch.randperm(40)[:25], torch.randperm(40)[:25]]).int()
    n_valid = torch.tensor([25, 11])
    s = ref.block_scores(q, kmax, kmin, table, n_valid)
    qq = q.view(2, 3, 2, 32)
    for b in range(2):
        for i in range(int(n_valid[b])):
            p = int(table[b, i])
            page = keys[p]  # [16, H, D]
            bound = torch.maximum(qq[b] * kmax[p][:, None], qq[b] * kmin[p][:, None]).sum(-1)  # [H, G]
            torch.testing.assert_close(s[b, :, i], bound.amax(1))
            exact = torch.einsum("hgd,thd->hgt", qq[b], page).amax(-1).amax(-1)
            assert (s[b, :, i] >= exact - 1e-5).all()  # an upper bound of every q.k in the page
        assert torch.isinf(s[b, :, int(n_valid[b]) :]).all()
    full = ref.block_scores(q, kmax, kmin, None, torch.tensor([40, 40]))
    torch.testing.assert_close(full[0, :, table[0, :25].long()], s[0, :, :25])


def test_dispatch_runs_the_reference_on_cpu() -> None:
    q, kc, vc, tables, seq_lens = _case(5)
    a = kernels.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.125)
    torch.testing.assert_close(a, ref.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.125))
    with pytest.raises(ValueError, match="backend"):
        kernels.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.125, backend="cuda")


# ---- Triton kernels, interpreted ------------------------------------------------------------------------------------
# Triton reads TRITON_INTERPRET when it defines a jit function, its own helpers (tl.zeros, tl.max ...) included, so
# the interpreter only works in a process that had it set before anything imported triton (vLLM does). The
# test_triton_* tests therefore run in a fresh process started by test_triton_kernels_in_the_interpreter.
INNER = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("KVPLUG_KERNEL_TESTS") == "1"
inner_only = pytest.mark.skipif(not INNER, reason="run in a fresh interpreter process by the test below")


def test_triton_kernels_in_the_interpreter() -> None:
    if INNER:
        pytest.skip("this is the inner process")
    if not kernels.triton_available():
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "KVPLUG_KERNEL_TESTS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_triton_ and not in_the"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


@pytest.fixture(scope="module")
def interpreted() -> ModuleType:
    """The Triton kernels, defined in this interpreter process."""
    return importlib.import_module("kvplug.kernels.triton_sparse")


@inner_only
@pytest.mark.parametrize(("hq", "h", "bs", "bps"), [(9, 3, 32, 2), (4, 4, 16, 16), (8, 1, 16, 1)])
def test_triton_paged_decode_matches_reference(interpreted: ModuleType, hq: int, h: int, bs: int, bps: int) -> None:
    q, kc, vc, tables, seq_lens = _case(6, hq=hq, h=h, bs=bs, d=32, nb=12, s=5)
    want, lse = ref.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.17, return_lse=True)
    got, glse = interpreted.paged_decode_attention(
        q, kc, vc, tables, seq_lens, 0.17, return_lse=True, blocks_per_split=bps
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(glse, lse, rtol=1e-4, atol=1e-4)


@inner_only
def test_triton_paged_decode_pooled_and_bf16(interpreted: ModuleType) -> None:
    q, kc, vc, tables, seq_lens = _case(7, d=32, nb=10, s=4)
    ek, ev = torch.randn(2, 3, 3, 32), torch.randn(2, 3, 3, 32)
    el = torch.tensor([1.0, float("-inf"), 3.0]).expand(2, 3, 3).clone()
    want = ref.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.2, ek, ev, el)
    got = interpreted.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.2, ek, ev, el)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    qb, kb, vb = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    want = ref.paged_decode_attention(qb, kb, vb, tables, seq_lens, 0.2)
    got = interpreted.paged_decode_attention(qb, kb, vb, tables, seq_lens, 0.2)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@inner_only
@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_triton_block_scores_matches_reference(interpreted: ModuleType, reduce: str) -> None:
    torch.manual_seed(8)
    q = torch.randn(2, 6, 32)
    kmax = torch.randn(70, 3, 32)
    kmin = kmax - torch.rand(70, 3, 32)
    table = torch.randint(0, 70, (2, 70)).int()
    n_valid = torch.tensor([70, 33])
    want = ref.block_scores(q, kmax, kmin, table, n_valid, reduce)
    got = interpreted.block_scores(q, kmax, kmin, table, n_valid, reduce)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(want)], want[~torch.isinf(want)], rtol=1e-4, atol=1e-4)
    # strided metadata (a method's [H, N, D] store seen as [N, H, D]) and the identity table
    store = torch.randn(3, 50, 32)
    got = interpreted.block_scores(q, store.transpose(0, 1), store.transpose(0, 1), None, torch.tensor([50, 50]))
    want = ref.block_scores(q, store.transpose(0, 1), store.transpose(0, 1), None, torch.tensor([50, 50]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
