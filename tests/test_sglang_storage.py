"""kvplug as SGLang's HiCache storage backend, created through SGLang's own StorageBackendFactory (dynamic
route), against a real private Redis and a real disk store, with SGLang's real page hashes.

The host pool is SGLang's page code over a CPU buffer (see tests/sglang_helpers.py for why it is not the
class itself). SGLang's engine does not run HiCache on CPU: the end-to-end server test needs a GPU (docs/sglang.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from kvplug.errors import ConfigError
from kvplug.testing import RedisServer

if importlib.util.find_spec("sglang") is None:
    if os.environ.get("CI"):
        raise RuntimeError("sglang is not installed: scripts/test.sh installs sglang==0.5.23 --no-deps")
    pytest.skip("sglang is not installed", allow_module_level=True)

from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402
from sglang.srt.mem_cache.utils import get_hash_str  # noqa: E402

from kvplug.integrations.sglang import storage as kvstorage  # noqa: E402
from kvplug.integrations.sglang.storage import KVPlugHiCacheStorage  # noqa: E402
from tests.sglang_helpers import LAYOUTS, host_pool, token_pages  # noqa: E402

PAGE = 4


def make_config(
    store: str, model: str = "test/model", tp_rank: int = 0, tp_size: int = 1, **extra
) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name=model,
        extra_config={
            "backend_name": "kvplug",
            "module_path": "kvplug.integrations.sglang.storage",
            "class_name": "KVPlugHiCacheStorage",
            "interface_v1": 1,
            "store": store,
            **extra,
        },
    )


def make_backend(store: str, layout: str = "layer_first", pool=None, **kw) -> tuple[KVPlugHiCacheStorage, object]:
    """As SGLang's cache controller does it: factory create, then register the host pool."""
    pool = pool if pool is not None else host_pool(layout, page_size=PAGE)
    dtype = kw.pop("dtype", None)
    if dtype is not None:
        pool = host_pool(layout, page_size=PAGE, dtype=dtype)
    backend = StorageBackendFactory.create_backend("dynamic", make_config(store, **kw), pool)
    assert isinstance(backend, KVPlugHiCacheStorage)
    backend.register_mem_pool_host(pool)
    return backend, pool


def page_keys(n: int, seed: int = 0) -> list[str]:
    """SGLang's chained page hashes for n pages of tokens."""
    tokens = list(range(seed * 1000, seed * 1000 + n * PAGE))
    keys = get_hash_str(tokens, None, page_size=PAGE)
    assert isinstance(keys, list) and len(keys) == n and all(len(k) == 64 for k in keys)
    return keys


def fill(pool, pages: list[int], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in pages:
        page = pool.get_data_page(p * PAGE, flat=False)
        page.copy_(torch.randn(page.shape, generator=g).to(page.dtype))


def canonical(pool, page: int) -> torch.Tensor:
    """A page as [layers, 2, page, heads, dim], whatever the host layout (via SGLang's flat page order)."""
    from kvplug.integrations.sglang.pages import geometry_of

    return geometry_of(pool).to_canonical(pool.get_data_page(page * PAGE, flat=True)).clone()


@pytest.fixture(scope="module")
def redis_url():
    with RedisServer() as server:
        yield server.url + "/0"


@pytest.fixture(params=["file", "redis"])
def store_url(request, tmp_path, redis_url):
    if request.param == "file":
        return f"file://{tmp_path}/l3"
    # A fresh database per test keeps tests apart on the shared private server.
    import redis as redis_py

    redis_py.Redis.from_url(redis_url).flushdb()
    return redis_url


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_copy_round_trip_every_layout(store_url, layout):
    writer, pool = make_backend(store_url, layout)
    keys = page_keys(3)
    fill(pool, [1, 2, 5])
    before = [canonical(pool, p) for p in (1, 2, 5)]
    assert writer.batch_set_v1(keys, token_pages(pool, [1, 2, 5])) == [True, True, True]

    reader, pool2 = make_backend(store_url, layout)  # a new server process would build a new backend
    assert reader.batch_exists(keys) == 3
    assert reader.batch_get_v1(keys, token_pages(pool2, [7, 0, 3])) == [True, True, True]
    for want, p in zip(before, (7, 0, 3), strict=True):
        assert torch.equal(canonical(pool2, p), want)
    untouched = pool2.get_data_page(4 * PAGE, flat=True)
    assert torch.count_nonzero(untouched) == 0, "a load wrote outside its target pages"


def test_pages_move_between_host_layouts(tmp_path):
    url = f"file://{tmp_path}/l3"
    writer, pool = make_backend(url, "page_first")
    keys = page_keys(2)
    fill(pool, [0, 1], seed=3)
    want = [canonical(pool, 0), canonical(pool, 1)]
    assert all(writer.batch_set_v1(keys, token_pages(pool, [0, 1])))
    for layout in ("layer_first", "page_head", "page_first_direct"):
        reader, pool2 = make_backend(url, layout)
        assert reader.batch_get_v1(keys, token_pages(pool2, [2, 3])) == [True, True]
        assert torch.equal(canonical(pool2, 2), want[0]) and torch.equal(canonical(pool2, 3), want[1])


def test_legacy_copying_interface(store_url):
    backend, pool = make_backend(store_url, "page_first")
    keys = page_keys(2, seed=1)
    fill(pool, [0, 1], seed=5)
    pages = [pool.get_data_page(p * PAGE, flat=True) for p in (0, 1)]
    assert backend.set(keys[0], pages[0]) is True
    assert backend.batch_set(keys[1:], pages[1:]) is True
    assert backend.exists(keys[0]) and backend.exists(keys[1])
    assert not backend.exists(page_keys(1, seed=9)[0])

    # as SGLang's _generic_page_get does: fetch into dummy pages, then set_from_flat_data_page
    dummies = [pool.get_dummy_flat_data_page() for _ in keys]
    got = backend.batch_get(keys, dummies)
    assert got[0] is dummies[0] and got[1] is dummies[1]
    for page, data in zip((4, 6), got, strict=True):
        pool.set_from_flat_data_page(page * PAGE, data)
    assert torch.equal(pool.get_data_page(4 * PAGE), pages[0]) and torch.equal(pool.get_data_page(6 * PAGE), pages[1])
    alone = backend.get(keys[0])
    assert alone is not None and torch.equal(alone, pages[0])
    assert backend.get(page_keys(1, seed=9)[0]) is None


def test_batch_exists_counts_the_leading_run(store_url):
    backend, pool = make_backend(store_url)
    keys = page_keys(5, seed=2)
    fill(pool, range(5))
    stored = [0, 1, 3, 4]  # page 2 missing
    assert all(backend.batch_set_v1([keys[i] for i in stored], token_pages(pool, stored)))
    assert backend.batch_exists(keys) == 2
    assert backend.batch_exists(keys[3:]) == 2
    assert backend.batch_exists(keys[2:]) == 0
    assert backend.batch_exists([]) == 0


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other/model"},
        {"tp_rank": 1, "tp_size": 2},
        {"dtype": torch.bfloat16},
        {"codec": "int8"},
        {"tenant_salt": "tenant-b"},
        {"layout_heads": 4},
    ],
    ids=["model", "tp", "dtype", "codec", "tenant", "geometry"],
)
def test_namespaces_are_isolated(tmp_path, change):
    url = f"file://{tmp_path}/l3"
    base, pool = make_backend(url)
    keys = page_keys(2)
    fill(pool, [0, 1])
    assert all(base.batch_set_v1(keys, token_pages(pool, [0, 1])))
    same, _ = make_backend(url)
    assert same.batch_exists(keys) == 2  # the positive control: same namespace hits

    kw = dict(change)
    heads = kw.pop("layout_heads", None)
    pool2 = host_pool("layer_first", heads=heads, page_size=PAGE) if heads else None
    other, pool2 = make_backend(url, pool=pool2, **kw)
    assert other.batch_exists(keys) == 0
    assert other.batch_get_v1(keys, token_pages(pool2, [0, 1])) == [False, False]


def test_quantizing_codec_round_trip_within_bound(tmp_path):
    backend, pool = make_backend(f"file://{tmp_path}/l3", "page_head", codec="int8")
    keys = page_keys(2)
    fill(pool, [0, 1], seed=7)
    want = [canonical(pool, 0), canonical(pool, 1)]
    assert all(backend.batch_set_v1(keys, token_pages(pool, [0, 1])))
    assert backend.batch_get_v1(keys, token_pages(pool, [8, 9])) == [True, True]
    for w, p in zip(want, (8, 9), strict=True):
        got = canonical(pool, p)
        assert not torch.equal(got, w)  # it is lossy...
        assert (got - w).abs().max() <= 0.05 * w.abs().max()  # ...within int8's bound


def test_corrupted_payload_is_a_counted_miss_and_deleted(redis_url):
    import redis as redis_py

    client = redis_py.Redis.from_url(redis_url)
    client.flushdb()
    backend, pool = make_backend(redis_url)
    keys = page_keys(2)
    fill(pool, [0, 1])
    assert all(backend.batch_set_v1(keys, token_pages(pool, [0, 1])))
    skey = backend.store_key(keys[1])
    rkey = next(k for k in client.scan_iter() if skey.encode() in k)
    raw = bytearray(client.get(rkey))
    raw[len(raw) // 2] ^= 0xFF
    client.set(rkey, bytes(raw))

    reader, pool2 = make_backend(redis_url)
    assert reader.batch_get_v1(keys, token_pages(pool2, [2, 3])) == [True, False]
    assert reader.payload_errors == {"checksum": 1}
    assert reader.batch_exists(keys) == 1  # the refused page was deleted
    assert torch.count_nonzero(pool2.get_data_page(3 * PAGE)) == 0


def test_redis_down_means_misses_not_exceptions():
    with RedisServer() as server:
        backend, pool = make_backend(server.url + "/0")
        keys = page_keys(2)
        fill(pool, [0, 1])
        assert all(backend.batch_set_v1(keys, token_pages(pool, [0, 1])))
        server.stop()
        assert backend.batch_exists(keys) == 0
        assert backend.batch_get_v1(keys, token_pages(pool, [2, 3])) == [False, False]
        assert backend.batch_set_v1(page_keys(1, seed=4), token_pages(pool, [0])) == [False]
        assert backend.get(keys[0]) is None and backend.set(keys[0], pool.get_data_page(0)) is False
        assert sum(backend.store.stats().errors.values()) > 0


def test_opaque_pools_only_take_byte_codecs(tmp_path):
    pool = host_pool("layer_first", page_size=PAGE)
    pool.__class__.__name__ = "MLATokenToKVPoolHost"
    with pytest.raises(ConfigError, match="int8.*MLATokenToKVPoolHost"):
        make_backend(f"file://{tmp_path}/l3", pool=pool, codec="int8")
    backend, _ = make_backend(f"file://{tmp_path}/l3", pool=pool, codec="zstd")
    assert backend.namespace is not None and backend.namespace.layout.startswith("sglang-opaque:MLATokenToKVPoolHost")
    keys = page_keys(1)
    fill(pool, [0])
    want = pool.get_data_page(0).clone()
    assert backend.batch_set_v1(keys, token_pages(pool, [0])) == [True]
    assert backend.batch_get_v1(keys, token_pages(pool, [5])) == [True]
    assert torch.equal(pool.get_data_page(5 * PAGE), want)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"stor": "file:///tmp/x"}, "unknown extra-config key.*stor"),
        ({"store": ""}, 'needs "store"'),
        ({"codec": "int9"}, "unknown codec 'int9'"),
        ({"codec_params": [1]}, "codec_params must be an object"),
        ({"store": "redis://127.0.0.1:1/0?bogus=1"}, "bogus"),
    ],
)
def test_bad_extra_config_is_a_clear_error(tmp_path, extra, match):
    cfg = make_config(f"file://{tmp_path}/x")
    cfg.extra_config.update(extra)
    if "stor" in extra:
        del cfg.extra_config["store"]
    with pytest.raises(ConfigError, match=match):
        KVPlugHiCacheStorage(cfg)


def test_version_mismatch_is_refused_unless_allowed(monkeypatch, tmp_path):
    import kvplug.integrations.sglang as integ

    monkeypatch.setattr(integ, "sglang_version", lambda: "0.5.22")
    monkeypatch.delenv(integ.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(ConfigError, match="tested with SGLang 0.5.23; found 0.5.22"):
        KVPlugHiCacheStorage(make_config(f"file://{tmp_path}/x"))
    monkeypatch.setenv(integ.ALLOW_UNTESTED_ENV, "1")
    assert KVPlugHiCacheStorage(make_config(f"file://{tmp_path}/x")) is not None
    assert kvstorage.check_version is integ.check_version


PLUGIN_SCRIPT = r"""
import json, sys
from sglang.srt.plugins import load_plugins
from sglang.srt.server_args import ServerArgs
from kvplug.errors import ConfigError
load_plugins()
extra = {"backend_name": "kvplug", "module_path": "kvplug.integrations.sglang.storage",
         "class_name": "KVPlugHiCacheStorage", **json.loads(sys.argv[1])}
args = ServerArgs(model_path="x", enable_hierarchical_cache=True, hicache_storage_backend="dynamic",
                  hicache_storage_backend_extra_config=json.dumps(extra))
try:
    args.check_server_args()
except ConfigError as e:
    print("KVPLUG-CONFIG-ERROR", e)
except Exception as e:
    print("OTHER", type(e).__name__)
"""


def test_plugin_entry_point_checks_the_server_config_at_start_up(tmp_path):
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("kvplug") == "kvplug.integrations.sglang:register"

    def run(extra: dict) -> str:
        env = {**os.environ, "SGLANG_PLUGINS": "kvplug"}
        r = subprocess.run(
            [sys.executable, "-c", PLUGIN_SCRIPT, json.dumps(extra)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        return r.stdout + r.stderr

    bad = run({"store": f"file://{tmp_path}/x", "codec": "int9"})
    assert "KVPLUG-CONFIG-ERROR" in bad and "int9" in bad
    good = run({"store": f"file://{tmp_path}/x"})
    # kvplug's check passes; SGLang's own check then fails on this unresolved CPU record, which is not ours.
    assert "KVPLUG-CONFIG-ERROR" not in good and "OTHER" in good


def test_plugin_register_is_idempotent():
    from sglang.srt.plugins.hook_registry import HookRegistry

    import kvplug.integrations.sglang as integ

    target = "sglang.srt.server_args.ServerArgs.check_server_args"
    before = len(HookRegistry._hooks.get(target, []))
    integ._registered = False
    integ.register()
    integ.register()
    hooks = HookRegistry._hooks[target]
    assert len(hooks) == before + 1
    hooks.pop()


def test_sglang_owned_keys_and_at_file_configs_are_accepted(tmp_path):
    from kvplug.integrations.sglang import validate_server_args

    extra = {
        "backend_name": "kvplug",
        "module_path": "kvplug.integrations.sglang.storage",
        "class_name": "KVPlugHiCacheStorage",
        "store": f"file://{tmp_path}/x",
        "prefetch_threshold": 128,
        "hicache_storage_pass_prefix_keys": True,
        "file_storage_path": "/tmp/sglang-adds-this",
    }
    cfg = make_config(f"file://{tmp_path}/x")
    cfg.extra_config.update(extra)
    assert KVPlugHiCacheStorage(cfg) is not None

    class Args:
        hicache_storage_backend = "dynamic"

    for name, text in (
        ("c.json", json.dumps(extra)),
        ("c.yaml", "\n".join(f"{k}: {json.dumps(v)}" for k, v in extra.items())),
    ):
        (tmp_path / name).write_text(text)
        Args.hicache_storage_backend_extra_config = f"@{tmp_path / name}"
        validate_server_args(Args)  # no error
    (tmp_path / "bad.json").write_text(json.dumps({**extra, "codec": "int9"}))
    Args.hicache_storage_backend_extra_config = f"@{tmp_path / 'bad.json'}"
    with pytest.raises(ConfigError, match="int9"):
        validate_server_args(Args)
    # another dynamic backend (even one given as a file we cannot read) is not ours to judge
    Args.hicache_storage_backend_extra_config = json.dumps({"backend_name": "x", "module_path": "m", "class_name": "C"})
    validate_server_args(Args)
    Args.hicache_storage_backend_extra_config = "@/nonexistent/other.json"
    validate_server_args(Args)


def test_fp8_kv_pools_only_take_byte_codecs(tmp_path):
    pool = host_pool("page_first", page_size=PAGE, dtype=torch.uint8)  # SGLang keeps fp8 KV as uint8 bits
    with pytest.raises(ConfigError, match="int8.*uint8"):
        make_backend(f"file://{tmp_path}/l3", pool=pool, codec="int8")
    backend, _ = make_backend(f"file://{tmp_path}/l3", pool=pool, codec="zstd")
    keys = page_keys(1)
    pool.get_data_page(0, flat=False).copy_(torch.randint(0, 255, pool.get_data_page(0, flat=False).shape))
    want = pool.get_data_page(0).clone()
    assert backend.batch_set_v1(keys, token_pages(pool, [0])) == [True]
    assert backend.batch_get_v1(keys, token_pages(pool, [3])) == [True]
    assert torch.equal(pool.get_data_page(3 * PAGE), want)


def test_unusable_pools_are_refused_at_attach_and_errors_never_escape(tmp_path):
    pool = host_pool("layer_first", page_size=PAGE)
    pool.layout = "page_unified"  # SGLang's page accessors raise for it
    with pytest.raises(ConfigError, match="no usable page accessors"):
        make_backend(f"file://{tmp_path}/l3", pool=pool)

    backend, pool = make_backend(f"file://{tmp_path}/l3")
    with pytest.raises(ConfigError, match="v2 storage interface"):
        backend.register_mem_host_pool_v2(pool, "mamba")
    keys = page_keys(2)
    fill(pool, [0, 1])
    assert all(backend.batch_set_v1(keys, token_pages(pool, [0, 1])))
    pool.layout = "broken-after-attach"  # every page access now raises inside SGLang's code
    assert backend.batch_get_v1(keys, token_pages(pool, [2, 3])) == [False, False]
    assert backend.batch_set_v1(page_keys(1, seed=3), token_pages(pool, [0])) == [False]
