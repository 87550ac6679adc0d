"""Helpers for the end-to-end tests: each engine runs in a new process (kvplug.integrations.vllm.runner)."""

from __future__ import annotations

import json
from typing import Any

from kvplug.integrations.vllm.runner import run_in_new_process


def engine(spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    try:
        return run_in_new_process(spec, timeout=timeout)
    except RuntimeError as e:
        raise AssertionError(str(e)) from None


def metric(report: dict[str, Any], name: str, **labels: str) -> float:
    return report["metrics"].get(name + json.dumps(labels, sort_keys=True), 0.0)


def tokens(report: dict[str, Any]) -> list[list[int]]:
    return [o["token_ids"] for o in report["outputs"]]


def cached(report: dict[str, Any]) -> list[int]:
    return [o["num_cached_tokens"] for o in report["outputs"]]
