"""Results table (CSV + Markdown) and quality-versus-compression plots from the harness's JSONL rows."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvplug.eval.harness import Cell, aggregate, cells_to_dicts

SCORE_TASKS = ("needle", "multikey", "multivalue", "qa")


def _label(c: Cell) -> str:
    return c.method if c.ratio is None else f"{c.method} @{c.ratio:g}"


def write_csv(cells: Sequence[Cell], path: Path) -> None:
    rows = cells_to_dicts(cells)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def pivot(cells: Sequence[Cell], ratio: float | None) -> list[dict[str, Any]]:
    """One row per method at ``ratio`` (quantizers, which have no ratio, are included in every pivot)."""
    by: dict[str, dict[str, Any]] = {}
    for c in cells:
        if c.method != "full" and c.ratio is not None and c.ratio != ratio:
            continue
        row = by.setdefault(
            c.method,
            {"method": c.method, "ratio": c.ratio, "kv": [], "overhead": []},
        )
        row[c.task] = c.accuracy
        row[c.task + "_lp"] = c.logprob
        row["kv"].append(c.kv_fraction)
        row["overhead"].append(c.prefill_overhead)
    out = []
    for row in by.values():
        row["kv"] = sum(row["kv"]) / len(row["kv"])
        row["overhead"] = sum(row["overhead"]) / len(row["overhead"])
        out.append(row)
    return sorted(out, key=lambda r: (r["method"] != "full", -_mean_score(r), r["method"]))


def _mean_score(row: dict[str, Any]) -> float:
    vals = [row[t] for t in SCORE_TASKS if t in row]
    return sum(vals) / len(vals) if vals else 0.0


def markdown_table(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    score = [t for t in SCORE_TASKS if t in tasks]
    head = ["method", *[f"{t} % (logprob)" for t in score], *(["ppl"] if "ppl" in tasks else [])]
    head += ["KV kept", "prefill time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"] + ("" if r["ratio"] is not None or r["method"] == "full" else " (own setting)")]
        cells += [f"{r[t]:.0f} ({r[t + '_lp']:.2f})" if t in r else "-" for t in score]
        if "ppl" in tasks:
            cells.append(f"{r['ppl']:.3f}" if "ppl" in r else "-")
        cells += [f"{r['kv']:.3f}", f"{r['overhead']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(cells: Sequence[Cell], path: Path, title: str) -> None:
    """Quality vs compression ratio, one panel per task, one line per evictor (mean answer log-prob, which is
    continuous; perplexity for ppl); ratio-free methods as stars at their measured KV fraction; full KV dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({c.task for c in cells}, key=lambda t: (t == "ppl", t))
    cols = 3
    rows = (len(tasks) + 1 + cols - 1) // cols  # one spare panel for the legend
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.9 * rows), squeeze=False)
    flat = list(axes.flat)
    names = sorted({c.method for c in cells if c.method != "full"})
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(names)}

    def y(c: Cell) -> float:
        return c.accuracy if c.task == "ppl" else c.logprob

    for ax, task in zip(flat, tasks, strict=False):
        tc = [c for c in cells if c.task == task]
        full = next((y(c) for c in tc if c.method == "full"), None)
        for m in names:
            pts = sorted((c.ratio, y(c)) for c in tc if c.method == m and c.ratio is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1.2, color=colors[m], label=m)
        for c in tc:
            if c.ratio is None and c.method != "full":
                ax.scatter([1 - c.kv_fraction], [y(c)], marker="*", s=80, color=colors[c.method], label=c.method)
        if full is not None:
            ax.axhline(full, color="k", ls="--", lw=1, label="full KV")
        ax.set_title(task)
        ax.set_xlabel("fraction of KV bytes removed")
        if task == "ppl":
            ax.set_ylabel("perplexity (lower is better)")
            if full is not None:
                ax.set_ylim(full * 0.97, full * 1.6)
        else:
            ax.set_ylabel("answer log-prob (higher is better)")
    handles, labels = [], []
    for ax in flat[: len(tasks)]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    for ax in flat[len(tasks) :]:
        ax.axis("off")
    flat[len(tasks)].legend(handles, labels, loc="center", fontsize=8, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(rows: Sequence[dict[str, Any]], model: str, out_dir: Path, ratios: Sequence[float]) -> Path:
    """``methods-<model>.md`` (tables per ratio), ``.csv`` (every cell) and ``.png`` (plot) under ``out_dir``."""
    cells = aggregate(rows, model)
    if not cells:
        raise ValueError(f"no results for model {model!r}")
    tasks = sorted({c.task for c in cells})
    stem = f"methods-{model}"
    write_csv(cells, out_dir / f"{stem}.csv")
    plot(cells, out_dir / f"{stem}.png", f"{model}: quality vs KV compression")
    n = {c.task: c.n for c in cells if c.method == "full"}
    parts = [
        f"# Methods on {model}",
        "",
        "Generated by `kvplug eval run` / `kvplug eval report` (docs/methods.md explains the harness). Samples per "
        f"task: {', '.join(f'{t} {k}' for t, k in sorted(n.items()))}. Scores are exact match in percent "
        "(teacher-forced greedy) with the mean answer log-prob in brackets (continuous, less noisy with few "
        "samples), perplexity for ppl; KV kept = stored bytes after the method / full bf16 KV bytes; prefill time "
        "= (prefill + compression) / prefill, same sample, same run. Methods marked (own setting) have no "
        "compression ratio and appear in every table at their defaults.",
        "",
        f"![quality vs compression]({stem}.png)",
        "",
    ]
    for r in ratios:
        parts += [f"## Compression ratio {r:g}", "", markdown_table(pivot(cells, r), tasks), ""]
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(parts))
    return path
