"""The README demo: store a prompt's KV chunks, reopen the store, load them back, show the checks.

Until the vLLM integration lands this is the store round trip on SmolLM2-shaped KV: what a second engine
process would load instead of recomputing.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
from rich.console import Console
from rich.table import Table

from kvplug.bench.shapes import SHAPES, synthetic_kv
from kvplug.cache import KVCache
from kvplug.chunks import Namespace
from kvplug.connectors import open_store


def run_demo(url: str, codec: str = "int8", num_tokens: int = 1024, console: Console | None = None) -> bool:
    console = console or Console()
    layers, heads, dim = SHAPES["smollm2-135m"]
    ns = Namespace(
        model="kvplug-demo/SmolLM2-135M-shaped",
        dtype="bfloat16",
        num_layers=layers,
        num_kv_heads=heads,
        head_dim=dim,
        codec=codec,
    )
    tokens = np.random.default_rng(0).integers(0, 49152, num_tokens)
    kv = synthetic_kv("smollm2-135m", num_tokens)
    checks: list[tuple[str, str, bool]] = []

    with open_store(url) as store:
        cache = KVCache(store, ns)
        store.delete([c.prefix_key for c in cache.chunks(tokens)])  # start cold, so the demo shows a store
        cold = cache.lookup(tokens)
        t0 = time.perf_counter()
        n_put = cache.put(tokens, kv)
        put_s = time.perf_counter() - t0
    checks.append(("cold lookup before storing", f"{cold} tokens", cold == 0))
    checks.append((f"stored chunks ({codec})", f"{n_put} chunks in {put_s * 1e3:.1f} ms", n_put > 0))

    with open_store(url) as store:  # a new store object: what a restarted engine would open
        cache = KVCache(store, ns)
        hit = cache.lookup(tokens)
        t0 = time.perf_counter()
        got, loaded = cache.prefix(tokens)
        load_s = time.perf_counter() - t0
        err = float((loaded.float() - kv[:, :, :got].float()).abs().max()) if loaded is not None else float("inf")
        checks.append(("prefix hit after reopening", f"{hit} of {num_tokens} tokens", hit == got > 0))
        checks.append(
            (
                "loaded KV",
                f"{got} tokens in {load_s * 1e3:.1f} ms, max abs error {err:.4f}",
                loaded is not None and err < 0.1 * float(kv.float().abs().max()),
            )
        )

        other = KVCache(store, replace(ns, tenant_salt="another-tenant"))
        checks.append(("another tenant's lookup", f"{other.lookup(tokens)} tokens", other.lookup(tokens) == 0))

        first = cache.chunks(tokens)[0].prefix_key
        payload = bytearray(store.get(first) or b"")
        if payload:
            payload[len(payload) // 2] ^= 0xFF
            store.put(first, bytes(payload))
        got2, _ = cache.prefix(tokens)
        checks.append(
            (
                "corrupted first chunk",
                f"refused ({cache.payload_errors}); prefix now {got2} tokens",
                got2 == 0 and cache.payload_errors.get("checksum", 0) == 1,
            )
        )
        cache.put(tokens, kv)  # repair

    t = Table(title=f"kvplug demo: {num_tokens}-token prompt, SmolLM2-shaped KV, store {url}")
    t.add_column("step")
    t.add_column("result")
    t.add_column("ok")
    for name, result, ok in checks:
        t.add_row(name, result, "[green]yes" if ok else "[red]NO")
    console.print(t)
    return all(ok for _, _, ok in checks)


def run_vllm_demo(url: str, num_tokens: int = 2048, console: Console | None = None) -> bool:
    """Two vLLM engines (new processes) on SmolLM2: the first computes and stores a prompt's KV, the second loads
    it. Shows the TTFT of each, the tokens vLLM reports as cached, and that the answers are identical."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    from kvplug.integrations.vllm.runner import run_in_new_process
    from kvplug.models import smollm2_dir

    console = console or Console()
    model = str(smollm2_dir())
    ids = AutoTokenizer.from_pretrained(model)("\n\n".join(topics[k] for k in sorted(topics))).input_ids[:num_tokens]
    if url.startswith("memory://"):
        raise ValueError("the vLLM demo runs engines in new processes: use a file:// or redis:// store")
    spec = {
        "model": model,
        "dtype": "bfloat16",
        "max_tokens": 16,
        "max_model_len": 8192,
        "max_num_batched_tokens": 8192,
        "prompts": [ids],
        "extra": {"store": url, "model_id": "kvplug-demo/SmolLM2-135M-Instruct", "tenant_salt": f"demo-{time.time()}"},
    }

    def engine(label: str) -> dict:
        with console.status(f"{label}: starting a vLLM engine (new process)"):
            return run_in_new_process(spec)["outputs"][0]

    cold, warm = engine("run 1 (computes and stores)"), engine("run 2 (loads)")
    t = Table(title=f"kvplug + vLLM {num_tokens}-token prompt, SmolLM2-135M (bf16, CPU), store {url}")
    for col in ("run", "cached tokens (vLLM)", "time to first 16 tokens", "output"):
        t.add_column(col)
    for name, o in (("1: new engine, cold store", cold), ("2: new engine, warm store", warm)):
        t.add_row(name, str(o["num_cached_tokens"]), f"{o['seconds']:.2f} s", str(o["token_ids"][:8]) + " ...")
    console.print(t)
    same = cold["token_ids"] == warm["token_ids"]
    hit = warm["num_cached_tokens"] > 0
    console.print(
        f"speed-up {cold['seconds'] / warm['seconds']:.1f}x; identical output: {'yes' if same else 'NO'}; "
        f"hit: {'yes' if hit else 'NO'}"
    )
    return same and hit
