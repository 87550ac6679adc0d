"""Cache-aware scheduling versus vLLM's FCFS on SmolLM2 through vLLM CPU: one arrival stream, one seed, both policies.

Workload: ``--n`` requests arriving as a Poisson process at ``--rate`` requests/s (default: calibrated in the first
engine, from the times of its warm-up prefills, to ``--load`` times its estimated capacity, so the engine queues
without drowning; the second engine gets the same rate and stream). 60% ("cached") are one of
``--prefixes`` long shared prefixes (``--prefix-tokens``) plus a short unique suffix; the prefixes are run through
the engine (vLLM's prefix cache) before the measured stream. 40% ("cold") are unique prompts of the same total
length. Every request asks for ``--max-tokens`` greedy tokens (ignore_eos). Each policy is a new engine (a new
process running vLLM's ``LLMEngine`` in process) fed the identical stream: each request is added when its arrival
time has come (between engine steps, which is where vLLM's engine core takes new requests too), with that arrival
as its ``arrival_time``, so TTFT = first token time - arrival, per request. Max wait =
arrival to first scheduled, with vLLM's own ``scheduled_ts`` (``time.monotonic``).

    .venv/bin/python bench/scheduler.py [--quick] [--out docs/results/scheduler.md]

Writes the Markdown report (``--out``) and a CSV next to it (policy, class, mean_ttft_s, p90_ttft_s, max_wait_s,
throughput_rps; class = all|cached|cold). Also checks the aging bound on the measured admissions: no request was
first scheduled after one that reached the engine more than ``max_delay_s`` later than it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLASS_PATH = "kvplug.integrations.vllm.scheduler.CacheAwareScheduler"
POLICIES = {"fcfs": None, "cache-aware": CLASS_PATH}
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


# ---------------------------------------------------------------------------------------------------- workload --
def build_workload(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Token prompts, classes and arrival offsets (at rate 1/s, from stream start), all from ``args.seed``."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)("\n\n".join(topics[k] for k in sorted(topics))).input_ids
    rng = random.Random(args.seed)
    p, s = args.prefix_tokens, args.suffix_tokens
    prefixes = [ids[i * p : (i + 1) * p] for i in range(args.prefixes)]
    pool_start = args.prefixes * p  # suffixes and cold prompts come from text after the prefixes
    requests, t = [], 0.0
    for i in range(args.n):
        t += rng.expovariate(1.0)  # unit rate: the engine scales by the rate
        cached = rng.random() < args.cached_fraction
        # a distinct start offset per request: no two requests share a first block, so nothing else is shared
        start = pool_start + 7 * i + rng.randrange(7)
        if cached:
            prompt = prefixes[rng.randrange(args.prefixes)] + ids[start : start + s]
        else:
            prompt = ids[start : start + p + s]
        requests.append({"id": f"r{i:03d}", "cls": "cached" if cached else "cold", "arrival": t, "prompt": prompt})
    assert all(len(r["prompt"]) == p + s for r in requests), "the text is too short for this workload"
    return {"prefixes": prefixes, "requests": requests}


# ------------------------------------------------------------------------------------------------------ engine --
def _stream(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): each request is added at its arrival time
    (between engine steps, where vLLM's engine core receives requests too) with that arrival as its
    ``arrival_time``; the engine is stepped while anything runs."""
    from vllm import LLM, SamplingParams

    extra: dict[str, Any] = {}
    if spec["scheduler_cls"]:
        extra["scheduler_cls"] = spec["scheduler_cls"]
        extra["additional_config"] = {"kvplug_scheduler": {"max_delay_s": spec["max_delay_s"]}}
    llm = LLM(
        spec["model"],
        dtype=spec["dtype"],
        max_model_len=4096,
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        max_num_seqs=spec["max_num_seqs"],
        block_size=32,
        enforce_eager=True,
        enable_prefix_caching=True,
        seed=0,
        disable_log_stats=False,  # per-request scheduled timestamps
        **extra,
    )
    eng = llm.llm_engine
    sp = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True)
    # warm: one cold prompt (first-run costs), then each shared prefix into vLLM's prefix cache, one at a time
    warm = SamplingParams(max_tokens=1, temperature=0)
    llm.generate({"prompt_token_ids": spec["requests"][0]["prompt"][::-1]}, warm, use_tqdm=False)
    cold_s = []
    for prompt in spec["prefixes"]:
        t = time.perf_counter()
        llm.generate({"prompt_token_ids": prompt}, warm, use_tqdm=False)
        cold_s.append(time.perf_counter() - t)
    hit = next(r["prompt"] for r in spec["requests"] if r["cls"] == "cached")
    t = time.perf_counter()
    n_pre = len(spec["prefixes"][0])
    llm.generate({"prompt_token_ids": hit[:n_pre] + hit[n_pre:][::-1]}, warm, use_tqdm=False)  # a hit not in the stream
    hit_s = time.perf_counter() - t
    cold_full_s = statistics.fmean(cold_s) * len(hit) / len(spec["prefixes"][0])
    frac = sum(r["cls"] == "cached" for r in spec["requests"]) / len(spec["requests"])
    service_s = frac * hit_s + (1 - frac) * cold_full_s
    rate = spec["rate"] or max(spec["load"] / service_s, len(spec["requests"]) / spec["max_stream_s"])
    print(f"calibration: cold {cold_full_s:.2f} s, hit {hit_s:.2f} s -> rate {rate:.3f}/s", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]

    pending = sorted(spec["requests"], key=lambda r: r["arrival"])
    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    wall0 = time.time() - t0  # wall clock = monotonic + wall0
    while pending or eng.has_unfinished_requests():
        now = time.monotonic()
        while pending and t0 + pending[0]["arrival"] / rate <= now:
            r = pending.pop(0)
            arrival[r["id"]] = t0 + r["arrival"] / rate
            eng.add_request(r["id"], {"prompt_token_ids": r["prompt"]}, sp, arrival_time=wall0 + arrival[r["id"]])
        if not eng.has_unfinished_requests():
            time.sleep(max(min(t0 + pending[0]["arrival"] / rate - now, 0.05), 0.0))
            continue
        for out in eng.step():
            t = time.monotonic()
            if out.request_id not in first and out.outputs and out.outputs[0].token_ids:
                first[out.request_id] = t
            if out.finished:
                if len(results) % 10 == 9:
                    print(f"{len(results) + 1} done at {t - t0:.0f} s", file=sys.stderr, flush=True)
                m = out.metrics
                a = arrival[out.request_id]
                results.append(
                    {
                        "id": out.request_id,
                        "arrival": a,
                        "ttft": first[out.request_id] - a,
                        "done": t,
                        "wait": m.scheduled_ts - a,  # both time.monotonic
                        "scheduled_ts": m.scheduled_ts,
                        "preemptions": m.num_preemptions,
                        "cached_tokens": out.num_cached_tokens or 0,
                        "token_ids": list(out.outputs[0].token_ids),
                    }
                )
    return {
        "results": results,
        "elapsed": time.monotonic() - t0,
        "load_before": load_before,
        "rate": rate,
        "calibration": {"cold_s": cold_full_s, "hit_s": hit_s, "service_s": service_s},
    }


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    report = _stream(spec)
    Path(spec["report"]).write_text(json.dumps(report))


def run_policy(spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    spec_path, report = tmp / f"{spec['policy']}.spec.json", tmp / f"{spec['policy']}.report.json"
    spec_path.write_text(json.dumps({**spec, "report": str(report)}))
    r = subprocess.run(
        [sys.executable, __file__, "--worker", str(spec_path)], env={**os.environ, **ENGINE_ENV}, timeout=1800
    )
    if r.returncode != 0 or not report.exists():
        raise RuntimeError(f"{spec['policy']} engine failed (rc {r.returncode}): see its log above")
    return json.loads(report.read_text())


# ----------------------------------------------------------------------------------------------------- summary --
def p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(0.9 * len(xs)) - 1)]


def bound_violations(results: list[dict[str, Any]], max_delay_s: float) -> int:
    """Pairs (a, b) where b arrived more than max_delay_s after a and was first scheduled before a."""
    n = 0
    for a in results:
        for b in results:
            if b["arrival"] > a["arrival"] + max_delay_s and b["scheduled_ts"] < a["scheduled_ts"]:
                n += 1
    return n


def summarize(policy: str, report: dict[str, Any], classes: dict[str, str]) -> list[dict[str, Any]]:
    res = report["results"]
    span = max(r["done"] for r in res) - min(r["arrival"] for r in res)
    rows = []
    for cls in ("all", "cached", "cold"):
        sel = [r for r in res if cls == "all" or classes[r["id"]] == cls]
        ttft = [r["ttft"] for r in sel]
        rows.append(
            {
                "policy": policy,
                "class": cls,
                "mean_ttft_s": statistics.fmean(ttft),
                "p90_ttft_s": p90(ttft),
                "max_wait_s": max(r["wait"] for r in sel),
                "throughput_rps": len(sel) / span,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="a small smoke run (few requests, short prompts)")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--rate", type=float, default=None, help="mean arrivals per second (default: calibrated)")
    ap.add_argument("--load", type=float, default=0.85, help="calibrated rate = load x estimated capacity")
    ap.add_argument("--max-stream-s", type=float, default=80.0, help="calibrated rate >= n / this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cached-fraction", type=float, default=0.6)
    ap.add_argument("--prefixes", type=int, default=3)
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--suffix-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512, help="the step's token budget (chunked prefill)")
    ap.add_argument("--max-delay", type=float, default=3.0, help="kvplug_scheduler.max_delay_s (3.0 = default)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.quick:
        args.n, args.prefix_tokens, args.suffix_tokens = 12, 256, 32

    from kvplug.integrations.vllm._compat import vllm_version
    from kvplug.models import smollm2_dir

    model = str(smollm2_dir())
    wl = build_workload(args, model)
    classes = {r["id"]: r["cls"] for r in wl["requests"]}
    base = {
        "model": model,
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_delay_s": args.max_delay,
        "rate": args.rate,
        "load": args.load,
        "max_stream_s": args.max_stream_s,
        **wl,
    }
    load = [os.getloadavg()[0]]
    started = time.monotonic()
    reports: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy, cls_path in POLICIES.items():
            reports[policy] = run_policy({**base, "policy": policy, "scheduler_cls": cls_path}, Path(tmp))
            base["rate"] = reports[policy]["rate"]  # the next engine gets the identical stream
            load.append(os.getloadavg()[0])
            print(f"{policy}: done in {reports[policy]['elapsed']:.1f} s", file=sys.stderr)
    total_s = time.monotonic() - started

    rows = [row for policy in POLICIES for row in summarize(policy, reports[policy], classes)]
    ref = {r["class"]: r for r in rows if r["policy"] == "fcfs"}
    ca = {r["class"]: r for r in rows if r["policy"] == "cache-aware"}
    toks = {p: {r["id"]: r["token_ids"] for r in reports[p]["results"]} for p in POLICIES}
    same = sum(toks["fcfs"][i] == toks["cache-aware"][i] for i in classes)
    violations = {p: bound_violations(reports[p]["results"], args.max_delay) for p in POLICIES}
    preempt = {p: sum(r["preemptions"] for r in reports[p]["results"]) for p in POLICIES}
    hit = {
        p: statistics.fmean(r["cached_tokens"] for r in reports[p]["results"] if classes[r["id"]] == "cached")
        for p in POLICIES
    }
    mean_ratio = ref["all"]["mean_ttft_s"] / ca["all"]["mean_ttft_s"]
    cold_p90_ratio = ca["cold"]["p90_ttft_s"] / ref["cold"]["p90_ttft_s"]
    bound_ok = violations["cache-aware"] == 0 and ca["all"]["max_wait_s"] <= ref["all"]["max_wait_s"] + args.max_delay
    goals = [
        ("mean TTFT (all) >= 1.3x lower than FCFS", f"{mean_ratio:.2f}x lower", mean_ratio >= 1.3),
        ("cold p90 TTFT <= 1.2x FCFS's", f"{cold_p90_ratio:.2f}x FCFS", cold_p90_ratio <= 1.2),
        (
            f"aging bound (max_delay_s = {args.max_delay:g})",
            f"{violations['cache-aware']} late-arrival overtakes; max wait {ca['all']['max_wait_s']:.2f} s "
            f"vs FCFS {ref['all']['max_wait_s']:.2f} s + {args.max_delay:g} s",
            bound_ok,
        ),
    ]

    rate = reports["fcfs"]["rate"]
    cal = reports["fcfs"]["calibration"]
    rate_note = (
        "as given"
        if args.rate
        else f"calibrated: max({args.load:g} x 1/{cal['service_s']:.2f} s, n / {args.max_stream_s:g} s); "
        f"{cal['service_s']:.2f} s is the mean prefill estimated from warm-up timings: cold {cal['cold_s']:.2f} s, "
        f"hit {cal['hit_s']:.2f} s"
    )
    cmd = "python bench/scheduler.py " + " ".join(a for a in sys.argv[1:])
    lines = [
        "# Cache-aware scheduling vs FCFS (vLLM CPU, SmolLM2)",
        "",
        f"`{cmd.strip()}` (`bench/scheduler.py`), vLLM {vllm_version()} CPU, {Path(model).name}, {args.dtype}, "
        f"{os.cpu_count()} CPU cores, one seed ({args.seed}); each policy a new engine process, the same stream.",
        f"1-min load average: {load[0]:.2f} before, {load[1]:.2f} after FCFS, {load[2]:.2f} after cache-aware "
        f"(whole run {total_s:.0f} s; an engine keeps about 1-2 cores busy by itself). One run, one seed: expect "
        "noise between runs.",
        "",
        f"Workload: {args.n} requests, Poisson arrivals at {rate:.3f}/s ({rate_note}); "
        f"{args.cached_fraction:.0%} share one of "
        f"{args.prefixes} {args.prefix_tokens}-token prefixes (warmed into vLLM's prefix cache first) plus a "
        f"{args.suffix_tokens}-token unique suffix, the rest cold prompts of the same length "
        f"({args.prefix_tokens + args.suffix_tokens} tokens); {args.max_tokens} greedy output tokens each; "
        f"max_num_seqs {args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens}, "
        f"cache-aware max_delay_s {args.max_delay:g}. Requests per class: "
        f"{sum(c == 'cached' for c in classes.values())} cached, {sum(c == 'cold' for c in classes.values())} cold.",
        "",
        "TTFT = first token - arrival, per request; wait = first scheduled (vLLM's scheduled_ts) - arrival;",
        "throughput = requests / (last finish - first arrival).",
        "",
        "| policy | class | mean TTFT s | p90 TTFT s | max wait s | throughput req/s | mean TTFT vs FCFS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = ref[r["class"]]["mean_ttft_s"] / r["mean_ttft_s"]
        lines.append(
            f"| {r['policy']} | {r['class']} | {r['mean_ttft_s']:.3f} | {r['p90_ttft_s']:.3f} | "
            f"{r['max_wait_s']:.3f} | {r['throughput_rps']:.3f} | {ratio:.2f}x lower |"
        )
    lines += [
        "",
        "Goals:",
        "",
        *[f"- {name}: {value} — {'met' if ok else 'NOT met'}" for name, value, ok in goals],
        "",
        f"Checks: outputs identical token for token in {same}/{len(classes)} requests; "
        f"mean cached tokens per cached request: FCFS {hit['fcfs']:.0f}, cache-aware {hit['cache-aware']:.0f}; "
        f"preemptions: FCFS {preempt['fcfs']}, cache-aware {preempt['cache-aware']}; "
        f"late-arrival overtakes (> max_delay_s) under FCFS: {violations['fcfs']}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        with open(args.out.with_suffix(".csv"), "w", newline="") as f:
            cols = ["policy", "class", "mean_ttft_s", "p90_ttft_s", "max_wait_s", "throughput_rps"]
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    main()
