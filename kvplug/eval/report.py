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
    head = ["method", *[f"{t} %" for t in score], "needle logprob", *(["ppl"] if "ppl" in tasks else [])]
    head += ["KV kept", "prefill time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"] + ("" if r["ratio"] is not None or r["method"] == "full" else " (own setting)")]
        cells += [f"{r[t]:.0f}" if t in r else "-" for t in score]
        cells.append(f"{r['needle_lp']:.3f}" if "needle_lp" in r else "-")
        if "ppl" in tasks:
            cells.append(f"{r['ppl']:.3f}" if "ppl" in r else "-")
        cells += [f"{r['kv']:.3f}", f"{r['overhead']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(cells: Sequence[Cell], path: Path, title: str) -> None:
    """Quality vs compression ratio, one panel per task, one line per evictor; quantizers as markers at their
    measured KV fraction; the full-KV score as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({c.task for c in cells}, key=lambda t: (t == "ppl", t))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        tc = [c for c in cells if c.task == task]
        full = next((c.accuracy for c in tc if c.method == "full"), None)
        for m in sorted({c.method for c in tc if c.ratio is not None}):
            pts = sorted((c.ratio, c.accuracy) for c in tc if c.method == m and c.ratio is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1.2, label=m)
        for c in tc:
            if c.ratio is None and c.method != "full":
                ax.scatter([1 - c.kv_fraction], [c.accuracy], marker="*", s=60, label=c.method, zorder=3)
        if full is not None:
            ax.axhline(full, color="k", ls="--", lw=1, label="full KV")
        ax.set_title(task)
        ax.set_xlabel("compression ratio (fraction of KV removed)")
        ax.set_ylabel("perplexity (lower is better)" if task == "ppl" else "exact match %")
        if task == "ppl" and full is not None:
            ax.set_ylim(full * 0.95, full * 2.5)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab, strict=True):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
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
        "(teacher-forced greedy), perplexity for ppl; KV kept = stored bytes after the method / full bf16 KV "
        "bytes; prefill time = (prefill + compression) / prefill, same sample, same run.",
        "",
        f"![quality vs compression]({stem}.png)",
        "",
    ]
    for r in ratios:
        parts += [f"## Compression ratio {r:g}", "", markdown_table(pivot(cells, r), tasks), ""]
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(parts))
    return path
