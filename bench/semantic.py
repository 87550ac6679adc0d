"""Semantic-cache benchmark: per-category hit and false-hit rates (one global threshold vs the category-aware
policy) and the proxy's added latency on a miss, all through the real proxy, a private Redis and MiniLM.

    .venv/bin/python bench/semantic.py [--seed 0] [--latency-requests 300] [--out docs/results/semantic.md]

Workload (generated here, deterministic, no downloads): for each category, question families written as several
paraphrase templates with slots. A *group* is one family with one filling of its slots: every template of a group
is the same question (a reuse opportunity once the group was asked), while another filling of the same family is
a near-miss (same template, another entity/number/function name) whose answer is wrong. Categories differ in
density: code and time-sensitive near-misses differ by one identifier or place, chat families are few and far
apart. The tiny upstream answers with the group's id, so a hit is checked: the returned answer is either the
asked group's (correct hit) or another group's (false hit).

- hit rate = correct hits / reuse opportunities (requests whose group was asked before);
- false-hit rate = false hits / all requests of the category.

Latency: unique questions (every one a miss) sent one at a time through the proxy and directly to the same tiny
upstream, alternating, in the same run; the difference of the medians is the proxy's added latency on a miss.
Measured with ``speculative: off`` (look up, then forward) and the default ``speculative: auto`` (while the
upstream is unloaded, as here: forward at once and race the lookup).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import redis

from kvplug.bench.report import emit_table
from kvplug.semantic.config import SemanticCacheConfig
from kvplug.semantic.embedder import AsyncEmbedder, make_embedder
from kvplug.semantic.policy import DEFAULT_POLICY, parse_policy
from kvplug.semantic.proxy import PROXY_KEY, build_app
from kvplug.semantic.testing import AppThread, FakeUpstream
from kvplug.testing import RedisServer

# category -> list of families; a family is (paraphrase templates, slot fillings)
FAMILIES: dict[str, list[tuple[list[str], list[dict[str, str]]]]] = {
    "code": [
        (
            [
                "How do I {op} a {ds} in {lang}?",
                "What is the best way to {op} a {ds} in {lang}?",
                "In {lang}, how can I {op} a {ds}?",
                "Show me how to {op} a {ds} using {lang}.",
            ],
            [
                {"op": op, "ds": ds, "lang": lang}
                for op in ("reverse", "sort", "copy")
                for ds in ("list", "string")
                for lang in ("Python", "JavaScript")
            ],
        ),
        (
            [
                "What does the {fn} function do in Python?",
                "Explain Python's built-in {fn} function.",
                "How does {fn} work in Python?",
            ],
            [{"fn": fn} for fn in ("map", "filter", "zip", "enumerate", "sorted", "len", "range", "isinstance")],
        ),
        (
            [
                "How do I fix a {err} in Python?",
                "What causes a {err} in Python and how do I solve it?",
                "My Python code raises {err}, how do I fix it?",
            ],
            [{"err": e} for e in ("KeyError", "IndexError", "TypeError", "ValueError", "AttributeError", "NameError")],
        ),
        (
            [
                "Write a SQL query that selects the {n} most recent orders.",
                "SQL: get the latest {n} orders from the orders table.",
                "How do I query the {n} newest rows of an orders table in SQL?",
            ],
            [{"n": n} for n in ("5", "10", "20", "100")],
        ),
    ],
    "factual": [
        (
            [
                "What is the capital of {country}?",
                "Which city is the capital of {country}?",
                "Tell me the capital city of {country}.",
                "What's {country}'s capital?",
            ],
            [{"country": c} for c in ("France", "Germany", "Japan", "Canada", "Brazil", "Kenya", "Norway", "Peru")],
        ),
        (
            [
                "Who wrote {book}?",
                "Who is the author of {book}?",
                "{book} was written by which author?",
            ],
            [
                {"book": b}
                for b in ("Pride and Prejudice", "Moby-Dick", "War and Peace", "Hamlet", "Don Quixote", "Dracula")
            ],
        ),
        (
            [
                "How tall is {peak}?",
                "What is the height of {peak}?",
                "How high is {peak} in metres?",
            ],
            [{"peak": p} for p in ("Mount Everest", "K2", "Mont Blanc", "Kilimanjaro", "Denali", "Mount Fuji")],
        ),
        (
            [
                "When was {person} born?",
                "What year was {person} born?",
                "What is the birth year of {person}?",
            ],
            [
                {"person": p}
                for p in ("Albert Einstein", "Marie Curie", "Isaac Newton", "Ada Lovelace", "Charles Darwin")
            ],
        ),
    ],
    "chat": [
        (
            [
                "Tell me a joke about {topic}.",
                "Do you know a funny joke about {topic}?",
                "Make me laugh with a joke about {topic}.",
            ],
            [{"topic": t} for t in ("cats", "programmers", "the ocean")],
        ),
        (
            [
                "I feel {mood}, can you cheer me up?",
                "I'm a bit {mood}. Could you say something to make me feel better?",
                "Feeling {mood} right at the moment, any kind words?",
            ],
            [{"mood": m} for m in ("sad", "lonely")],
        ),
        (
            [
                "Can you recommend a good {genre} movie?",
                "What {genre} film would you suggest I watch?",
                "Suggest a {genre} movie for me.",
            ],
            [{"genre": g} for g in ("comedy", "horror", "science fiction")],
        ),
        (
            [
                "What is your favourite {thing}?",
                "Which {thing} do you like the most?",
                "Do you have a favourite {thing}?",
            ],
            [{"thing": t} for t in ("colour", "book")],
        ),
        (
            [
                "Give me some ideas for a rainy weekend at home.",
                "What can I do at home on a rainy weekend?",
                "Any suggestions for spending a rainy weekend indoors?",
            ],
            [{}],
        ),
    ],
    "time_sensitive": [
        (
            [
                "What's the weather in {city} today?",
                "How is the weather in {city} right now?",
                "What is today's weather forecast for {city}?",
                "Is it sunny in {city} today?",
            ],
            [{"city": c} for c in ("London", "Paris", "Tokyo", "Berlin", "Madrid", "Chicago", "Sydney", "Toronto")],
        ),
        (
            [
                "What is the current price of {asset}?",
                "How much is {asset} trading at right now?",
                "What's {asset}'s price today?",
            ],
            [{"asset": a} for a in ("Bitcoin", "Ethereum", "gold", "Apple stock", "Tesla stock", "silver")],
        ),
        (
            [
                "What's the latest news about {topic} today?",
                "Any breaking news on {topic} today?",
                "What happened with {topic} today?",
            ],
            [{"topic": t} for t in ("the election", "the stock market", "the World Cup", "climate talks")],
        ),
    ],
}


def workload(seed: int) -> list[tuple[str, str, str]]:
    """``(category, group id, text)`` in a deterministic shuffled order."""
    reqs = []
    for cat, fams in FAMILIES.items():
        for f, (templates, fillings) in enumerate(fams):
            for slots in fillings:
                group = f"{cat}/{f}/" + "/".join(slots.values())
                reqs += [(cat, group, t.format(**slots)) for t in templates]
    random.Random(seed).shuffle(reqs)
    return reqs


def global_policy(threshold: float) -> dict[str, Any]:
    """The built-in policy with one threshold everywhere (classification, TTLs and quotas unchanged)."""
    pol = copy.deepcopy(DEFAULT_POLICY)
    pol["adaptive"]["enabled"] = False
    for c in pol["categories"].values():
        c["threshold"] = threshold
        c.pop("min_threshold", None)
    return pol


def aware_policy() -> dict[str, Any]:
    pol = copy.deepcopy(DEFAULT_POLICY)
    pol["adaptive"]["enabled"] = False  # measure the static per-category thresholds
    return pol


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    async with session.post(url, json=body) as r:
        return dict(r.headers), await r.json()


def run_hit_rates(th: AppThread, redis_url: str, embedder: Any, policy: dict[str, Any], reqs: list) -> dict:
    """Send the workload through a fresh proxy; per-category counts."""
    redis.Redis.from_url(redis_url).flushdb()
    group_of = {text: group for _, group, text in reqs}
    up = FakeUpstream(answer_for=lambda q: group_of[q])
    up_url = th.start(up.app())
    cfg = SemanticCacheConfig(upstream=up_url, redis_url=redis_url, speculative="off", sweep_interval_s=0)
    app = build_app(cfg, embedder=embedder, policy=parse_policy(policy, "bench policy"))
    url = th.start(app)
    proxy = app[PROXY_KEY]
    stats: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    async def go() -> None:
        seen: set[str] = set()
        async with aiohttp.ClientSession() as s:
            for cat, group, text in reqs:
                body = {"model": "m", "messages": [{"role": "user", "content": text}], "temperature": 0}
                headers, out = await _post(s, url + "/v1/chat/completions", body)
                await proxy.cache.drain()  # the insert lands before the next request: a deterministic sequence
                st = stats[cat]
                st["requests"] += 1
                st["opportunities"] += group in seen
                st["classified_ok"] += headers.get("x-kvplug-category") == cat
                if headers.get("x-kvplug-cache") == "hit":
                    answer = out["choices"][0]["message"]["content"]
                    st["correct_hits" if answer == group else "false_hits"] += 1
                seen.add(group)

    th.call(go(), timeout=1200)
    th.stop(url)
    th.stop(up_url)
    return stats


def run_latency(th: AppThread, redis_url: str, embedder: Any, n: int, speculative: str) -> dict[str, list[float]]:
    redis.Redis.from_url(redis_url).flushdb()
    up = FakeUpstream()
    up_url = th.start(up.app())
    pol = aware_policy()
    cfg = SemanticCacheConfig(upstream=up_url, redis_url=redis_url, speculative=speculative, sweep_interval_s=0)
    app = build_app(cfg, embedder=embedder, policy=parse_policy(pol, "bench policy"))
    url = th.start(app)
    proxy = app[PROXY_KEY]
    out: dict[str, list[float]] = {"direct": [], "proxy": [], "embed": []}
    queries = miss_queries(n + 20)

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            for i, q in enumerate(queries):
                body = {"model": "m", "messages": [{"role": "user", "content": q}], "temperature": 0}
                order = ("direct", "proxy") if i % 2 else ("proxy", "direct")
                sample: dict[str, float] = {}
                for side in order:
                    target = (up_url if side == "direct" else url) + "/v1/chat/completions"
                    t0 = time.perf_counter()
                    headers, _ = await _post(s, target, body)
                    sample[side] = time.perf_counter() - t0
                    if side == "proxy":
                        await proxy.cache.drain()  # the insert runs after the answer: keep it out of the next one
                        if headers.get("x-kvplug-cache") != "miss":
                            sample.clear()  # a near-duplicate sentence hit: not a miss sample
                            break
                if i >= 20 and sample:  # the first 20 are warm-up
                    for side, dt in sample.items():
                        out[side].append(dt)

    async def embed_only() -> None:
        """The same queries through a fresh AsyncEmbedder (no text cache): the embedding's share of a miss."""
        ae = AsyncEmbedder(embedder, cache_size=0)
        for q in queries[20:]:
            t0 = time.perf_counter()
            await ae.embed(q)
            out["embed"].append(time.perf_counter() - t0)
        ae.close()

    th.call(go(), timeout=1200)
    if speculative == "off":
        th.call(embed_only(), timeout=1200)
    th.stop(url)
    th.stop(up_url)
    return out


def miss_queries(n: int) -> list[str]:
    """``n`` distinct sentences of Python's own documentation (offline), as questions."""
    from pydoc_data.topics import topics

    seen, out = set(), []
    for key in sorted(topics):
        for sent in topics[key].replace("\n", " ").split(". "):
            sent = " ".join(sent.split())
            if 40 <= len(sent) <= 160 and sent not in seen:
                seen.add(sent)
                out.append(f"What does this mean: {sent}?")
    random.Random(1).shuffle(out)
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct sentences")
    return out[:n]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--global-threshold", type=float, default=0.8)
    ap.add_argument("--latency-requests", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None, help="Write the Markdown tables here")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    embedder = make_embedder("minilm")
    reqs = workload(args.seed)
    th = AppThread()
    try:
        with RedisServer() as rs:
            res = {
                "global": run_hit_rates(th, rs.url, embedder, global_policy(args.global_threshold), reqs),
                "aware": run_hit_rates(th, rs.url, embedder, aware_policy(), reqs),
            }
            lat = {mode: run_latency(th, rs.url, embedder, args.latency_requests, mode) for mode in ("off", "auto")}
    finally:
        th.close()
    print(json.dumps({k: {c: dict(v) for c, v in r.items()} for k, r in res.items()}, indent=1))
    aware_thr = {n: c.get("threshold") for n, c in DEFAULT_POLICY["categories"].items()}
    lines = [
        f"Semantic cache, workload `bench/semantic.py --seed {args.seed}`: {len(reqs)} chat requests, "
        f"{len({g for _, g, _ in reqs})} question groups, real all-MiniLM-L6-v2, private Redis, tiny upstream "
        f"({platform.machine()}, {os.cpu_count()} cores, embedder on {getattr(embedder, 'threads', '?')} torch "
        f"thread; 1-min load average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after: "
        "other jobs on the machine inflate the absolute latencies, not the hit rates).",
        "",
        f"| category | requests | reuse opportunities | classified right | global {args.global_threshold} hit rate "
        "| global false-hit rate | category-aware threshold | category-aware hit rate "
        "| category-aware false-hit rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    totals: dict[str, dict[str, int]] = {"global": defaultdict(int), "aware": defaultdict(int)}
    for cat in FAMILIES:
        g, a = res["global"][cat], res["aware"][cat]
        for k in ("requests", "opportunities", "correct_hits", "false_hits"):
            totals["global"][k] += g[k]
            totals["aware"][k] += a[k]
        lines.append(
            f"| {cat} | {g['requests']} | {g['opportunities']} | {a['classified_ok'] / a['requests']:.0%} "
            f"| {g['correct_hits'] / g['opportunities']:.1%} | {g['false_hits'] / g['requests']:.1%} "
            f"| {aware_thr[cat]} | {a['correct_hits'] / a['opportunities']:.1%} "
            f"| {a['false_hits'] / a['requests']:.1%} |"
        )
    g, a = totals["global"], totals["aware"]
    lines.append(
        f"| **all** | {g['requests']} | {g['opportunities']} | | {g['correct_hits'] / g['opportunities']:.1%} "
        f"| {g['false_hits'] / g['requests']:.1%} | | {a['correct_hits'] / a['opportunities']:.1%} "
        f"| {a['false_hits'] / a['requests']:.1%} |"
    )
    lines += [
        "",
        "Hit rate = correct hits / reuse opportunities; false-hit rate = hits that returned another question's "
        "answer / all requests of the category. The category-aware thresholds are the built-in policy's, which were "
        "chosen while looking at this workload: read its numbers as an upper bound, not as a held-out result.",
        "",
        f"Added latency on a miss (chat, one request at a time, {args.latency_requests} requests per side, "
        "alternating with direct calls to the same tiny upstream):",
        "",
        "| mode | direct p50 ms | direct p95 ms | proxy p50 ms | proxy p95 ms | added p50 ms | added p95 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, d in lat.items():
        dp50, dp95 = pct(d["direct"], 0.5) * 1e3, pct(d["direct"], 0.95) * 1e3
        pp50, pp95 = pct(d["proxy"], 0.5) * 1e3, pct(d["proxy"], 0.95) * 1e3
        name = "lookup, then forward (`speculative: off`)" if mode == "off" else "race (`speculative: auto`, default)"
        lines.append(
            f"| {name} | {dp50:.2f} | {dp95:.2f} | {pp50:.2f} | {pp95:.2f} | {pp50 - dp50:.2f} | {pp95 - dp95:.2f} |"
        )
        print(mode, "direct mean", statistics.mean(d["direct"]) * 1e3, "proxy mean", statistics.mean(d["proxy"]) * 1e3)
    emb = lat["off"]["embed"]
    lines += [
        "",
        f"The embedding alone (the same questions through the proxy's embedding worker, no cache): p50 "
        f"{pct(emb, 0.5) * 1e3:.2f} ms, p95 {pct(emb, 0.95) * 1e3:.2f} ms. The questions are sentences of Python's "
        f"documentation (mean {statistics.mean(len(q) for q in miss_queries(args.latency_requests)):.0f} characters).",
    ]
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
