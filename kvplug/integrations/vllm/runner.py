"""Run one vLLM engine (CPU, one process) over token prompts and print a JSON report: used by the tests and the
benchmark so each run is a new engine in a new process.

    python -m kvplug.integrations.vllm.runner '{"model": "...", "prompts": [[1, 2, 3]], "extra": {...}}'
    python -m kvplug.integrations.vllm.runner - < spec.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

REPORT_PREFIX = "KVPLUG-REPORT "
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def run_in_new_process(
    spec: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 1200
) -> dict[str, Any]:
    """Run one engine per ``spec`` in a new Python process; returns its report (raises with its stderr on failure)."""
    full_env = {**os.environ, **ENGINE_ENV, **(env or {})}
    r = subprocess.run(
        [sys.executable, "-m", "kvplug.integrations.vllm.runner", "-"],  # the spec on stdin (argv is too small)
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    for line in r.stdout.splitlines():
        if line.startswith(REPORT_PREFIX):
            return json.loads(line[len(REPORT_PREFIX) :])
    raise RuntimeError(f"engine run failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}")


def run(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ.update(spec.get("env", {}))
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    from prometheus_client import REGISTRY
    from vllm import LLM, SamplingParams

    for target in spec.get("faults", []):
        inject_fault(target)

    kv_cfg = None
    if spec.get("connector", True):
        kv_cfg = {
            "kv_connector": "KVPlugConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": spec.get("extra", {}),
        }
        if spec.get("module_path"):
            kv_cfg["kv_connector_module_path"] = "kvplug.integrations.vllm.connector"
    llm = LLM(
        spec["model"],
        dtype=spec.get("dtype", "float32"),
        max_model_len=spec.get("max_model_len", 4096),
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 4096),
        block_size=32,
        enforce_eager=True,
        enable_prefix_caching=spec.get("prefix_caching", False),
        kv_transfer_config=kv_cfg,
        seed=0,
        num_gpu_blocks_override=spec.get("num_blocks"),
        additional_config=spec.get("additional_config") or {},  # e.g. {"kvplug_sparse": {...}}
        **_engine_options(spec),
    )
    for prompt in spec.get("warm_prompts", []):  # run (and saved) one at a time before the measured prompts
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
        _flush(llm)
    outs = []
    params = spec.get("params") or [None] * len(spec["prompts"])
    max_tokens = spec.get("max_tokens", 8)  # one number, or one per prompt
    if not isinstance(max_tokens, list):
        max_tokens = [max_tokens] * len(spec["prompts"])
    sps = [
        SamplingParams(
            max_tokens=m,
            temperature=0,
            ignore_eos=spec.get("ignore_eos", False),
            extra_args={"kv_transfer_params": p} if p else None,
        )
        for p, m in zip(params, max_tokens, strict=True)
    ]
    if spec.get("trace_batch"):  # all prompts at once, stepping the engine: running requests and blocks per step
        report_trace: list[dict[str, Any]] = []
        outs = _traced_batch(llm, spec["prompts"], sps, report_trace)
    elif spec.get("trace_blocks"):  # one prompt at a time, stepping the engine: vLLM's free-block count per step
        outs = [_traced(llm, i, prompt, sp) for i, (prompt, sp) in enumerate(zip(spec["prompts"], sps, strict=True))]
    elif spec.get("batch"):  # all prompts in one generate call: scheduled together (and preempted, if blocks run out)
        t0 = time.perf_counter()
        results = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], sps, use_tqdm=False)
        outs = [_out(o, time.perf_counter() - t0) for o in results]
        _flush(llm)
    else:
        for prompt, sp in zip(spec["prompts"], sps, strict=True):
            t0 = time.perf_counter()
            o = llm.generate({"prompt_token_ids": prompt}, sp, use_tqdm=False)[0]
            outs.append(_out(o, time.perf_counter() - t0))
            _flush(llm)  # this prompt's saves land before the next prompt looks up
    metrics = {}
    for fam in REGISTRY.collect():
        if fam.name.startswith(
            ("kvplug_connector", "kvplug_payload", "kvplug_store", "kvplug_blend", *spec.get("metric_prefixes", ()))
        ):
            for s in fam.samples:
                if s.name.endswith(("_total", "_count", "_sum")):
                    metrics[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
    report: dict[str, Any] = {"outputs": outs, "metrics": metrics}
    if spec.get("trace_batch"):
        report["trace"] = report_trace
    stats = _scheduler_stats(llm)
    if stats is not None:
        report["scheduler"] = stats
    return report


def _engine_options(spec: dict[str, Any]) -> dict[str, Any]:
    """Optional LLM(...) arguments: ``scheduler_cls`` (e.g. kvplug's cache-aware scheduler), ``max_num_seqs``, and
    ``log_stats`` (per-request first-scheduled time and preemptions in the report)."""
    opts: dict[str, Any] = {}
    if spec.get("scheduler_cls"):
        opts["scheduler_cls"] = spec["scheduler_cls"]
    if spec.get("max_num_seqs"):
        opts["max_num_seqs"] = spec["max_num_seqs"]
    if spec.get("log_stats"):
        opts["disable_log_stats"] = False
    return opts


def _scheduler_stats(llm: Any) -> dict[str, Any] | None:
    """The in-process engine's kvplug scheduler statistics (``kvplug_stats``), or None for vLLM's own scheduler."""
    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    stats = getattr(getattr(core, "scheduler", None), "kvplug_stats", None)
    if stats is None:
        return None
    return {
        "class": type(core.scheduler).__name__,
        "admitted": stats.admitted,
        "ahead": stats.ahead,
        "late": stats.late,
        "max_wait_s": stats.max_wait_s,
        "order": list(stats.order),
    }


def inject_fault(target: str) -> None:
    """Fault injection for the robustness tests: make ``"module:Class.method"`` raise ``RuntimeError`` in this
    engine process (a stand-in for a bug or an unexpected library error at that point)."""
    import importlib

    module, _, attr = target.partition(":")
    cls_name, _, meth = attr.partition(".")
    cls = getattr(importlib.import_module(module), cls_name)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"injected fault in {target}")

    setattr(cls, meth, boom)


def _out(o: Any, seconds: float) -> dict[str, Any]:
    out = {"token_ids": list(o.outputs[0].token_ids), "num_cached_tokens": o.num_cached_tokens, "seconds": seconds}
    stats = getattr(o, "metrics", None)  # with log_stats: vLLM's RequestStateStats (engine-core clock)
    if stats is not None and hasattr(stats, "scheduled_ts"):
        out["request_id"] = o.request_id
        out["scheduled_ts"] = stats.scheduled_ts
        out["num_preemptions"] = stats.num_preemptions
    return out


def _traced(llm: Any, i: int, prompt: list[int], sp: Any) -> dict[str, Any]:
    """Run one prompt by stepping the in-process engine; the output carries ``blocks_used``, the blocks the
    engine's pool had handed out after each step (vLLM's own free-block counter)."""
    from kvplug.integrations.vllm._compat import kv_block_pool

    pool = kv_block_pool(llm)
    total = pool.num_gpu_blocks - 1  # the null block is never free
    eng, rid, used, out = llm.llm_engine, f"traced-{i}", [], None
    t0 = time.perf_counter()
    eng.add_request(rid, {"prompt_token_ids": prompt}, sp)
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out = o
        used.append(total - pool.get_num_free_blocks())
    return {**_out(out, time.perf_counter() - t0), "blocks_used": used}


def _traced_batch(llm: Any, prompts: list[list[int]], sps: list[Any], trace: list[dict[str, Any]]) -> list[dict]:
    """Add every prompt at once and step the in-process engine; ``trace`` gets, after each step, the number of
    running requests, the blocks the pool has handed out and the step's seconds and new output tokens."""
    from kvplug.integrations.vllm._compat import kv_block_pool, running_requests

    pool, eng = kv_block_pool(llm), llm.llm_engine
    total = pool.num_gpu_blocks - 1
    for i, (prompt, sp) in enumerate(zip(prompts, sps, strict=True)):
        eng.add_request(f"batch-{i}", {"prompt_token_ids": prompt}, sp)
    done: dict[str, Any] = {}
    seen: dict[str, int] = {}
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        new = 0
        for o in eng.step():
            n = len(o.outputs[0].token_ids)
            new += n - seen.get(o.request_id, 0)
            seen[o.request_id] = n
            if o.finished:
                done[o.request_id] = o
        trace.append(
            {"running": running_requests(llm), "used": total - pool.get_num_free_blocks(),
             "seconds": time.perf_counter() - t, "new_tokens": new}
        )  # fmt: skip
    return [_out(done[f"batch-{i}"], time.perf_counter() - t0) for i in range(len(prompts))]


def _flush(llm: Any) -> None:
    conn = _connector(llm)
    if conn is not None:
        conn.flush_saves()


def _connector(llm: Any) -> Any:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    return get_kv_transfer_group() if has_kv_transfer_group() else None


if __name__ == "__main__":
    report = run(json.loads(sys.stdin.read() if sys.argv[1] == "-" else sys.argv[1]))
    print(REPORT_PREFIX + json.dumps(report))
