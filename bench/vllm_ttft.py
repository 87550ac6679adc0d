"""TTFT on SmolLM2-135M through vLLM CPU, side by side in one run (each configuration a new engine process):

  (a) full prefill                      no connector, no prefix cache
  (b) vLLM's own prefix-cache hit       the bound: nothing to load
  (c) kvplug hit from disk              file store, raw codec
  (d) kvplug hit from Redis             private redis-server, raw codec
  (e) kvplug hit from Redis, int8/fp8   compressed payloads

TTFT = wall time of `generate(max_tokens=1)` inside the engine process (prefill + first token). Each kvplug
configuration first stores the prompt (request 1), then loads it in later requests with vLLM's prefix cache off,
so every hit comes from the store.

    .venv/bin/python bench/vllm_ttft.py [--lengths 1024,2048,4096,8000] [--reps 3] [--out docs/results/vllm_ttft.md]

Also writes docs/results/vllm_ttft.csv (tokens, config, ttft_s, speedup_vs_full, ratio_vs_vllm_hit, load_gbps,
store_gbps) and, per kvplug configuration, where the load time went (the connector's fetch/decode/write seconds,
reported through vLLM's connector stats). ``store_gbps`` is the same store's own ``get_many`` throughput for the same
payloads, measured in this run right after the engines (``kvplug.bench.load_bench``).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
from pathlib import Path

import torch

from kvplug.bench.report import emit_table
from kvplug.integrations.vllm.runner import run_in_new_process
from kvplug.testing import RedisServer

KV_VALUES_PER_TOKEN = 30 * 2 * 3 * 64  # SmolLM2: layers x (K,V) x kv heads x head dim


def engine(spec: dict) -> dict:
    return run_in_new_process(spec, env={"VLLM_CPU_KVCACHE_SPACE": "2"})


def metric(report: dict, name: str) -> float:
    return sum(v for k, v in report["metrics"].items() if k.startswith(name + "{"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8000")  # 8K: SmolLM2 allows 8192 positions in all
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", help="float32 where the CPU lacks native bf16 (AVX2 only)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    from kvplug.models import smollm2_dir

    model = str(smollm2_dir())
    ids = AutoTokenizer.from_pretrained(model)("\n\n".join(topics[k] for k in sorted(topics))).input_ids
    lengths = [int(x) for x in args.lengths.split(",")]
    bytes_per_token = KV_VALUES_PER_TOKEN * (4 if args.dtype == "float32" else 2)
    top = max(lengths) + 64
    base = {"model": model, "dtype": args.dtype, "max_tokens": 1, "max_model_len": top, "max_num_batched_tokens": top}
    tmp = Path(tempfile.mkdtemp(prefix="kvplug-ttft-"))
    rows: dict[int, dict[str, float]] = {n: {} for n in lengths}
    bw: dict[str, list[float]] = {}
    prof: dict[str, dict[str, float]] = {}
    store_gbps: dict[str, float] = {}
    with RedisServer() as rs:
        configs = {
            "a_full": {"connector": False},
            "b_vllm_prefix": {"connector": False, "prefix_caching": True},
            "c_disk": {"extra": {"store": f"file://{tmp}/disk?max_bytes=8GiB"}},
            "d_redis": {"extra": {"store": rs.url}},
            "e_redis_int8": {"extra": {"store": rs.url, "codec": "int8"}},
        }
        for name, cfg in configs.items():
            for i, n in enumerate(lengths):
                prompt = ids[i * 9000 : i * 9000 + n]  # disjoint texts per length
                r = engine({**base, **cfg, "prompts": [prompt] * (args.reps + 1)})
                times = [o["seconds"] for o in r["outputs"]]
                cachedtok = [o["num_cached_tokens"] for o in r["outputs"]]
                if name != "a_full" and min(cachedtok[1:]) == 0:
                    raise RuntimeError(f"{name} at {n} tokens: no hit ({cachedtok})")
                rows[n][name] = statistics.median(times[1:])
                rows[n][name + "_cached"] = statistics.median(cachedtok[1:])
                loaded, secs = (
                    metric(r, "kvplug_connector_loaded_tokens_total"),
                    metric(r, "kvplug_connector_load_seconds_sum"),
                )
                if loaded and secs:
                    bw.setdefault(name, []).append(loaded / secs)
                    rows[n][name + "_gbps"] = loaded * bytes_per_token / secs / 1e9
                    p = prof.setdefault(name, {})
                    for part in ("fetch", "decode", "write", "wait"):
                        p[part] = p.get(part, 0.0) + r["metrics"].get(
                            "kvplug_connector_load_phase_seconds_total" + json.dumps({"engine": "vllm", "phase": part}),
                            0.0,
                        )
                    p["total"] = p.get("total", 0.0) + secs
                print(name, n, [round(t, 3) for t in times], cachedtok, flush=True)
        from kvplug.bench.load_bench import bench_load

        for name, url, codec in (
            ("c_disk", f"file://{tmp}/own", "raw"),
            ("d_redis", rs.url, "raw"),
            ("e_redis_int8", rs.url, "int8"),
        ):  # the stores' own throughput for the same payload sizes, right after the engines
            dt = getattr(torch, args.dtype)
            try:
                store_gbps[name] = bench_load(url, tokens=2048, codec=codec, rounds=3, dtype=dt).store_gbps
            except Exception as e:  # noqa: BLE001 - the engine rows are worth keeping without this column
                print(f"store throughput for {name} failed: {type(e).__name__}: {e}", flush=True)
    lines = [
        f"TTFT on SmolLM2-135M-Instruct, vLLM {_vllm()} CPU, {args.dtype}, median of {args.reps} hits after one "
        f"store request; each configuration a new engine process (`bench/vllm_ttft.py`).",
        "",
        "| prompt tokens | (a) full prefill s | (b) vLLM prefix hit s | (c) kvplug disk s | (d) kvplug Redis s "
        "| (e) Redis int8 s | (c) vs (b) | (d) vs (b) | (e) vs (b) | (d) speedup vs (a) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    csv_rows = []
    for n in lengths:
        r = rows[n]
        b = r["b_vllm_prefix"]
        lines.append(
            f"| {n} | {r['a_full']:.3f} | {b:.3f} | {r['c_disk']:.3f} | {r['d_redis']:.3f} | "
            f"{r['e_redis_int8']:.3f} | {r['c_disk'] / b:.2f}x | {r['d_redis'] / b:.2f}x | "
            f"{r['e_redis_int8'] / b:.2f}x | {r['a_full'] / r['d_redis']:.1f}x |"
        )
        for name in configs:
            csv_rows.append(
                [
                    n,
                    name,
                    round(r[name], 4),
                    round(r["a_full"] / r[name], 3),
                    round(r[name] / b, 3),
                    round(r.get(name + "_gbps", 0.0), 3) or "",
                    store_gbps.get(name, ""),
                ]
            )
    lines += [
        "",
        "Cached tokens reported by vLLM per hit: "
        + ", ".join(
            f"{n}: vLLM {rows[n]['b_vllm_prefix_cached']:.0f}, kvplug {rows[n]['d_redis_cached']:.0f}" for n in lengths
        ),
        "",
        f"Load path (all lengths together; {args.dtype} raw = {bytes_per_token} bytes/token), next to each store's own "
        "`get_many` GB/s for the same payloads measured in this run, and where the load time went (fetch and "
        "decode run on a background thread while the engine thread writes; wait = engine thread idle):",
        "",
        "| config | load GB/s | store GB/s | load / store | fetch s | decode s | write s | wait s | total s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, vals in bw.items():
        gbps = statistics.median(vals) * bytes_per_token / 1e9
        sg = store_gbps.get(name)
        p = prof.get(name, {})
        lines.append(
            f"| {name} | {gbps:.2f} | {sg if sg is not None else '-'} | "
            f"{(gbps / sg if sg else 0):.2f} | {p.get('fetch', 0):.3f} | {p.get('decode', 0):.3f} | "
            f"{p.get('write', 0):.3f} | {p.get('wait', 0):.3f} | {p.get('total', 0):.3f} |"
        )
    if args.out:
        with open(args.out.with_suffix(".csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["tokens", "config", "ttft_s", "speedup_vs_full", "ratio_vs_vllm_hit", "load_gbps", "store_gbps"]
            )
            w.writerows(csv_rows)
    emit_table(lines, args.out)


def _vllm() -> str:
    from importlib.metadata import version

    return version("vllm-cpu")


if __name__ == "__main__":
    main()
