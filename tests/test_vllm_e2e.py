"""KVPlugConnector end to end on the real vLLM CPU engine: a store run, then new engines (new processes) that
load from each store. Greedy float32 outputs must equal a run without kvplug; broken or foreign caches must
never change an answer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kvplug.codec import get_codec
from kvplug.connectors import DiskStore
from kvplug.testing import RedisServer
from tests.vllm_helpers import cached, engine, load_failures, metric, require_vllm, tokens

require_vllm()

pytestmark = pytest.mark.slow
CHUNK = 256


@pytest.fixture(scope="module")
def smollm2() -> str:
    from kvplug.models import smollm2_dir

    return str(smollm2_dir())


@pytest.fixture(scope="module")
def prompts(smollm2: str) -> list[list[int]]:
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text).input_ids
    # 2 full chunks (+88); 1 full chunk (+44); exactly 2 chunks, so the load stops a block short of the second
    # chunk's end (one token must be computed) and that chunk is loaded in part
    return [ids[:600], ids[1000:1300], ids[2000:2512]]


@pytest.fixture(scope="module")
def baseline(smollm2: str, prompts: list[list[int]]) -> list[list[int]]:
    return tokens(engine({"model": smollm2, "prompts": prompts, "connector": False}))


@pytest.fixture(scope="module")
def stored(smollm2, prompts, baseline, tmp_path_factory):
    """One store run into a tiered store (memory, disk, Redis); yields (disk dir, redis server)."""
    disk = tmp_path_factory.mktemp("kv") / "disk"
    with RedisServer() as redis_server:
        r = engine(
            {"model": smollm2, "prompts": prompts, "extra": {"store": f"memory://|file://{disk}|{redis_server.url}"}}
        )
        assert tokens(r) == baseline
        assert cached(r) == [0, 0, 0]
        assert metric(r, "kvplug_connector_saved_tokens_total", engine="vllm") == 5 * CHUNK
        yield disk, redis_server


@pytest.mark.parametrize("which", ["disk", "redis", "tiered"])
def test_new_engine_loads_from_each_store(smollm2, prompts, baseline, stored, which):
    disk, redis_server = stored
    url = {
        "disk": f"file://{disk}",
        "redis": redis_server.url,
        "tiered": f"memory://|file://{disk}|{redis_server.url}",
    }[which]
    r = engine({"model": smollm2, "prompts": prompts, "extra": {"store": url}})
    assert cached(r) == [2 * CHUNK, CHUNK, 2 * CHUNK - 32]  # vLLM reports the loaded prefix as cached tokens
    assert tokens(r) == baseline
    assert metric(r, "kvplug_connector_loaded_tokens_total", engine="vllm") == 5 * CHUNK - 32
    assert load_failures(r) == 0
    assert metric(r, "kvplug_connector_saved_tokens_total", engine="vllm") == 0  # nothing new to save


def test_module_path_without_the_plugin(smollm2, prompts, baseline, stored):
    disk, _ = stored
    r = engine(
        {
            "model": smollm2,
            "prompts": prompts[1:2],
            "extra": {"store": f"file://{disk}"},
            "module_path": True,
            "env": {"VLLM_PLUGINS": "none-kvplug-test"},
        }
    )
    assert cached(r) == [CHUNK] and tokens(r) == baseline[1:2]


def test_another_model_never_hits(smollm2, prompts, baseline, stored):
    disk, _ = stored
    r = engine({"model": smollm2, "prompts": prompts, "extra": {"store": f"file://{disk}", "model_id": "other"}})
    assert cached(r) == [0, 0, 0] and tokens(r) == baseline
    assert metric(r, "kvplug_connector_hit_tokens_total", engine="vllm") == 0


def _copy(disk: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(disk, dst)
    return dst


def test_noise_in_stored_kv_changes_the_output(smollm2, prompts, baseline, stored, tmp_path):
    """Proves the loaded KV is what the engine attends to (not a silent recompute)."""
    disk = _copy(stored[0], tmp_path)
    store, codec = DiskStore(disk), get_codec("raw")
    g = torch.Generator().manual_seed(0)
    for k in store.keys():
        kv = codec.decode(store.get(k))
        store.put(k, codec.encode(kv + torch.randn(kv.shape, generator=g) * kv.std(), key=k))
    store.close()
    r = engine({"model": smollm2, "prompts": prompts, "extra": {"store": f"file://{disk}"}})
    assert cached(r) == [2 * CHUNK, CHUNK, 2 * CHUNK - 32]
    assert tokens(r) != baseline


def test_checksum_broken_entry_is_refused_and_recomputed(smollm2, prompts, baseline, stored, tmp_path):
    disk = _copy(stored[0], tmp_path)
    for f in (disk / "data").rglob("*"):
        if f.is_file():
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 0x01
            f.write_bytes(bytes(b))
    r = engine({"model": smollm2, "prompts": prompts, "extra": {"store": f"file://{disk}"}})
    assert tokens(r) == baseline  # every broken chunk recomputed by vLLM
    # each request's load stops at its first refused chunk (what follows cannot be used as a prefix anyway)
    assert metric(r, "kvplug_payload_errors_total", kind="checksum") == 3
    assert metric(r, "kvplug_connector_errors_total", engine="vllm", kind="load_refused") == 3
    assert metric(r, "kvplug_connector_loaded_tokens_total", engine="vllm") == 0


def test_redis_stopped_between_runs(smollm2, prompts, baseline):
    server = RedisServer().start()
    url = server.url + "?socket_connect_timeout=0.5&retries=0"
    try:
        r = engine({"model": smollm2, "prompts": prompts[1:2], "extra": {"store": url}})
        assert metric(r, "kvplug_connector_saved_tokens_total", engine="vllm") == CHUNK
        server.stop()
        r = engine({"model": smollm2, "prompts": prompts[1:2], "extra": {"store": url}})
        assert tokens(r) == baseline[1:2] and cached(r) == [0]
        errors = sum(v for k, v in r["metrics"].items() if k.startswith("kvplug_store_errors_total"))
        assert errors >= 1
    finally:
        server.close()


def test_per_request_options_and_tenant_isolation(smollm2, prompts, baseline, tmp_path):
    p = prompts[1]
    r = engine(
        {
            "model": smollm2,
            "prompts": [p, p, p, p, p],
            "params": [
                {"tenant_salt": "a", "skip_save": True},  # nothing saved
                {"tenant_salt": "a"},  # no hit (skip_save above), saves for tenant a
                {"tenant_salt": "b"},  # another tenant: no hit
                {"tenant_salt": "a", "skip_load": True},  # would hit, told not to load
                {"tenant_salt": "a"},
            ],  # hits
            "extra": {"store": f"file://{tmp_path}/s"},
        }
    )
    assert cached(r) == [0, 0, 0, 0, CHUNK]
    assert all(t == baseline[1] for t in tokens(r))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2) -> str:
    """A tiny random Llama (2 layers, head dim 32) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(path)
    return str(path)


def test_tiny_random_llama_round_trip(tiny_llama, prompts, tmp_path):
    base = engine({"model": tiny_llama, "prompts": prompts, "connector": False})
    spec = {"model": tiny_llama, "prompts": prompts, "extra": {"store": f"file://{tmp_path}/t", "codec": "zstd"}}
    assert tokens(engine(spec)) == tokens(base)
    r = engine(spec)
    assert cached(r) == [2 * CHUNK, CHUNK, 2 * CHUNK - 32] and tokens(r) == tokens(base)


def test_stored_chunks_equal_hugging_face_kv(smollm2, prompts, stored):
    """The CPU layout adapter reads vLLM's paged cache correctly: every chunk vLLM stored (raw, float32) is the
    KV that transformers computes for the same tokens."""
    from transformers import AutoModelForCausalLM

    from kvplug.models import past_to_kv

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    expected = []
    with torch.no_grad():
        for p in prompts:
            kv = past_to_kv(model(torch.tensor([p]), use_cache=True).past_key_values)
            expected += [kv[:, :, i : i + CHUNK] for i in range(0, len(p) - CHUNK + 1, CHUNK)]
    store, codec = DiskStore(stored[0]), get_codec("raw")
    keys = store.keys()
    assert len(keys) >= 5  # 5 chunks per namespace; earlier tests (model_id "other") add their own
    for k in keys:
        got = codec.decode(store.get(k), key=k)
        assert got.shape == (30, 2, CHUNK, 3, 64) and got.dtype == torch.float32
        assert min(float((got - e).abs().max()) for e in expected) < 1e-3
    store.close()


def test_preempted_requests_load_again_when_resumed(smollm2, prompts, stored):
    """30 blocks hold both prompts (26 blocks) but not their growth: vLLM preempts one request during decoding and
    resumes it in new blocks. A resumed request must load its prefix again (else it would attend to stale blocks)."""
    spec = {
        "model": smollm2,
        "prompts": prompts[1:3],
        "batch": True,
        "max_tokens": 130,
        "num_blocks": 30,
        "max_model_len": 768,
        "max_num_batched_tokens": 768,
    }
    base = engine({**spec, "connector": False})
    r = engine({**spec, "extra": {"store": f"file://{stored[0]}"}})
    assert tokens(r) == tokens(base)
    first_loads = CHUNK + 2 * CHUNK - 32
    assert metric(r, "kvplug_connector_loaded_tokens_total", engine="vllm") > first_loads  # reloaded after resume
    assert load_failures(r) == 0


def test_save_decode_serves_the_next_turn(smollm2, prompts, tmp_path):
    """With save_decode, chunks completed by generated tokens are stored: a follow-up prompt that contains the
    first answer (a chat's next turn) loads them too."""
    store = {"store": f"file://{tmp_path}/d", "save_decode": True}
    first = engine({"model": smollm2, "prompts": [prompts[1]], "max_tokens": 240, "extra": store})
    turn2 = prompts[1] + tokens(first)[0] + prompts[0][:40]  # 300 + 240 + 40 = 580 tokens
    assert metric(first, "kvplug_connector_saved_tokens_total", engine="vllm") == 2 * CHUNK  # prompt + answer
    base = engine({"model": smollm2, "prompts": [turn2], "connector": False})
    r = engine({"model": smollm2, "prompts": [turn2], "extra": store})
    assert cached(r) == [2 * CHUNK] and tokens(r) == tokens(base)


def test_chunked_prefill_saves_as_chunks_complete(smollm2, tmp_path):
    """A 1,100-token prompt with a 320-token step budget is prefilled over 4 steps: chunks are saved as they complete
    (block lists grow step by step), and a new engine, also prefilling in steps, loads 4 chunks."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(smollm2)(topics["class"] * 3).input_ids[:1100]
    spec = {"model": smollm2, "prompts": [prompt], "max_num_batched_tokens": 320, "max_tokens": 8}
    base = engine({**spec, "connector": False})
    first = engine({**spec, "extra": {"store": f"file://{tmp_path}/c"}})
    assert metric(first, "kvplug_connector_saved_tokens_total", engine="vllm") == 4 * CHUNK
    r = engine({**spec, "extra": {"store": f"file://{tmp_path}/c"}})
    assert cached(r) == [4 * CHUNK] and tokens(r) == tokens(base) == tokens(first)
