"""Store benchmark: memory, disk and Redis (a private server started here), for SmolLM2- and Llama-3-8B-shaped
256-token bf16 chunks, each as a ratio to its raw baseline measured in the same run.

    .venv/bin/python bench/store.py [--chunks 16] [--rounds 5] [--out docs/results/store.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from kvplug.bench.report import emit_table
from kvplug.bench.store_bench import bench_store
from kvplug.testing import RedisServer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default="smollm2-135m,llama3-8b")
    ap.add_argument("--out", type=Path, default=None, help="Write a Markdown table here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvplug-bench-"))
    rows = []
    try:
        with RedisServer() as server:
            for shape in args.shapes.split(","):
                chunks = args.chunks if shape != "llama3-8b" else max(4, args.chunks // 4)
                for url in ("memory://?max_bytes=8GiB", f"file://{tmp}/disk?max_bytes=8GiB", server.url):
                    r = bench_store(url, shape, chunks, args.rounds)
                    rows.append(r)
                    print(json.dumps(r.row()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        f"Store throughput, 256-token bf16 chunks, best of {args.rounds} alternating rounds "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"`bench/store.py --chunks {args.chunks} --rounds {args.rounds}`).",
        "",
        "| store | shape | chunk MB | put GB/s | raw put GB/s | put ratio | get GB/s | raw get GB/s | get ratio "
        "| put overhead us/chunk | get overhead us/chunk |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.store} | {r.shape} | {r.chunk_mb} | {r.put_gbps:.2f} | {r.raw_put_gbps:.2f} | {r.put_ratio:.2f}x "
            f"| {r.get_gbps:.2f} | {r.raw_get_gbps:.2f} | {r.get_ratio:.2f}x | {r.overhead_us('put'):.0f} "
            f"| {r.overhead_us('get'):.0f} |"
        )
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
