"""Shared by the sparse-attention benchmarks: one CSV (``docs/results/sparse.csv``, each benchmark replacing its own
``part`` rows) and the Markdown page rendered from it (``docs/results/sparse.md``)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
CSV_PATH = RESULTS / "sparse.csv"
MD_PATH = RESULTS / "sparse.md"

# the columns first, then what makes them checkable
COLUMNS = [
    "method", "budget", "context", "attn_speedup", "needle_acc", "dense_needle_acc", "ppl_ratio",
    "part", "model", "engine", "dtype", "batch", "dense_ms", "sparse_ms", "needle_n", "needle_lo", "needle_hi",
    "needle_logprob", "dense_needle_logprob", "ppl_n", "decode_tok_s", "dense_decode_tok_s", "reuse_rate", "note",
]  # fmt: skip

PARTS = {
    "attn": (
        "Decode attention time per token (one layer, synthetic KV)",
        "nice -n 5 .venv/bin/python bench/sparse_attn.py",
        "Dense = vLLM's CPU_ATTN kernel over the whole block table (what vLLM runs today). Sparse = kvplug's backend "
        "forward for one layer (selection from the block summaries, compacted tables, the same kernel), plus the "
        "amortised cost of summarising each new block. Medians of interleaved repetitions; speedup = dense / sparse.",
    ),
    "vllm": (
        "Quality and speed through vLLM CPU (SmolLM2-135M, float32)",
        "nice -n 5 .venv/bin/python bench/sparse_quality.py",
        "Needle: RULER-style pass key (kvplug.eval.tasks.needle), answer digits forced token by token through real "
        "decode steps; exact match = every digit is the greedy choice, log-prob = mean over the digits. Dense and "
        "every sparse setting run the same prompts in one engine (prefix cache on: the prompt is prefilled once). "
        "Intervals are 95% Wilson. ppl_ratio = exp(mean NLL sparse - mean NLL dense) over forced continuations of "
        "Python's documentation. Decode tok/s at the longest context SmolLM2 allows, interleaved repetitions.",
    ),
    "e2e": (
        "End-to-end decode tokens/s through vLLM CPU (SmolLM2-135M, float32, longest context)",
        "nice -n 5 .venv/bin/python bench/sparse_quality.py --skip needle,ppl",
        "Greedy decode after a cached prompt of the longest context SmolLM2 allows (8192 max): time of "
        "generate(N + 1 tokens) minus generate(1 token), settings interleaved, median over repetitions.",
    ),
    "gemma": (
        "Quality on the HF path (Gemma-3-270M, float32, global layers sparse)",
        "nice -n 5 .venv/bin/python bench/sparse_gemma.py",
        "The same needle and perplexity scoring through kvplug.integrations.hf.sparse (teacher-forced decode steps); "
        "Gemma-3's 15 sliding-window layers keep their own attention, its 3 global layers are sparse.",
    ),
}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of ``k`` successes in ``n``."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.4g}"
    return "" if v is None else str(v)


def update(part: str, rows: list[dict[str, object]]) -> None:
    """Replace ``part``'s rows in the CSV and re-render the Markdown page."""
    old: list[dict[str, str]] = []
    if CSV_PATH.exists():
        with CSV_PATH.open() as f:
            old = [r for r in csv.DictReader(f) if r.get("part") != part]
    new = [{c: _fmt(r.get(c)) for c in COLUMNS} | {"part": part} for r in rows]
    order = list(PARTS)
    allrows = sorted(old + new, key=lambda r: order.index(r["part"]) if r["part"] in order else 99)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with CSV_PATH.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(allrows)
    render(allrows)


def _table(rows: list[dict[str, str]], cols: list[str]) -> list[str]:
    cols = [c for c in cols if any(r.get(c) for r in rows)]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows]
    return out


def render(rows: list[dict[str, str]]) -> None:
    lines = [
        "# Sparse decode attention: results",
        "",
        "Written by the sparse benchmarks (each run replaces its own rows of `docs/results/sparse.csv` and re-renders "
        "this page). Methods: see docs/sparse.md. Every number below comes from the command named in its section.",
        "",
    ]
    for part, (title, cmd, how) in PARTS.items():
        mine = [r for r in rows if r["part"] == part]
        if not mine:
            continue
        lines += [f"## {title}", "", f"`{cmd}`", "", how, ""]
        if part == "attn":
            cols = ["dtype", "batch", "context", "method", "budget", "dense_ms", "sparse_ms", "attn_speedup", "note"]
        elif part == "e2e":
            cols = ["context", "method", "budget", "decode_tok_s", "dense_decode_tok_s", "note"]
        elif part == "vllm":
            cols = [
                "context", "method", "budget", "needle_acc", "needle_lo", "needle_hi", "needle_n", "dense_needle_acc",
                "needle_logprob", "dense_needle_logprob", "ppl_ratio", "ppl_n", "reuse_rate", "note",
            ]  # fmt: skip
        else:
            cols = [
                "context", "method", "budget", "needle_acc", "needle_lo", "needle_hi", "needle_n", "dense_needle_acc",
                "needle_logprob", "dense_needle_logprob", "ppl_ratio", "ppl_n", "note",
            ]  # fmt: skip
        lines += _table(mine, cols) + [""]
    MD_PATH.write_text("\n".join(lines))
