"""The engine load path without an engine: store synthetic chunks, then load them into a paged cache laid out
exactly as vLLM's CPU backend lays it out (one backing buffer, ``[blocks, heads, block_size, 2 * head_dim]`` per
layer, keys transposed per block), through the connector's own :class:`~kvplug.integrations.vllm.loading.ChunkLoader`.

Reports where each load's time goes (fetch, verify+decode, write into the paged cache, waiting) and the load
path's GB/s next to the store's own GB/s for the same payloads (``get_many`` of the same keys, nothing else),
measured in alternating rounds so machine noise hits both alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from kvplug.bench.shapes import SHAPES, synthetic_kv
from kvplug.cache import KVCache
from kvplug.chunks import Namespace
from kvplug.connectors import open_store
from kvplug.integrations.vllm.layouts import CpuVecAdapter
from kvplug.integrations.vllm.loading import ChunkLoader, LoadProfile, PagedKV

BLOCK = 32


@dataclass
class LoadBenchResult:
    store: str
    codec: str
    tokens: int
    pipelined: bool
    mb: float  # payload MB per load
    total_ms: float
    fetch_ms: float
    decode_ms: float
    write_ms: float
    wait_ms: float
    load_gbps: float  # KV bytes (as stored, raw dtype) per second of load
    store_gbps: float  # the store's own get_many of the same payloads

    @property
    def ratio(self) -> float:
        return self.load_gbps / self.store_gbps if self.store_gbps else 0.0

    def row(self) -> dict[str, object]:
        return {**asdict(self), "ratio": round(self.ratio, 3)}


def paged_cache(model: str, num_blocks: int, dtype: torch.dtype) -> PagedKV:
    layers, heads, dim = SHAPES[model]
    per = num_blocks * heads * BLOCK * 2 * dim
    buf = torch.zeros(layers * per, dtype=dtype)
    views = [buf[i * per : (i + 1) * per].view(num_blocks, heads, BLOCK, 2 * dim) for i in range(layers)]
    return PagedKV([views], CpuVecAdapter(dim), BLOCK)


def bench_load(
    url: str,
    model: str = "smollm2-135m",
    tokens: int = 2048,
    codec: str = "raw",
    rounds: int = 5,
    pipelined: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> LoadBenchResult:
    layers, heads, dim = SHAPES[model]
    ns = Namespace(
        model=f"bench-{model}",
        dtype=str(dtype).removeprefix("torch."),
        num_layers=layers,
        num_kv_heads=heads,
        head_dim=dim,
        codec=codec,
    )
    store = open_store(url)
    try:
        cache = KVCache(store, ns)
        toks = list(range(tokens))
        kv = synthetic_kv(model, tokens, dtype=dtype)
        cache.put(toks, kv, skip_existing=False)
        if hasattr(store, "flush"):
            store.flush(60)
        chunks = cache.chunks(toks)
        keys = [c.prefix_key for c in chunks]
        nblocks = -(-tokens // BLOCK)
        paged = paged_cache(model, nblocks + 8, dtype)
        block_ids = (torch.randperm(nblocks + 7)[:nblocks] + 1).tolist()  # never block 0: vLLM's null block
        loader = ChunkLoader(paged, pipelined=pipelined)
        profiles: list[LoadProfile] = []
        store_s: list[float] = []
        for i in range(rounds + 1):
            for first in (0, 1) if i % 2 else (1, 0):
                if first:
                    res = loader.load(cache, chunks, 0, chunks[-1].end, [block_ids], timeout=60.0)
                    if res.reason != "ok":
                        raise RuntimeError(f"load failed: {res.reason}")
                    if i:
                        profiles.append(res.profile)
                else:
                    t0 = time.perf_counter()
                    got = store.get_many(keys)
                    if i:
                        store_s.append(time.perf_counter() - t0)
                    if any(g is None for g in got):
                        raise RuntimeError("store lost entries during the benchmark")
        loader.close()
        got_kv = paged.read([torch.tensor(block_ids)])[:, :, : chunks[-1].end].float()
        want = kv[:, :, : chunks[-1].end].float()
        if codec.split("?")[0] in ("raw", "zstd", "lz4"):  # lossless: bit for bit
            if not torch.equal(got_kv, want):
                raise RuntimeError("loaded KV differs from the stored KV")
        elif float((got_kv - want).norm() / want.norm()) > 0.1:  # lossy codecs: within their error (int8 ~0.003)
            raise RuntimeError("loaded KV is far from the stored KV")
        p = sorted(profiles, key=lambda x: x.total_s)[len(profiles) // 2]
        kv_bytes = chunks[-1].end * layers * 2 * heads * dim * kv.element_size()
        return LoadBenchResult(
            store=url.split("?")[0].split("://")[0],
            codec=codec,
            tokens=chunks[-1].end,
            pipelined=pipelined,
            mb=round(p.bytes / 1e6, 1),
            total_ms=round(p.total_s * 1e3, 2),
            fetch_ms=round(p.fetch_s * 1e3, 2),
            decode_ms=round(p.decode_s * 1e3, 2),
            write_ms=round(p.write_s * 1e3, 2),
            wait_ms=round(p.wait_s * 1e3, 2),
            load_gbps=round(kv_bytes / p.total_s / 1e9, 3),
            store_gbps=round(p.bytes / statistics.median(store_s) / 1e9, 3),
        )
    finally:
        store.close()
