"""Sparse decode attention on a GPU: the Triton kernels against their torch references, then decode-attention time
dense vs sparse as ratios. One script, no vLLM needed; under 3 minutes on an H100/H200.

    python bench/sparse_gpu.py                 # from the repository root (kvplug installed, or not)
    python bench/sparse_gpu.py --quick         # fewer sizes
    TRITON_INTERPRET=1 python bench/sparse_gpu.py --smoke   # logic check on CPU (tiny sizes, no timings)

Correctness: ``block_scores`` and ``paged_decode_attention`` (float32 and bfloat16, GQA, partial last blocks,
pooled tokens) against :mod:`kvplug.kernels.reference`; prints the max error and PASS/FAIL per case.

Timing (CUDA events, medians), one layer, block size 16, Llama-3-8B's attention shape (32 query heads, 8 KV heads,
head dim 128), bfloat16, batch 1 and 8:

* ``dense-triton``: the same paged kernel over every block (what a paged dense decode reads);
* ``dense-sdpa``: torch ``scaled_dot_product_attention`` on contiguous KV (a strong non-paged dense baseline);
* ``sparse``: the whole Quest step: page scores from per-block min/max keys (Triton), top-k (torch), the selected
  block tables (torch), attention over them (Triton). Ratios are dense / sparse.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _kernels() -> tuple[ModuleType, ModuleType, ModuleType]:
    """``kvplug.kernels`` (its reference and Triton modules), from the installed package or this checkout."""
    sys.path.insert(0, str(ROOT))
    try:
        import kvplug.kernels as k  # noqa: PLC0415
    except ImportError:  # a checkout that is not installed: kernels/ is kvplug.kernels
        spec = importlib.util.spec_from_file_location(
            "kvplug.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        assert spec is not None and spec.loader is not None
        k = importlib.util.module_from_spec(spec)
        sys.modules["kvplug.kernels"] = k
        spec.loader.exec_module(k)
    from kvplug.kernels import reference  # noqa: PLC0415

    return k, reference, k.triton_module()


def _cache(nb: int, h: int, bs: int, d: int, dtype, device):  # noqa: ANN001, ANN202
    import torch  # noqa: PLC0415

    kv = torch.randn(nb, h, bs, 2, d, device=device, dtype=dtype)  # a K|V per token layout (CUDA backends)
    return kv[..., 0, :], kv[..., 1, :]


def correctness(ref: ModuleType, tri: ModuleType, device: str, smoke: bool) -> bool:
    import torch  # noqa: PLC0415

    ok = True
    cases = [(9, 3, 64, 32, torch.float32), (32, 8, 128, 16, torch.bfloat16), (8, 8, 64, 16, torch.float32)]
    if smoke:
        cases = [(4, 2, 32, 16, torch.float32), (6, 3, 32, 16, torch.bfloat16)]
    print("correctness (Triton vs torch reference)")
    for hq, h, d, bs, dtype in cases:
        g = torch.Generator(device="cpu").manual_seed(hq * d)
        b, nb, s = 3, 64 if not smoke else 12, 9 if not smoke else 4
        kc, vc = _cache(nb, h, bs, d, dtype, device)
        q = torch.randn(b, hq, d, device=device, dtype=dtype)
        tables = torch.stack([torch.stack([torch.randperm(nb, generator=g)[:s] for _ in range(h)]) for _ in range(b)])
        tables = tables.to(device=device, dtype=torch.int32)
        seq = torch.randint((s - 1) * bs + 1, s * bs + 1, (b, h), generator=g).to(device=device, dtype=torch.int32)
        ek = torch.randn(b, h, 5, d, device=device, dtype=dtype)
        ev = torch.randn(b, h, 5, d, device=device, dtype=dtype)
        el = torch.tensor([0.0, 2.0, float("-inf"), 3.5, 1.0], device=device).expand(b, h, 5).contiguous()
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
        for extra in (False, True):
            kw = {"extra_k": ek, "extra_v": ev, "extra_logw": el} if extra else {}
            want = ref.paged_decode_attention(q, kc, vc, tables, seq, d**-0.5, **kw).float()
            got = tri.paged_decode_attention(q, kc, vc, tables, seq, d**-0.5, **kw).float()
            err = (got - want).abs().max().item()
            ok &= err < tol
            tag = "PASS" if err < tol else "FAIL"
            print(f"  paged_decode  hq={hq:2d} h={h} d={d:3d} bs={bs} {str(dtype)[6:]:8s} pooled={extra!s:5s} "
                  f"max|err|={err:.2e} {tag}")  # fmt: skip
        kmax = torch.randn(nb, h, d, device=device, dtype=dtype)
        kmin = kmax - torch.rand(nb, h, d, device=device, dtype=dtype)
        table = torch.randint(0, nb, (b, nb), generator=g).to(device=device, dtype=torch.int32)
        nvalid = torch.tensor([nb, nb // 2, 3], device=device)
        want = ref.block_scores(q, kmax, kmin, table, nvalid)
        got = tri.block_scores(q, kmax, kmin, table, nvalid)
        fin = torch.isfinite(want)
        err = (got[fin] - want[fin]).abs().max().item() / max(1.0, want[fin].abs().max().item())
        same_inf = bool(torch.equal(torch.isinf(got), torch.isinf(want)))
        ok &= err < tol and same_inf
        tag = "PASS" if err < tol and same_inf else "FAIL"
        print(f"  block_scores  hq={hq:2d} h={h} d={d:3d}          {str(dtype)[6:]:8s}              "
              f"rel err={err:.2e} {tag}")  # fmt: skip
    return ok


def _ms(fn, reps: int = 30) -> float:  # noqa: ANN001
    """Median CUDA-event time of ``fn`` in milliseconds."""
    import torch  # noqa: PLC0415

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _time_one(tri: ModuleType, b: int, ctx: int, budgets: list[int]) -> None:
    """Dense and sparse decode attention for ``b`` rows of ``ctx`` tokens (fresh tensors, freed on return)."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: N812, PLC0415

    hq, h, d, bs, dtype, dev = 32, 8, 128, 16, torch.bfloat16, "cuda"
    scale = d**-0.5
    nblk = ctx // bs
    kc, vc = _cache(b * nblk, h, bs, d, dtype, dev)
    q = torch.randn(b, hq, d, device=dev, dtype=dtype)
    table = torch.arange(b * nblk, device=dev, dtype=torch.int32).view(b, nblk)
    full_tables = table.unsqueeze(1).expand(b, h, nblk).contiguous()
    full_seq = torch.full((b, h), ctx, device=dev, dtype=torch.int32)
    kmax = torch.randn(b * nblk, h, d, device=dev, dtype=dtype)
    kmin = kmax - 1
    kcont = kc.reshape(b, nblk * bs, h, d).transpose(1, 2).contiguous()  # [B, H, T, D] for sdpa
    vcont = vc.reshape(b, nblk * bs, h, d).transpose(1, 2).contiguous()
    nvalid = torch.full((b,), nblk - 1, device=dev)
    t_dt = _ms(lambda: tri.paged_decode_attention(q, kc, vc, full_tables, full_seq, scale))
    t_sd = _ms(lambda: F.scaled_dot_product_attention(q.unsqueeze(2), kcont, vcont, scale=scale, enable_gqa=True))
    for budget in budgets:
        kk = budget // bs - 1  # one block goes to the block being filled

        def sparse(kk: int = kk) -> None:
            s = tri.block_scores(q, kmax, kmin, table, nvalid)[:, :, : nblk - 1]  # [B, H, N-1]
            top = torch.topk(s, kk, dim=-1, sorted=False).indices  # [B, H, kk]
            sel = torch.gather(table.unsqueeze(1).expand(b, h, nblk), 2, top)
            tables = torch.cat([sel, table[:, -1:].unsqueeze(1).expand(b, h, 1)], dim=2).to(torch.int32)
            seq = torch.full((b, h), kk * bs + bs, device=dev, dtype=torch.int32)
            tri.paged_decode_attention(q, kc, vc, tables, seq, scale)

        t_sp = _ms(sparse)
        print(f"{b:5d} {ctx:7d} {budget:6d} {t_dt:12.4f} {t_sd:10.4f} {t_sp:8.4f} {t_dt / t_sp:8.2f} "
              f"{t_sd / t_sp:7.2f}", flush=True)  # fmt: skip


def timing(tri: ModuleType, quick: bool) -> None:
    import torch  # noqa: PLC0415

    contexts = [4096, 16384, 32768] if quick else [4096, 8192, 16384, 32768, 65536]
    budgets = [1024] if quick else [256, 512, 1024, 2048]
    print("\ntiming: one layer, Llama-3-8B shape (32 q / 8 kv heads, d 128), bf16, block 16; ms per decode step")
    print(f"{'batch':>5} {'context':>7} {'budget':>6} {'dense-triton':>12} {'dense-sdpa':>10} {'sparse':>8} "
          f"{'x triton':>8} {'x sdpa':>7}")  # fmt: skip
    for b in (1, 8):
        for ctx in contexts:
            _time_one(tri, b, ctx, budgets)
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU logic check under TRITON_INTERPRET=1 (no timings)")
    args = ap.parse_args()
    t0 = time.time()
    import torch  # noqa: PLC0415

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1")
        device = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device (use --smoke with TRITON_INTERPRET=1 for a CPU logic check)")
    else:
        device = "cuda"
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    _, ref, tri = _kernels()
    import triton  # noqa: PLC0415

    print(f"triton {triton.__version__}")
    ok = correctness(ref, tri, device, args.smoke)
    if device == "cuda":
        timing(tri, args.quick)
    print(f"\ncorrectness: {'ALL PASS' if ok else 'FAILURES'}; {time.time() - t0:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
