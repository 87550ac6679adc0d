"""Results tables (CSV + Markdown) and plots with 95% intervals from the harness's JSONL rows."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvplug.eval.stats import wilson
from kvplug.eval.summary import PASS, RANKED_TASKS, Cell, aggregate, calibration, ranking, rows_of

CSV_COLUMNS = [
    "model", "method", "ratio", "task", "context", "n", "accuracy", "ci_low", "ci_high", "logprob", "logprob_ci",
    "kv_kept", "logprob_ci_low", "logprob_ci_high", "token_accuracy", "token_ci_low", "token_ci_high", "ppl",
    "prefill_overhead", "full_passes",
]  # fmt: skip


def _f(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def write_csv(cells: Sequence[Cell], path: Path) -> None:
    """One row per (method, ratio, task, context) with the columns of :data:`CSV_COLUMNS`."""
    passes = calibration(cells)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for c in cells:
            ok = passes.get((c.task, c.context))
            w.writerow(
                [
                    c.model, c.method, "" if c.ratio is None else c.ratio, c.task, c.context, c.n,
                    _f(c.accuracy, 2), _f(c.ci_low, 2), _f(c.ci_high, 2), _f(c.logprob), _f(c.logprob_ci),
                    _f(c.kv_kept), _f(c.logprob_ci_low), _f(c.logprob_ci_high), _f(c.token_accuracy, 2),
                    _f(c.token_ci_low, 2), _f(c.token_ci_high, 2), _f(c.ppl, 3), _f(c.prefill_overhead, 3),
                    "" if ok is None else int(ok),
                ]
            )  # fmt: skip


def _label(method: str, ratio: float | None) -> str:
    return method if ratio is not None or method == "full" else f"{method} (own setting)"


def _acc(c: Cell) -> str:
    return f"{c.accuracy:.0f} [{c.ci_low:.0f}, {c.ci_high:.0f}]"


def calibration_table(cells: Sequence[Cell]) -> str:
    full = {(c.task, c.context): c for c in cells if c.method == "full"}
    lengths = sorted({k[1] for k in full})
    tasks = [t for t in (*RANKED_TASKS, "ppl") if any(k[0] == t for k in full)]
    lines = ["| task | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for t in tasks:
        row = [t]
        for n in lengths:
            c = full.get((t, n))
            if c is None:
                row.append("-")
            elif t == "ppl":
                row.append(f"ppl {c.ppl:.2f}, next-token {c.accuracy:.1f}% (n={c.n})")
            else:
                verdict = "passes" if c.accuracy >= 100 * PASS else "**fails: not ranked**"
                row.append(f"{_acc(c)} (n={c.n}, token {c.token_accuracy:.1f}%) {verdict}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def ranking_table(rows: Sequence[dict[str, Any]], ratio: float, model: str) -> str:
    ranks = ranking(rows, ratio, model)
    full = next((r for r in ranks if r.method == "full"), None)
    lines = [
        "| tier | method | exact % [95% CI] | n | vs full | answer log-prob [95% CI] | KV kept | prefill time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ranks:
        vs = "" if full is None or r is full else ("below" if r.below_full else "=")
        lines.append(
            f"| {r.tier} | {_label(r.method, r.ratio)} | {r.accuracy:.1f} [{r.ci_low:.1f}, {r.ci_high:.1f}] | {r.n} "
            f"| {vs} | {r.logprob:.3f} [{r.logprob_ci_low:.3f}, {r.logprob_ci_high:.3f}] | {r.kv_kept:.3f} "
            f"| {r.prefill_overhead:.2f}x |"
        )
    return "\n".join(lines)


def ratio_table(cells: Sequence[Cell], ratio: float | None, length: int) -> str:
    """Methods at ``ratio`` (ratio-free ones included) for one context length: exact % [CI] per task."""
    passes = calibration(cells)
    sel = [c for c in cells if c.context == length and (c.ratio is None or c.ratio == ratio)]
    tasks = [t for t in (*RANKED_TASKS, "ppl") if any(c.task == t for c in sel)]
    by: dict[tuple[str, float | None], dict[str, Cell]] = {}
    for c in sel:
        by.setdefault((c.method, c.ratio), {})[c.task] = c
    head = ["method"]
    for t in tasks:
        ok = passes.get((t, length), True)
        head.append("ppl" if t == "ppl" else (f"{t} %" if ok else f"{t} % (full fails)"))
    head += ["KV kept", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def mean_acc(k: tuple[str, float | None]) -> float:
        vals = [by[k][t].accuracy for t in tasks if t != "ppl" and t in by[k]]
        return sum(vals) / len(vals) if vals else 0.0

    for k in sorted(by, key=lambda k: (k[0] != "full", -mean_acc(k), k[0])):
        row = [_label(*k)]
        for t in tasks:
            c = by[k].get(t)
            row.append("-" if c is None else (f"{c.ppl:.2f}" if t == "ppl" else _acc(c)))
        cs = list(by[k].values())
        row += [f"{sum(c.kv_kept for c in cs) / len(cs):.3f}", str(min(c.n for c in cs))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], cells: Sequence[Cell], path: Path, title: str, ratio: float) -> None:
    """Exact match vs compression ratio per task (pooled over the lengths the full cache passes, Wilson 95%
    error bars; ratio-free methods as stars at their KV fraction), and the ranking at ``ratio`` with its CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = calibration(cells)
    tasks = [t for t in RANKED_TASKS if any(c.task == t for c in cells)]
    names = sorted({c.method for c in cells if c.method != "full"})
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(names)}
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.6 * (len(tasks) + 1), 5.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        pooled: dict[tuple[str, float | None], list[int]] = {}
        for r in rows:
            if r["task"] == task and passes.get((task, r["length"]), False):
                pooled.setdefault((r["method"], r["ratio"]), []).append(bool(r["exact"]))
        if not pooled:
            ax.set_title(f"{task}: full cache fails at every length")
            ax.axis("off")
            continue

        def stat(v: list[int]) -> tuple[float, float, float]:
            lo, hi = wilson(sum(v), len(v))
            p = sum(v) / len(v)
            return 100 * p, 100 * (p - lo), 100 * (hi - p)

        for m in names:
            pts = sorted((rt, stat(v)) for (mm, rt), v in pooled.items() if mm == m and rt is not None)
            if pts:
                x = [p[0] for p in pts]
                y, lo, hi = zip(*(p[1] for p in pts), strict=True)
                ax.errorbar(x, y, yerr=[lo, hi], marker="o", ms=3, lw=1, capsize=2, color=colors[m], label=m)
            free = pooled.get((m, None))
            if free is not None:
                kv = [c.kv_kept for c in cells if c.method == m and c.task == task]
                y, lo, hi = stat(free)
                x = 1 - sum(kv) / len(kv)
                ax.errorbar([x], [y], yerr=[[lo], [hi]], marker="*", ms=9, capsize=2, color=colors[m], label=m)
        if ("full", None) in pooled:
            ax.axhline(stat(pooled[("full", None)])[0], color="k", ls="--", lw=1, label="full KV")
        ax.set_title(f"{task} (passing lengths pooled)")
        ax.set_xlabel("compression ratio (stars: fraction of KV bytes removed)")
        ax.set_ylabel("exact match % (95% Wilson)")
        ax.set_ylim(-3, 103)
    ax = axes[0][-1]
    ranks = ranking(rows, ratio)
    ys = range(len(ranks))[::-1]
    for y, r in zip(ys, ranks, strict=True):
        col = "k" if r.method == "full" else colors.get(r.method, "grey")
        ax.errorbar([r.accuracy], [y], xerr=[[r.accuracy - r.ci_low], [r.ci_high - r.accuracy]], fmt="o", color=col)
    ax.set_yticks(list(ys), [_label(r.method, r.ratio) for r in ranks], fontsize=7)
    ax.set_xlabel(f"exact match % at {ratio:g}, passing cells pooled (95% CI)")
    ax.set_title(f"ranking at compression {ratio:g}")
    handles, labels = [], []
    for a in axes[0][: len(tasks)]:
        for h, lab in zip(*a.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.12, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(
    rows: Sequence[dict[str, Any]],
    model: str,
    out_dir: Path,
    ratios: Sequence[float],
    headline: float = 0.5,
    stem: str | None = None,
    commands: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> Path:
    """``<stem>.md`` (calibration, ranking at ``headline``, a table per ratio and length), ``.csv`` (every cell)
    and ``.png`` under ``out_dir``; ``stem`` defaults to ``methods-<model>``."""
    rows = rows_of(rows, model)
    cells = aggregate(rows, model)
    if not cells:
        raise ValueError(f"no results for model {model!r}")
    stem = stem or f"methods-{model}"
    write_csv(cells, out_dir / f"{stem}.csv")
    plot(rows, cells, out_dir / f"{stem}.png", f"{model}: exact match vs KV compression", headline)
    lengths = sorted({c.context for c in cells})
    hours = sum(r.get("compress_s", 0) + r.get("score_s", 0) for r in rows) / 3600
    prefills = {(r["task"], r["sid"]): r["prefill_s"] for r in rows}
    hours += sum(prefills.values()) / 3600
    parts = [
        f"# Methods on {model}",
        "",
        "Generated by `kvplug eval report` from the rows of `kvplug eval run` (docs/methods.md explains the harness)."
        " Exact match over the answer's content tokens (every digit or letter token the greedy choice, the leading "
        "space teacher-forced), Wilson 95% intervals; answer log-prob with a bootstrap 95% interval; KV kept = "
        "stored bytes after the method / full bf16 KV bytes; prefill time = (prefill + compression) / prefill, "
        "same sample, same run. Methods marked (own setting) have no compression ratio and appear in every table. "
        f"Compute time of these rows: {hours:.1f} h on 2 shared CPU cores.",
        "",
    ]
    parts += [f"    {c}" for c in commands]
    parts += ["", *notes, ""] if notes else [""]
    parts += [
        "## Calibration: the full cache",
        "",
        f"A (task, length) cell is ranked only when the full cache's exact match is at least {100 * PASS:.0f}%.",
        "",
        calibration_table(cells),
        "",
        f"## Ranking at compression ratio {headline:g}",
        "",
        "All samples of the passing cells pooled. `vs full`: `below` when the interval lies entirely below the full "
        "cache's, `=` when they overlap. Methods in one tier have overlapping intervals with the tier's best: "
        "differences inside a tier are not called.",
        "",
        ranking_table(rows, headline, model),
        "",
        f"![exact match vs compression]({stem}.png)",
        "",
    ]
    for r in [headline, *[x for x in ratios if x != headline]]:
        if not any(c.ratio == r for c in cells):
            continue
        for n in lengths:
            if not any(c.ratio == r and c.context == n for c in cells):
                continue
            parts += [f"## Ratio {r:g}, {n} tokens", "", ratio_table(cells, r, n), ""]
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(parts))
    return path
