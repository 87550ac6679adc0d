"""TTFT on SmolLM2-135M through vLLM CPU, side by side in one run (each configuration a new engine process):

  (a) full prefill                      no connector, no prefix cache
  (b) vLLM's own prefix-cache hit       the bound: nothing to load
  (c) kvplug hit from disk              file store, raw codec
  (d) kvplug hit from Redis             private redis-server, raw codec
  (e) kvplug hit from Redis, int8/fp8   compressed payloads

TTFT = wall time of `generate(max_tokens=1)` inside the engine process (prefill + first token). Each kvplug
configuration first stores the prompt (request 1), then loads it in later requests with vLLM's prefix cache off,
so every hit comes from the store.

    .venv/bin/python bench/vllm_ttft.py [--lengths 1024,2048,4096] [--reps 3] [--out docs/results/vllm_ttft.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from kvplug.bench.report import emit_table
from kvplug.integrations.vllm.runner import run_in_new_process
from kvplug.testing import RedisServer

BYTES_PER_TOKEN_BF16 = 30 * 2 * 3 * 64 * 2  # SmolLM2: layers x (K,V) x kv heads x head dim x 2 bytes


def engine(spec: dict) -> dict:
    return run_in_new_process(spec, env={"VLLM_CPU_KVCACHE_SPACE": "2"})


def metric(report: dict, name: str) -> float:
    return sum(v for k, v in report["metrics"].items() if k.startswith(name + "{"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    from kvplug.models import smollm2_dir

    model = str(smollm2_dir())
    ids = AutoTokenizer.from_pretrained(model)("\n\n".join(topics[k] for k in sorted(topics))).input_ids
    lengths = [int(x) for x in args.lengths.split(",")]
    base = {"model": model, "dtype": args.dtype, "max_tokens": 1, "max_model_len": 8192, "max_num_batched_tokens": 8192}
    tmp = Path(tempfile.mkdtemp(prefix="kvplug-ttft-"))
    rows: dict[int, dict[str, float]] = {n: {} for n in lengths}
    bw: dict[str, list[float]] = {}
    with RedisServer() as rs:
        configs = {
            "a_full": {"connector": False},
            "b_vllm_prefix": {"connector": False, "prefix_caching": True},
            "c_disk": {"extra": {"store": f"file://{tmp}/disk?max_bytes=8GiB"}},
            "d_redis": {"extra": {"store": rs.url}},
            "e_redis_int8": {"extra": {"store": rs.url, "codec": "int8"}},
            "e_redis_fp8": {"extra": {"store": rs.url, "codec": "fp8"}},
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
                print(name, n, [round(t, 3) for t in times], cachedtok, flush=True)
    lines = [
        f"TTFT on SmolLM2-135M-Instruct, vLLM {_vllm()} CPU, {args.dtype}, median of {args.reps} hits after one "
        f"store request; each configuration a new engine process (`bench/vllm_ttft.py`).",
        "",
        "| prompt tokens | (a) full prefill s | (b) vLLM prefix hit s | (c) kvplug disk s | (d) kvplug Redis s "
        "| (e) Redis int8 s | (e) Redis fp8 s | (c) speedup | (d) speedup | (d) vs bound (b) | (e) int8 speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in lengths:
        r = rows[n]
        lines.append(
            f"| {n} | {r['a_full']:.3f} | {r['b_vllm_prefix']:.3f} | {r['c_disk']:.3f} | {r['d_redis']:.3f} | "
            f"{r['e_redis_int8']:.3f} | {r['e_redis_fp8']:.3f} | {r['a_full'] / r['c_disk']:.2f}x | "
            f"{r['a_full'] / r['d_redis']:.2f}x | {r['d_redis'] / r['b_vllm_prefix']:.2f}x slower | "
            f"{r['a_full'] / r['e_redis_int8']:.2f}x |"
        )
    lines += [
        "",
        "Cached tokens reported by vLLM per hit: "
        + ", ".join(
            f"{n}: vLLM {rows[n]['b_vllm_prefix_cached']:.0f}, kvplug {rows[n]['d_redis_cached']:.0f}" for n in lengths
        ),
    ]
    lines += [
        "",
        "Load path throughput (tokens loaded / connector load seconds, all lengths; bf16 raw = "
        f"{BYTES_PER_TOKEN_BF16} bytes/token):",
        "",
    ]
    for name, vals in bw.items():
        tps = statistics.median(vals)
        lines.append(f"- {name}: {tps:,.0f} tokens/s = {tps * BYTES_PER_TOKEN_BF16 / 1e9:.2f} GB/s of bf16 KV")
    emit_table(lines, args.out)


def _vllm() -> str:
    from importlib.metadata import version

    return version("vllm-cpu")


if __name__ == "__main__":
    main()
