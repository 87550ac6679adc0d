"""Helpers for the end-to-end tests: each engine runs in a new process (kvplug.integrations.vllm.runner)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def engine(spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "kvplug.integrations.vllm.runner", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    for line in r.stdout.splitlines():
        if line.startswith("KVPLUG-REPORT "):
            return json.loads(line[len("KVPLUG-REPORT ") :])
    raise AssertionError(f"engine run failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}")


def metric(report: dict[str, Any], name: str, **labels: str) -> float:
    return report["metrics"].get(name + json.dumps(labels, sort_keys=True), 0.0)


def tokens(report: dict[str, Any]) -> list[list[int]]:
    return [o["token_ids"] for o in report["outputs"]]


def cached(report: dict[str, Any]) -> list[int]:
    return [o["num_cached_tokens"] for o in report["outputs"]]
