"""Semantic cache building blocks: policy validation, record format, quotas, index, scope, SSE, adaptive policy,
classifier (real MiniLM) and the CLI's error paths. No proxy here: see test_semantic_proxy.py."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from kvplug.errors import ConfigError, PayloadError
from kvplug.semantic.adaptive import LoadController, parse_waiting
from kvplug.semantic.classifier import CategoryClassifier
from kvplug.semantic.cli import app as cli_app
from kvplug.semantic.config import SemanticCacheConfig
from kvplug.semantic.document import CacheDocument, decode_embedding, encode_embedding, parse_doc_key
from kvplug.semantic.embedder import AsyncEmbedder, HashEmbedder
from kvplug.semantic.index import VectorIndex
from kvplug.semantic.openai_io import StreamAccumulator, cacheable_choices, hit_body, hit_events
from kvplug.semantic.policy import DEFAULT_POLICY, AdaptiveParams, HnswParams, load_policy, parse_policy
from kvplug.semantic.quota import CategoryEntries, Entry
from kvplug.semantic.scope import analyze
from kvplug.semantic.testing import shared_embedder


@pytest.fixture(scope="session")
def minilm():
    return shared_embedder("minilm")


# ---- policy -------------------------------------------------------------------------------------------------


def test_default_policy_has_reference_defaults_and_required_categories():
    pol = load_policy()
    for name in ("code", "factual", "chat", "time_sensitive", "default", "health", "finance"):
        assert name in pol.categories
    assert pol.default_category == "default"
    assert (pol.hnsw.M, pol.hnsw.ef_construction) == (16, 200)
    # an empty policy gets the paper's reference defaults
    bare = parse_policy({"categories": {"x": {}}}, "t")
    x = bare.categories["x"]
    assert (x.threshold, x.ttl, x.max_entries, x.eviction) == (0.8, 3600.0, 1000, "fifo")
    assert x.threshold_floor == 0.8 and x.ttl_ceiling == 3600.0  # never loosened unless bounds are given
    assert "default" in bare.categories
    # sensitive categories are strict and never loosened; time-sensitive has a short TTL
    for name in ("health", "finance"):
        c = pol.categories[name]
        assert c.threshold >= 0.9 and c.threshold_floor == c.threshold and c.ttl_ceiling == c.ttl
    assert pol.categories["time_sensitive"].ttl <= 600
    assert pol.categories["code"].threshold > pol.categories["chat"].threshold
    assert pol.categories["time_sensitive"].ttl < pol.categories["factual"].ttl


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"categories": {"code": {"treshold": 0.9}}}, "treshold"),
        ({"categoriez": {}}, "categoriez"),
        ({"defaults": {"examples": ["x"]}}, "examples"),
        ({"hnsw": {"m": 16}}, "'m'"),
        ({"adaptive": {"enable": True}}, "enable"),
        ({"categories": {"code": {"threshold": 1.5}}}, "categories.code.threshold"),
        ({"categories": {"code": {"threshold": "high"}}}, "categories.code.threshold"),
        ({"categories": {"code": {"threshold": 0.8, "min_threshold": 0.9}}}, "min_threshold"),
        ({"categories": {"code": {"ttl": 60, "max_ttl": 30}}}, "max_ttl"),
        ({"categories": {"code": {"eviction": "random"}}}, "eviction"),
        ({"categories": {"code": {"max_entries": 0}}}, "max_entries"),
        ({"categories": {"code": {"max_bytes": "lots"}}}, "max_bytes"),
        ({"categories": {"code": {"patterns": ["(unclosed"]}}}, "bad regular expression"),
        ({"categories": {"Bad Name": {}}}, "Bad Name"),
        ({"adaptive": {"latency_low_s": 5, "latency_high_s": 1}}, "latency_high_s"),
        ({"version": 2}, "version"),
    ],
)
def test_bad_policy_file_is_a_clear_error(tmp_path, doc, needle):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as e:
        load_policy(path)
    assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_policy_file_errors_for_missing_empty_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_policy(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_policy(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("categories: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(tmp_path / "bad.yaml")


def test_policy_file_round_trip_and_sizes(tmp_path):
    path = tmp_path / "p.yaml"
    doc = {
        "defaults": {"ttl": 60, "max_bytes": "1MiB"},
        "categories": {"a": {"threshold": 0.9, "eviction": "lru", "keywords": ["foo"]}, "b": {"max_bytes": 5000}},
        "default_category": "b",
    }
    path.write_text(yaml.safe_dump(doc))
    pol = load_policy(path)
    assert pol.categories["a"].max_bytes == 1 << 20 and pol.categories["a"].ttl == 60
    assert pol.categories["b"].max_bytes == 5000 and pol.default_category == "b"
    assert list(pol.categories) == ["a", "b"]
    # the shipped default policy survives a YAML round trip (what `kvplug semantic-cache policy` prints)
    out = CliRunner().invoke(cli_app, ["policy"])
    assert out.exit_code == 0
    assert parse_policy(yaml.safe_load(out.stdout), "built-in default policy") == load_policy()


def test_cli_rejects_bad_policy_before_starting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"categories": {"code": {"ttl_seconds": 5}}}))
    runner = CliRunner()
    out = runner.invoke(cli_app, ["policy", str(bad)])
    assert out.exit_code == 2
    assert "ttl_seconds" in out.output and str(bad) in out.output
    out = runner.invoke(cli_app, ["serve", "--policy", str(bad), "--upstream", "http://127.0.0.1:9"])
    assert out.exit_code == 2
    assert "ttl_seconds" in out.output
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"categories": {"code": {"ttl": 5}}}))
    out = runner.invoke(cli_app, ["policy", str(good)])
    assert out.exit_code == 0 and "OK, 2 categories" in out.output


def test_config_env_overrides_and_errors():
    cfg = SemanticCacheConfig.load(
        {"port": 9000}, environ={"KVPLUG_SEMANTIC_UPSTREAM": "http://h:1", "KVPLUG_SEMANTIC_PORT": "1"}
    )
    assert cfg.upstream == "http://h:1" and cfg.port == 9000
    cfg = SemanticCacheConfig.load(
        environ={"KVPLUG_SEMANTIC_CACHE_TOOLS": "yes", "KVPLUG_SEMANTIC_MAX_TEMPERATURE": "1"}
    )
    assert cfg.cache_tools is True and cfg.max_temperature == 1.0
    with pytest.raises(ConfigError, match="upstrem"):
        SemanticCacheConfig.load(environ={"KVPLUG_SEMANTIC_UPSTREM": "http://h:1"})
    with pytest.raises(ConfigError, match="speculative"):
        SemanticCacheConfig(speculative="maybe")
    with pytest.raises(ConfigError, match="upstream"):
        SemanticCacheConfig(upstream="redis://x")


# ---- record format --------------------------------------------------------------------------------------------


def _doc(vec: np.ndarray) -> CacheDocument:
    return CacheDocument(
        doc_id=42,
        category="code",
        scope="s" * 64,
        prompt="q",
        model="m",
        endpoint="chat",
        created=1.0,
        ttl=10.0,
        max_ttl=20.0,
        embedder="hash-384",
        response={"choices": [{"message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"}]},
        embedding=vec,
    )


def test_embedding_record_round_trip_and_every_corruption_is_refused():
    vec = np.random.default_rng(0).normal(size=384).astype(np.float32)
    blob = encode_embedding(vec)
    assert blob[0] == 1 and len(blob) == 3 + 384 * 4 + 8
    np.testing.assert_array_equal(decode_embedding(blob), vec)
    flipped = bytearray(blob)
    flipped[100] ^= 1
    with pytest.raises(PayloadError, match="checksum"):
        decode_embedding(bytes(flipped))
    with pytest.raises(PayloadError, match="version"):
        decode_embedding(b"\x02" + blob[1:])
    with pytest.raises(PayloadError, match="truncated"):
        decode_embedding(blob[:-1])
    fields = _doc(vec).to_fields()
    assert b"pickle" not in fields["meta"] and fields["meta"].startswith(b"{")
    back = CacheDocument.from_fields(42, "code", fields)
    assert back.response == _doc(vec).response and back.scope == "s" * 64
    np.testing.assert_array_equal(back.embedding, vec)
    tampered = dict(fields, meta=fields["meta"].replace(b'"a"', b'"b"'))
    with pytest.raises(PayloadError, match="checksum"):
        CacheDocument.from_fields(42, "code", tampered)
    with pytest.raises(PayloadError, match="category"):
        CacheDocument.from_fields(42, "chat", fields)
    with pytest.raises(PayloadError):
        CacheDocument.from_fields(42, "code", {"meta": fields["meta"]})
    assert parse_doc_key("p:", "p:doc:code:000000000000002a") == ("code", 42)
    assert parse_doc_key("p:", "q:doc:code:000000000000002a") is None
    assert parse_doc_key("p:", "p:doc:code:xyz") is None


# ---- quotas and index -------------------------------------------------------------------------------------------


def _entries(policy: str) -> CategoryEntries:
    ce = CategoryEntries(policy)
    for i in range(3):
        ce.add(Entry(i, f"k{i}", "s", created=float(i), last_used=float(i), hits=0, nbytes=100))
    return ce


def test_eviction_orders():
    fifo = _entries("fifo")
    fifo.touch(0, 10.0)
    assert [e.doc_id for e in fifo.over_quota(2, None)] == [0]  # oldest insertion, even if just used
    lru = _entries("lru")
    lru.touch(0, 10.0)
    assert [e.doc_id for e in lru.over_quota(2, None)] == [1]  # least recently used
    lfu = _entries("lfu")
    lfu.touch(0, 10.0)
    lfu.touch(1, 11.0)
    lfu.touch(1, 12.0)
    assert [e.doc_id for e in lfu.over_quota(1, None)] == [2, 0]  # fewest hits first
    by_bytes = _entries("fifo")
    assert [e.doc_id for e in by_bytes.over_quota(10, 150)] == [0, 1]
    assert by_bytes.nbytes == 100 and len(by_bytes) == 1
    assert _entries("fifo").over_quota(3, 300) == []


def test_vector_index_search_filter_remove_and_growth():
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(40, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    idx = VectorIndex(8, HnswParams(), capacity=16)
    for i, v in enumerate(vecs):
        idx.add(1000 + i, v)  # grows past the initial capacity
    assert len(idx) == 40
    best = idx.search(vecs[5], 3)
    assert best[0][0] == 1005 and best[0][1] == pytest.approx(1.0, abs=1e-5)
    only_odd = idx.search(vecs[5], 3, allowed=lambda label: label % 2 == 1)
    assert only_odd and all(label % 2 == 1 for label, _ in only_odd)
    assert idx.search(vecs[5], 3, allowed=lambda label: False) == []
    assert idx.remove(1005) and not idx.remove(1005)
    assert 1005 not in [label for label, _ in idx.search(vecs[5], 5)]
    idx.add(2000, vecs[5])  # reuses the deleted slot
    assert idx.search(vecs[5], 1)[0][0] == 2000


# ---- request analysis -----------------------------------------------------------------------------------------

CFG = SemanticCacheConfig()


def _chat(content: str = "How do I sort a list?", **kw):
    return {"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def test_scope_separates_tenant_auth_model_system_history_and_params():
    base = analyze(_chat(), {}, "chat", CFG)
    assert base.bypass is None and base.query == "How do I sort a list?"
    same = analyze(_chat(), {}, "chat", CFG)
    assert same.scope == base.scope
    # fields that do not change the answer do not change the scope
    assert analyze(_chat(stream=True, user="u1", cache=True), {}, "chat", CFG).scope == base.scope
    variants = [
        analyze(_chat(), {"x-kvplug-tenant": "a"}, "chat", CFG),
        analyze(_chat(), {"authorization": "Bearer k1"}, "chat", CFG),
        analyze(_chat(), {"authorization": "Bearer k2"}, "chat", CFG),
        analyze({**_chat(), "model": "other"}, {}, "chat", CFG),
        analyze(_chat(max_tokens=5), {}, "chat", CFG),
        analyze(
            {
                "model": "m",
                "temperature": 0,
                "messages": [{"role": "system", "content": "Be terse."}, _chat()["messages"][0]],
            },
            {},
            "chat",
            CFG,
        ),
        analyze(
            {
                "model": "m",
                "temperature": 0,
                "messages": [
                    {"role": "user", "content": "I use Rust."},
                    {"role": "assistant", "content": "Nice."},
                    _chat()["messages"][0],
                ],
            },
            {},
            "chat",
            CFG,
        ),
        analyze({"model": "m", "prompt": "How do I sort a list?", "temperature": 0}, {}, "completions", CFG),
    ]
    scopes = [v.scope for v in variants]
    assert all(v.bypass is None for v in variants)
    assert len(set(scopes + [base.scope])) == len(scopes) + 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (_chat(temperature=0.7), "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "temperature"),  # default 1.0
        (_chat(cache=False), "client_opt_out"),
        (_chat(n=2), "n"),
        (_chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (_chat(logprobs=True), "logprobs"),
        (_chat(top_logprobs=2), "logprobs"),
        ({"model": "m", "temperature": 0, "messages": [{"role": "assistant", "content": "x"}]}, "unsupported_messages"),
        (
            {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "unsupported_messages",
        ),
        (_chat("   "), "empty_query"),
    ],
)
def test_bypass_rules(body, reason):
    info = analyze(body, {}, "chat", CFG)
    assert info.bypass == reason
    assert "cache" not in info.body


def test_bypass_rules_for_completions_and_config_switches():
    comp = {"model": "m", "temperature": 0}
    assert analyze({**comp, "prompt": ["a", "b"]}, {}, "completions", CFG).bypass == "unsupported_prompt"
    assert analyze({**comp, "prompt": [1, 2, 3]}, {}, "completions", CFG).bypass == "unsupported_prompt"
    assert analyze({**comp, "prompt": "x", "echo": True}, {}, "completions", CFG).bypass == "echo"
    assert analyze({**comp, "prompt": "x", "logprobs": 0}, {}, "completions", CFG).bypass == "logprobs"
    assert analyze({**comp, "prompt": ["x"]}, {}, "completions", CFG).bypass is None
    loose = SemanticCacheConfig(max_temperature=1.0, cache_tools=True, cache_logprobs=True, cache_multiple_choices=True)
    assert analyze(_chat(temperature=0.7), {}, "chat", loose).bypass is None
    assert analyze(_chat(tools=[{"type": "function"}]), {}, "chat", loose).bypass is None
    assert analyze(_chat(n=3), {}, "chat", loose).bypass is None
    assert analyze(_chat(n=3), {}, "chat", loose).scope != analyze(_chat(), {}, "chat", loose).scope
    opt_out = analyze(_chat(cache=False), {}, "chat", loose)
    assert opt_out.bypass == "client_opt_out" and opt_out.body_changed and "cache" not in opt_out.body


# ---- OpenAI formats ---------------------------------------------------------------------------------------------


def _events(raw: list[bytes]) -> list[object]:
    out: list[object] = []
    for ev in b"".join(raw).split(b"\n\n"):
        if ev:
            assert ev.startswith(b"data: ")
            data = ev[6:]
            out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def test_hit_bodies_and_sse_are_valid_openai():
    choices = [{"message": {"role": "assistant", "content": "Use sorted()."}, "finish_reason": "stop"}]
    body = hit_body("chat", choices, "m")
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-kvplug-")
    assert body["choices"][0]["index"] == 0 and body["choices"][0]["message"]["content"] == "Use sorted()."
    evs = _events(hit_events("chat", choices, "m", include_usage=True))
    assert evs[-1] == "[DONE]"
    chunks = [e for e in evs if e != "[DONE]"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Use sorted()."
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 0
    # a streamed hit rebuilds into the same cacheable answer
    acc = StreamAccumulator("chat")
    for raw in hit_events("chat", choices, "m"):
        acc.feed(raw[:7])
        acc.feed(raw[7:])
    assert acc.choices() == choices
    comp = [{"text": "42", "finish_reason": "length"}]
    acc = StreamAccumulator("completions")
    acc.feed(b"".join(hit_events("completions", comp, "m")))
    assert acc.choices() == comp


def test_only_clean_answers_are_cacheable():
    ok = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}]}
    assert cacheable_choices("chat", 200, ok) == [
        {"message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}
    ]
    assert cacheable_choices("chat", 500, ok) is None
    for finish, content in (("content_filter", "x"), ("stop", ""), ("stop", "   "), (None, "x"), ("abort", "x")):
        bad = {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish}]}
        assert cacheable_choices("chat", 200, bad) is None
    assert cacheable_choices("chat", 200, {"choices": []}) is None
    assert cacheable_choices("chat", 200, {"error": {"message": "x"}}) is None
    assert cacheable_choices("completions", 200, {"choices": [{"text": "t", "finish_reason": "length"}]})
    # streams: unfinished, error events and tool calls are not stored
    acc = StreamAccumulator("chat")
    acc.feed(b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n')
    assert acc.choices() is None  # no [DONE]
    acc.feed(b"data: [DONE]\n\n")
    assert acc.choices() == [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]
    err = StreamAccumulator("chat")
    err.feed(b'data: {"error":{"message":"boom"}}\n\ndata: [DONE]\n\n')
    assert err.choices() is None
    tools = StreamAccumulator("chat")
    tools.feed(b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]},"finish_reason":"stop"}]}\n\n')
    tools.feed(b"data: [DONE]\n\n")
    assert tools.choices() is None


# ---- load-adaptive policy ---------------------------------------------------------------------------------------


def test_load_controller_loosens_within_bounds_and_tightens_back():
    now = [0.0]
    params = AdaptiveParams(latency_low_s=1.0, latency_high_s=3.0, queue_low=2, queue_high=10, half_life_s=10.0)
    lc = LoadController(params, clock=lambda: now[0])
    cat = parse_policy({"categories": {"c": {"threshold": 0.9, "min_threshold": 0.8, "ttl": 100, "max_ttl": 300}}})
    c = cat.categories["c"]
    never = cat.categories["default"]  # no bounds: never changes
    assert lc.pressure() == 0.0 and lc.effective(c).threshold == 0.9
    lc.observe_latency(5.0)
    assert lc.pressure() == 1.0
    assert lc.effective(c).threshold == pytest.approx(0.8) and lc.effective(c).ttl == pytest.approx(300)
    assert lc.effective(never).threshold == 0.8 and lc.effective(never).ttl == 3600  # default: 0.8, no bounds
    now[0] = 20.0  # two half-lives without a miss: 5 s -> 1.25 s
    assert lc.pressure() == pytest.approx(0.125)
    assert 0.8 < lc.effective(c).threshold < 0.9
    now[0] = 100.0
    assert lc.pressure() == pytest.approx(0.0, abs=1e-3)
    lc.observe_queue(6)
    assert lc.pressure() == pytest.approx(0.5, abs=1e-3)
    now[0] = 200.0  # the queue reading went stale
    assert lc.pressure() == pytest.approx(0.0, abs=1e-3)
    off = LoadController(AdaptiveParams(enabled=False))
    off.observe_latency(100.0)
    assert off.pressure() == 0.0


def test_parse_waiting_sums_label_sets():
    text = (
        "# HELP vllm:num_requests_waiting x\n# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="a"} 3.0\n'
        'vllm:num_requests_waiting{engine="1",model_name="a"} 2.0 1700000000\n'
        'vllm:num_requests_waiting_by_reason{reason="x"} 100.0\n'
    )
    assert parse_waiting(text) == 5.0
    assert parse_waiting("vllm:num_requests_running 4\n") is None


# ---- embedder and classifier (real MiniLM) ---------------------------------------------------------------------


def test_async_embedder_batches_and_matches_direct(minilm):
    texts = [f"question number {i} about sorting lists" for i in range(12)]

    async def go() -> list[np.ndarray]:
        ae = AsyncEmbedder(minilm, max_batch=8, cache_size=4)
        out = await asyncio.gather(*(ae.embed(t) for t in texts))
        again = await ae.embed(texts[-1])  # from the exact-text cache
        assert again is out[-1]
        ae.close()
        return out

    got = np.stack(asyncio.run(go()))
    want = minilm.embed(texts)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    h = HashEmbedder()
    assert np.array_equal(h.embed(["a b"]), h.embed(["a b"])) and not np.array_equal(h.embed(["a"]), h.embed(["b"]))


def test_classifier_rules_override_centroids(minilm):
    pol = load_policy()
    ex = CategoryClassifier.examples(pol)
    clf = CategoryClassifier(pol, {k: minilm.embed(v) for k, v in ex.items()})
    unseen = {
        "How can I merge two dictionaries into one?": "code",
        "Who painted the Mona Lisa?": "factual",
        "Hey there! How is it going?": "chat",
        "What's the exchange rate of the euro right now?": "time_sensitive",
        "What are the side effects of aspirin?": "health",
    }
    for text, want in unseen.items():
        got = clf.classify(text, minilm.embed([text])[0])
        assert got.category == want, (text, got)
    # a rule wins over the centroid: a chat-like sentence that mentions Python goes to code
    rule = clf.classify("Hey, tell me a joke about Python", minilm.embed(["Hey, tell me a joke about Python"])[0])
    assert rule == rule.__class__("code", "rule", 1.0)
    # nothing close to any example: the default category
    assert clf.classify("zxqv blorp", minilm.embed(["zxqv blorp"])[0]).category == "default"
    assert DEFAULT_POLICY["categories"]["code"]["examples"]  # the policy carries the labelled examples


def test_docs_policy_example_is_a_valid_policy():
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "semantic-cache.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    pol = parse_policy(yaml.safe_load(block), "docs/semantic-cache.md")
    assert pol.categories["code"].threshold == load_policy().categories["code"].threshold
    assert pol.categories["time_sensitive"].ttl == load_policy().categories["time_sensitive"].ttl
