"""The cache-aware scheduler on the real vLLM CPU engine (each engine a new process): same outputs as FCFS, cached
requests admitted first (from vLLM's prefix cache, or from the kvplug connector's store alone), preemption, a bad
config failing at start, and the OpenAI server with ``--scheduler-cls``."""

from __future__ import annotations

import json
import urllib.request

import pytest

from kvplug.testing import free_port
from tests.vllm_helpers import engine, metric, openai_server, require_vllm, tokens

require_vllm()

pytestmark = pytest.mark.slow
CLASS_PATH = "kvplug.integrations.vllm.scheduler.CacheAwareScheduler"
PREFIX = 256  # one kvplug chunk, 8 vLLM blocks


@pytest.fixture(scope="module")
def smollm2() -> str:
    from kvplug.models import smollm2_dir

    return str(smollm2_dir())


@pytest.fixture(scope="module")
def workload(smollm2: str) -> dict:
    """Two cold prompts submitted first, then two that share a warm 256-token prefix; all 320 tokens (10 blocks)."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2)("\n\n".join(topics[k] for k in sorted(topics))).input_ids
    prefix = ids[:PREFIX]
    prompts = [ids[1000:1320], ids[2000:2320], prefix + ids[3000:3064], prefix + ids[4000:4064]]
    # every request in one generate call: all wait at the first step; 2 slots, so the order decides
    spec = {"model": smollm2, "prompts": prompts, "batch": True, "max_tokens": 40, "max_model_len": 512}
    return {"prefix": prefix, "spec": spec, "cached": [2, 3]}


@pytest.fixture(scope="module")
def fcfs(workload: dict) -> list[list[int]]:
    """vLLM as shipped: FCFS, no connector, no prefix cache."""
    return tokens(engine({**workload["spec"], "connector": False}))


def cache_aware(workload: dict, **spec) -> dict:
    return {
        **workload["spec"],
        "scheduler_cls": CLASS_PATH,
        "max_num_seqs": 2,
        "log_stats": True,
        "warm_prompts": [workload["prefix"]],
        "metric_prefixes": ["kvplug_scheduler"],
        **spec,
    }


def first_admitted(report: dict, k: int) -> set[int]:
    """Prompt indices of the first ``k`` requests admitted (the scheduler sees vLLM's internal ids: "<id>-<uuid8>")."""
    ids = [o["request_id"] for o in report["outputs"]]
    order = report["scheduler"]["order"][1:]  # [0]: the warm prompt, run through the same scheduler first
    return {ids.index(rid.rsplit("-", 1)[0]) for rid in order[:k]}


def test_prefix_cache_hits_go_first_outputs_equal_fcfs_through_preemption(workload, fcfs):
    """vLLM's prefix cache holds the warm prefix: the two cached requests (submitted last) are admitted first. 21
    blocks hold two 10-block prompts but not their growth to 12 blocks: the cold pair, admitted next, is preempted
    during decoding and resumed. Every output equals FCFS's."""
    r = engine(cache_aware(workload, connector=False, prefix_caching=True, num_blocks=21))
    assert tokens(r) == fcfs
    st = r["scheduler"]
    assert st["class"] == "CacheAwareScheduler"
    assert st["admitted"] == 5  # the warm prompt and the 4 prompts: a resumed request is not counted again
    assert first_admitted(r, 2) == set(workload["cached"])
    assert st["ahead"] == 2  # both went ahead of the cold requests still waiting
    assert [o["num_cached_tokens"] for o in r["outputs"]][2:] == [PREFIX, PREFIX]
    assert sum(o["num_preemptions"] for o in r["outputs"]) >= 1
    assert metric(r, "kvplug_scheduler_admissions_total", order="ahead") == 2
    assert metric(r, "kvplug_scheduler_admissions_total", order="in_order") == 3  # the warm prompt, the cold pair
    assert metric(r, "kvplug_scheduler_errors_total", kind="estimate") == 0


def test_connector_store_hits_go_first(workload, fcfs, tmp_path):
    """vLLM's prefix cache off: only the kvplug connector (file store, filled by the warm prompt) knows the prefix,
    and its estimate alone moves the cached requests ahead. Outputs equal FCFS's."""
    r = engine(cache_aware(workload, extra={"store": f"file://{tmp_path}/kv"}))
    assert tokens(r) == fcfs
    assert first_admitted(r, 2) == set(workload["cached"])
    assert r["scheduler"]["admitted"] == 5 and r["scheduler"]["ahead"] == 2
    assert [o["num_cached_tokens"] for o in r["outputs"]] == [0, 0, PREFIX, PREFIX]  # loaded from the store
    assert metric(r, "kvplug_connector_loaded_tokens_total", engine="vllm") == 2 * PREFIX


def test_bad_config_fails_at_start_naming_the_key(workload):
    bad = {"kvplug_scheduler": {"max_delay_s": -1}}
    with pytest.raises(AssertionError, match=r"kvplug_scheduler\.max_delay_s must be a finite number >= 0"):
        engine({**workload["spec"], "connector": False, "scheduler_cls": CLASS_PATH, "additional_config": bad})


def test_openai_server_with_scheduler_flag(smollm2, tmp_path):
    port = free_port()
    args = [
        "--model", smollm2, "--dtype", "float32", "--max-model-len", "1024", "--block-size", "32", "--enforce-eager",
        "--scheduler-cls", CLASS_PATH, "--additional-config", json.dumps({"kvplug_scheduler": {"max_delay_s": 2.0}}),
    ]  # fmt: skip
    log = tmp_path / "server.log"
    with openai_server(args, port, log):
        models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10).read())
        body = {"model": models["data"][0]["id"], "prompt": "The capital of France is", "max_tokens": 8}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({**body, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            out = json.loads(resp.read())
    assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["text"]
    assert f"Using custom scheduler class {CLASS_PATH}" in log.read_text()  # vLLM's engine core loaded it
