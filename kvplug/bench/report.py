"""Benchmark output: print a Markdown table and optionally write it for docs/results/."""

from __future__ import annotations

from pathlib import Path


def emit_table(lines: list[str], out: Path | None) -> None:
    table = "\n".join(lines)
    print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
