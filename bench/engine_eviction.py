"""KV eviction inside vLLM (kvplug_evict: StreamingLLM, SnapKV) on SmolLM2-135M, vLLM CPU, float32: memory freed,
concurrency in a fixed KV pool, throughput and needle accuracy, against the same engine without eviction, at
25/50/75% compression. One engine process per setting and measurement.

    .venv/bin/python bench/engine_eviction.py [--prompt 1024] [--gen 128] [--n 24] [--fit 8] [--needles 10]

Compression ``r`` keeps ``(1 - r) x prompt`` tokens. StreamingLLM: 4 sinks plus a window of ``(1 - r) x prompt - 4``
tokens (the window slides as the output grows). SnapKV: ``compression_ratio = r`` (its lowest-scored prompt blocks
are freed once, after the prompt; the output's blocks are kept).

- blocks held / freed: one request (``--prompt`` tokens, ``--gen`` greedy tokens) alone in the engine; vLLM's
  block-pool counter after each step; "held" is the count at the last decode step, "freed" = 1 - held / plain's.
- max concurrency: ``--n`` distinct requests of the same shape added at once to an engine whose KV pool holds
  ``--fit`` whole requests without eviction (``num_gpu_blocks_override``); the largest number of requests running
  at once (vLLM's running set), its time-weighted mean, vLLM's preemption count, and output tokens/s over the
  whole run (prefill included).
- needle: ``--needles`` pass-key samples (kvplug.eval.tasks.needle, about ``--prompt`` tokens, 10 depths), 8
  greedy tokens through the engine; correct when the output starts with the key. The HF column runs the same
  prompts through transformers with exactly the engine's block mask (kvplug.eval.masked), so it checks that the
  engine computes what the method defines; StreamingLLM keeps no middle context, so the needle is expected to be
  lost at most depths.

Writes ``docs/results/engine-compression.md`` and ``.csv`` (method, ratio, blocks_freed_frac,
max_concurrency_ratio, decode_tps_ratio, needle_acc, hf_needle_acc, plus the raw numbers).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from kvplug.eval.stats import wilson
from kvplug.integrations.vllm.runner import run_in_new_process

BLOCK, SINKS = 32, 4
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}


def settings(ratios: list[float], prompt: int) -> list[tuple[str, float, dict[str, Any] | None]]:
    out: list[tuple[str, float, dict[str, Any] | None]] = [("none", 0.0, None)]
    for r in ratios:
        window = round((1 - r) * prompt) - SINKS
        out.append(("streamingllm", r, {"method": "streamingllm", "num_sinks": SINKS, "window": window}))
    for r in ratios:
        out.append(("snapkv", r, {"method": "snapkv", "compression_ratio": r}))
    return out


def hf_needles(hf: Any, needles: list[list[int]], cfg: dict[str, Any] | None) -> list[list[int]]:
    """8 greedy tokens per needle prompt from transformers under the setting's block mask."""
    from kvplug.eval.masked import greedy, scored_holes, streaming_greedy
    from kvplug.methods import registry

    if cfg is None or cfg["method"] == "streamingllm":
        window = cfg["window"] if cfg else 1 << 30
        return [streaming_greedy(hf, ids, 8, SINKS, window, BLOCK) for ids in needles]
    method = registry.get(cfg["method"], compression_ratio=cfg["compression_ratio"])
    out = []
    for ids in needles:
        holes = scored_holes(hf, ids, method, BLOCK)
        out.append(greedy(hf, ids, 8, BLOCK, lambda q, h=holes: h))
    return out


def engine(model: str, cfg: dict[str, Any] | None, **spec: Any) -> dict[str, Any]:
    full = {"model": model, "connector": False, "metric_prefixes": ["kvplug_evict"], **spec}
    if cfg is not None:
        full["additional_config"] = {"kvplug_evict": cfg}
    return run_in_new_process(full, env=ENV, timeout=3600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--fit", type=int, default=8, help="whole requests the KV pool holds without eviction")
    ap.add_argument("--needles", type=int, default=10)
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--long-gen", type=int, default=0, help="only the flat-footprint run: N greedy tokens, ignore_eos")
    ap.add_argument("--out", type=Path, default=Path("docs/results/engine-compression.md"))
    args = ap.parse_args()

    from pydoc_data.topics import topics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvplug.eval import tasks
    from kvplug.models import smollm2_dir

    t_start = time.time()
    model = str(smollm2_dir())
    if args.long_gen:
        return footprint(args, model)
    tok = AutoTokenizer.from_pretrained(model)
    text = tok("\n\n".join(topics[k] for k in sorted(topics)), add_special_tokens=False).input_ids
    p, g = args.prompt, args.gen
    if len(text) < (args.n + 1) * p:
        sys.exit("the text is too short for --n x --prompt tokens")
    single = text[:p]
    batch = [text[(i + 1) * p : (i + 2) * p] for i in range(args.n)]
    samples = tasks.needle(lambda s: tok(s, add_special_tokens=False).input_ids, p - 20, args.needles)
    needles = [tok(s.context + s.question, add_special_tokens=False).input_ids for s in samples]
    keys = [s.answer.strip() for s in samples]
    per_request = math.ceil((p + g) / BLOCK)
    num_blocks = args.fit * per_request + 1  # + vLLM's null block
    max_len = per_request * BLOCK  # vLLM refuses a pool smaller than one max_model_len request
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager").eval()

    rows = []
    for method, ratio, cfg in settings([float(r) for r in args.ratios.split(",")], p):
        label = f"{method} {ratio:.0%}"
        print(f"{label}: single request and needles", file=sys.stderr, flush=True)
        one = engine(
            model,
            cfg,
            prompts=[single, *needles],
            max_tokens=[g] + [8] * len(needles),
            trace_blocks=True,
            max_model_len=max_len,
        )
        held = one["outputs"][0]["blocks_used"][-2]  # the last decode step (the final entry is after the finish)
        outs = [tok.decode(o["token_ids"][:8]).strip() for o in one["outputs"][1:]]
        ok = sum(o.startswith(k) for o, k in zip(outs, keys, strict=True))
        hf_outs = [tok.decode(t).strip() for t in hf_needles(hf, needles, cfg)]
        hf_ok = sum(o.startswith(k) for o, k in zip(hf_outs, keys, strict=True))
        same = sum(a == b for a, b in zip(outs, hf_outs, strict=True))
        print(f"{label}: batch of {args.n} in {num_blocks} blocks", file=sys.stderr, flush=True)
        many = engine(
            model,
            cfg,
            prompts=batch,
            max_tokens=g,
            trace_batch=True,
            num_blocks=num_blocks,
            max_model_len=max_len,
            log_stats=True,
        )
        trace = many["trace"]
        tps = sum(s["new_tokens"] for s in trace) / sum(s["seconds"] for s in trace)
        rows.append(
            {
                "method": method,
                "ratio": ratio,
                "window": cfg.get("window", "") if cfg else "",
                "blocks_held": held,
                "max_running": max(s["running"] for s in trace),
                "mean_running": sum(s["running"] * s["seconds"] for s in trace) / sum(s["seconds"] for s in trace),
                "preemptions": sum(o.get("num_preemptions", 0) for o in many["outputs"]),
                "tps": tps,
                "needle_ok": ok,
                "hf_needle_ok": hf_ok,
                "engine_eq_hf": same,
                "freed": one["metrics"].get(f'kvplug_evict_blocks_freed_total{{"method": "{method}"}}', 0.0),
            }
        )
        print(rows[-1], file=sys.stderr, flush=True)
    write(args, rows, len(needles), per_request, num_blocks, time.time() - t_start)


def footprint(args: argparse.Namespace, model: str) -> None:
    """One request (a 64-token prompt, ``--long-gen`` greedy tokens, EOS ignored) with and without StreamingLLM
    (4 sinks + 1020 window): blocks held after each step, written to ``<out>-footprint.md`` and ``.csv``."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    prompt = tok(topics["assert"], add_special_tokens=False).input_ids[:64]
    cfg = {"method": "streamingllm", "num_sinks": SINKS, "window": 1020}
    max_len = -(-(64 + args.long_gen) // BLOCK) * BLOCK
    held = {}
    for name, c in (("none", None), ("streamingllm", cfg)):
        t = time.time()
        rep = engine(model, c, prompts=[prompt], max_tokens=args.long_gen, trace_blocks=True, max_model_len=max_len,
                     ignore_eos=True)  # fmt: skip
        held[name] = (rep["outputs"][0]["blocks_used"][:-1], time.time() - t)
    stem = args.out.with_name(args.out.stem + "-footprint")
    marks = sorted({min(len(held["none"][0]), k) - 1 for k in (1, 256, 512, 1024, 2048, 4096, 8192, 1 << 30)})
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "tokens", "blocks_none", "blocks_streamingllm"])
        for i in marks:
            w.writerow([i + 1, 64 + i + 1, held["none"][0][i], held["streamingllm"][0][i]])
    lines = [
        "# StreamingLLM inside vLLM: footprint of a long generation",
        "",
        f"`python bench/engine_eviction.py {' '.join(sys.argv[1:])}`: one request, 64 prompt tokens, "
        f"{args.long_gen} greedy tokens (EOS ignored), SmolLM2-135M, vLLM CPU float32, block size {BLOCK}; "
        "blocks held = vLLM's block-pool counter after each step. StreamingLLM: 4 sinks + 1020-token window.",
        "",
        "| step | tokens in context | blocks, no eviction | blocks, StreamingLLM |",
        "|---|---|---|---|",
        *[f"| {i + 1} | {64 + i + 1} | {held['none'][0][i]} | {held['streamingllm'][0][i]} |" for i in marks],
        "",
        f"Max blocks held: {max(held['none'][0])} without eviction, {max(held['streamingllm'][0])} with "
        f"StreamingLLM; run time {held['none'][1]:.0f} s vs {held['streamingllm'][1]:.0f} s.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write(args: argparse.Namespace, rows: list[dict[str, Any]], n: int, per_request: int, blocks: int, s: float):
    base = rows[0]
    for r in rows:
        r["blocks_freed_frac"] = 1 - r["blocks_held"] / base["blocks_held"]
        r["max_concurrency_ratio"] = r["max_running"] / base["max_running"]
        r["decode_tps_ratio"] = r["tps"] / base["tps"]
        r["needle_acc"] = r["needle_ok"] / n
        r["hf_needle_acc"] = r["hf_needle_ok"] / n
    cols = ["method", "ratio", "blocks_freed_frac", "max_concurrency_ratio", "decode_tps_ratio", "needle_acc",
            "hf_needle_acc", "window", "blocks_held", "max_running", "mean_running", "preemptions", "tps",
            "engine_eq_hf", "needle_n"]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "needle_n": n, **{k: f"{r[k]:.4f}" for k in cols if isinstance(r.get(k), float)}})

    def ci(k: int) -> str:
        lo, hi = wilson(k, n)
        return f"{k}/{n} [{lo:.0%}, {hi:.0%}]"

    from kvplug.integrations.vllm._compat import vllm_version

    lines = [
        "# KV eviction inside vLLM (StreamingLLM, SnapKV)",
        "",
        f"`python bench/engine_eviction.py {' '.join(sys.argv[1:])}` (`bench/engine_eviction.py`), vLLM "
        f"{vllm_version()} CPU, SmolLM2-135M-Instruct, float32, block size {BLOCK}, {os.cpu_count()} CPU cores "
        f"(1-min load {os.getloadavg()[0]:.2f} at the end), {s:.0f} s.",
        "",
        f"A request is {args.prompt} prompt tokens + {args.gen} greedy tokens ({per_request} blocks without "
        f"eviction). The prompt is prefilled with full attention. Compression r: StreamingLLM keeps 4 sink tokens + a "
        f"window of (1 - r) x {args.prompt} - 4 tokens (sliding as the output grows); SnapKV frees its lowest-scored "
        f"prompt blocks once (compression_ratio r; the output's blocks stay). "
        f"Blocks held: one request alone, vLLM's block-pool counter "
        f"at its last decode step. Max running: {args.n} requests added at once to a pool of {blocks} blocks "
        f"({args.fit} whole requests); mean running is weighted by step time; preemptions from vLLM's request stats. "
        f"Tokens/s: output tokens over that whole run (prefill included). Needle: "
        f"{n} pass-key prompts of about {args.prompt} tokens (10 depths), 8 greedy tokens; HF = transformers with "
        f"exactly the engine's block mask (what the method defines); engine = HF: outputs equal as text.",
        "",
        "| method | r | window | blocks held | freed | max running | concurrency | mean running | preemptions | "
        "tokens/s | tokens/s ratio | needle (engine) | needle (HF, same mask) | engine = HF |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['ratio']:.0%} | {r['window']} | {r['blocks_held']} | {r['blocks_freed_frac']:.0%} "
            f"| {r['max_running']} | {r['max_concurrency_ratio']:.2f}x | {r['mean_running']:.1f} "
            f"| {r['preemptions']} | "
            f"{r['tps']:.1f} | "
            f"{r['decode_tps_ratio']:.2f}x | {ci(r['needle_ok'])} | {ci(r['hf_needle_ok'])} | "
            f"{r['engine_eq_hf']}/{n} |"
        )
    for half in (r for r in rows if abs(r["ratio"] - 0.5) < 1e-9):
        lines += [
            "",
            f"Goals at 50% compression ({half['method']}): blocks freed >= 45%: "
            f"{half['blocks_freed_frac']:.0%} ({'met' if half['blocks_freed_frac'] >= 0.45 else 'not met'}); "
            f"concurrency >= 1.8x: {half['max_concurrency_ratio']:.2f}x "
            f"({'met' if half['max_concurrency_ratio'] >= 1.8 else 'not met'}); needle accuracy equal to the HF "
            f"path's within its interval: {half['needle_ok']}/{n} vs {half['hf_needle_ok']}/{n}.",
        ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
