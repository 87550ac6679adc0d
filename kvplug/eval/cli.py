"""``kvplug eval run`` (resumable, with a progress bar) and ``kvplug eval report`` (tables + plot with CIs)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kvplug.eval.harness import DEFAULT_METHODS, RATIOS, Results, RunConfig, Suite, build_samples, plan

app = typer.Typer(help="Evaluate KV methods on real models (needle, multi-key, multi-value, QA, perplexity).")
console = Console()


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


@app.command("run")
def run(
    model: Annotated[str, typer.Option(help="smollm2 or gemma3")] = "smollm2",
    suite: Annotated[str, typer.Option(help="full or smoke")] = "full",
    methods: Annotated[str, typer.Option(help="comma-separated specs, e.g. snapkv,kivi?bits=2,snapkv+kivi")] = ",".join(
        DEFAULT_METHODS
    ),
    ratios: Annotated[str, typer.Option(help="compression ratios (fraction removed)")] = ",".join(map(str, RATIOS)),
    tasks: Annotated[str, typer.Option(help="needle,multikey,multivalue,qa,ppl")] = "needle,multikey,multivalue,qa,ppl",
    lengths: Annotated[str, typer.Option(help="context lengths in tokens (full suite)")] = "1024,2048,4096",
    samples: Annotated[int, typer.Option(help="samples per (task, length) (full suite)")] = 100,
    ppl_samples: Annotated[int, typer.Option(help="ppl windows per length (full suite)")] = 25,
    results: Annotated[Path, typer.Option(help="JSONL file; rows already there are skipped (resume)")] = Path(
        "bench-results/methods.jsonl"
    ),
    query_aware: Annotated[
        bool, typer.Option("--query-aware/--query-agnostic", help="compress the question with the context or not")
    ] = True,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default)")] = 0,
) -> None:
    """Run the harness; rows are appended to ``--results`` as they finish (rerun the same command to resume)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvplug import methods as registry
    from kvplug.eval.harness import evaluate, parse_method
    from kvplug.models import model_dir

    specs = _split(methods)
    ratio_list = [float(r) for r in _split(ratios)]
    for spec in specs:  # fail before loading the model on a typo
        parse_method(spec, ratio_list[0] if ratio_list else 0.5)
    if suite not in ("smoke", "full"):
        raise typer.BadParameter(f"suite must be full or smoke, got {suite!r}")
    if samples < 1:
        raise typer.BadParameter(f"samples must be >= 1, got {samples}")
    lens = tuple(int(x) for x in _split(lengths))
    base = Suite.smoke() if suite == "smoke" else Suite(lengths=lens, samples=samples, ppl_samples=ppl_samples)
    chosen = replace(base, tasks=tuple(_split(tasks)), question_in_context=query_aware)
    cfg = RunConfig(model, specs, ratio_list, chosen)
    if threads:
        torch.set_num_threads(threads)
    path = model_dir(model)
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    total = len(build_samples(tok, cfg.suite)) * len(plan(specs, ratio_list))
    res = Results(results)
    console.print(f"{model}: {len(registry.available())} methods registered; {total} rows, {len(res.rows)} on file")
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        t = bar.add_task(f"eval {model}", total=total)
        evaluate(lm, tok, cfg, res, progress=lambda n=1: bar.advance(t, n))
    console.print(f"results: {results}")


@app.command("report")
def report(
    model: Annotated[str, typer.Option()] = "smollm2",
    results: Annotated[Path, typer.Option()] = Path("bench-results/methods.jsonl"),
    out: Annotated[Path, typer.Option(help="directory for <stem>.md/.csv/.png")] = Path("docs/results"),
    ratios: Annotated[str, typer.Option()] = ",".join(map(str, RATIOS)),
    headline: Annotated[float, typer.Option(help="the ratio the ranking is made at")] = 0.5,
    stem: Annotated[str, typer.Option(help="file name stem (default methods-<model>)")] = "",
    command: Annotated[list[str] | None, typer.Option(help="a command that made the rows (repeatable)")] = None,
) -> None:
    """Write the Markdown/CSV tables (intervals, calibration, ranking) and the plot."""
    from kvplug.eval.report import write_report

    res = Results(results)
    path = write_report(res.rows, model, out, [float(r) for r in _split(ratios)], headline, stem or None, command or ())
    console.print(f"wrote {path}")
