"""``kvplug semantic-cache``: ``serve`` runs the proxy, ``policy`` validates and prints a policy.

Imports stay light (no aiohttp, torch or sentence-transformers) until a command runs, so ``kvplug --help`` is fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from kvplug.errors import ConfigError

app = typer.Typer(
    help="Category-aware semantic cache: an OpenAI-compatible proxy in front of vLLM, Redis-backed.",
    no_args_is_help=True,
)


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


@app.command()
def serve(
    upstream: Annotated[
        str | None, typer.Option(help="OpenAI-compatible upstream (default: http://127.0.0.1:8000)")
    ] = None,
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL (default: redis://127.0.0.1:6379/0)")] = None,
    policy: Annotated[Path | None, typer.Option(help="Policy YAML (default: the built-in policy)")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default: 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default: 8100)")] = None,
    key_prefix: Annotated[str | None, typer.Option(help="Redis key prefix (default: kvplug:sc:)")] = None,
    embedder: Annotated[str | None, typer.Option(help="minilm (default), hash, st:DIR or MODULE:FACTORY")] = None,
    tenant_header: Annotated[str | None, typer.Option(help="Tenant header (default: x-kvplug-tenant)")] = None,
    max_temperature: Annotated[
        float | None, typer.Option(help="Cache requests up to this temperature (default: 0)")
    ] = None,
    default_temperature: Annotated[
        float | None, typer.Option(help="Temperature assumed when a request has none (default: 1.0)")
    ] = None,
    speculative: Annotated[
        str | None, typer.Option(help="Race the lookup with the upstream: auto (default: while unloaded), on, off")
    ] = None,
    redis_timeout: Annotated[float | None, typer.Option(help="Seconds per Redis operation (default: 0.25)")] = None,
    sweep_interval: Annotated[
        float | None, typer.Option(help="Index/Redis reconcile period in s (default: 30)")
    ] = None,
    embed_threads: Annotated[
        int | None, typer.Option(help="Torch threads of the embedder (default: 1; 0: torch's)")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="One similarity threshold for every category (default: the policy's)")
    ] = None,
    max_request_bytes: Annotated[
        int | None, typer.Option(help="Larger request bodies get 413 (default: 32 MiB)")
    ] = None,
    max_query_chars: Annotated[
        int | None, typer.Option(help="Longer questions are forwarded, never cached (default: 4096)")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run the proxy. Settings: flags > KVPLUG_SEMANTIC_* environment > defaults."""
    from kvplug.semantic.config import SemanticCacheConfig

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {
        "upstream": upstream,
        "redis_url": redis,
        "policy": str(policy) if policy else None,
        "host": host,
        "port": port,
        "key_prefix": key_prefix,
        "embedder": embedder,
        "tenant_header": tenant_header,
        "max_temperature": max_temperature,
        "default_temperature": default_temperature,
        "speculative": speculative,
        "redis_timeout_s": redis_timeout,
        "sweep_interval_s": sweep_interval,
        "embed_threads": embed_threads,
        "threshold": threshold,
        "max_request_bytes": max_request_bytes,
        "max_query_chars": max_query_chars,
    }
    try:
        cfg = SemanticCacheConfig.load(overrides)
        from kvplug.semantic.policy import load_policy

        load_policy(cfg.policy)  # fail before loading the model or opening sockets
    except ConfigError as e:
        raise _fail(e) from None
    try:
        from kvplug.semantic.proxy import serve as run
    except ImportError as e:
        raise _fail(RuntimeError(f"{e}: pip install 'kvplug[semantic]'")) from None
    try:
        run(cfg)
    except ConfigError as e:
        raise _fail(e) from None


@app.command("policy")
def show_policy(
    path: Annotated[Path | None, typer.Argument(help="Policy YAML to check (default: the built-in policy)")] = None,
) -> None:
    """Validate a policy and print it as YAML (without a path: the built-in policy, a starting point)."""
    from kvplug.semantic.policy import DEFAULT_POLICY, load_policy, policy_yaml

    try:
        pol = load_policy(path)
    except ConfigError as e:
        raise _fail(e) from None
    if path is None:
        typer.echo(policy_yaml(DEFAULT_POLICY), nl=False)
        return
    n = len(pol.categories)
    typer.echo(f"# {pol.source}: OK, {n} {'category' if n == 1 else 'categories'}, default {pol.default_category!r}")
    typer.echo(Path(path).read_text(), nl=False)
