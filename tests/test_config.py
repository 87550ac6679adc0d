import pytest

from kvplug.config import KVPlugConfig, parse_size
from kvplug.connectors import DiskStore, MemoryStore, RedisStore, TieredStore, open_store
from kvplug.errors import ConfigError


def test_sizes():
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("10GB") == 10 * 10**9
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size(1234) == 1234
    assert parse_size("2kib") == 2048
    with pytest.raises(ConfigError, match="cannot parse size"):
        parse_size("lots")


def test_store_urls(tmp_path, redis_url):
    m = open_store("memory://?max_bytes=1MiB")
    assert isinstance(m, MemoryStore) and m.max_bytes == 1 << 20
    d = open_store(f"file://{tmp_path}?max_bytes=2MiB&fsync=always")
    assert isinstance(d, DiskStore) and d.max_bytes == 2 << 20 and d.fsync == "always"
    r = open_store(redis_url + "&ttl=60&prefix=x:&batch_size=8")
    assert isinstance(r, RedisStore) and r.ttl_ms == 60000 and r.prefix == "x:" and r.batch_size == 8
    t = open_store(["memory://", f"file://{tmp_path}/t"])
    assert isinstance(t, TieredStore)
    for s in (m, d, r, t):
        s.close()


@pytest.mark.parametrize(
    "url,match",
    [
        ("memory://?max_byte=1", "unknown option 'max_byte'"),
        ("file://relative/path", "absolute path"),
        ("s3://bucket", "unknown scheme 's3'"),
        ("redis://localhost:6379/0?tll=5", "unknown option 'tll'"),
        ("memory://?max_bytes=huge", "bad value for 'max_bytes'"),
        ("redis+sentinel://h:26379", "service name"),
        ("redis+cluster://h:notaport", "bad host"),
        ("", "no store URL"),
    ],
)
def test_bad_urls_are_named(url, match):
    with pytest.raises(ConfigError, match=match):
        open_store(url)


def test_bad_store_values_are_named(tmp_path):
    with pytest.raises(ValueError, match="fsync"):
        open_store(f"file://{tmp_path}?fsync=sometimes")
    with pytest.raises(ValueError, match="ttl"):
        open_store("redis://127.0.0.1:1/0?ttl=-1")


def test_config_from_dict_env_yaml_and_precedence(tmp_path):
    cfg = KVPlugConfig.from_dict({"store": "memory://", "codec": "int4", "chunk_size": 512})
    assert cfg.codec == "int4" and cfg.chunk_size == 512 and cfg.store_urls == ["memory://"]
    y = tmp_path / "kvplug.yaml"
    y.write_text("kvplug:\n  store: [memory://, 'file:///tmp/x']\n  codec: fp8\n  chunk_size: 128\n")
    env = {"KVPLUG_CONFIG_FILE": str(y), "KVPLUG_CHUNK_SIZE": "64", "HOME": "/root"}
    cfg = KVPlugConfig.load({"codec": "raw"}, environ=env)
    assert cfg.store_urls == ["memory://", "file:///tmp/x"]  # from YAML
    assert cfg.chunk_size == 64  # env beats YAML
    assert cfg.codec == "raw"  # explicit beats env
    cfg = KVPlugConfig.load(
        environ={"KVPLUG_STORE": "memory://|redis://h:1/0", "KVPLUG_CODEC_PARAMS": "{bits: 2}", "KVPLUG_CODEC": "kivi"}
    )
    assert cfg.store_urls == ["memory://", "redis://h:1/0"] and cfg.codec_params == {"bits": 2}


@pytest.mark.parametrize(
    "data,match",
    [
        ({"stroe": "memory://"}, r"unknown key\(s\) \['stroe'\]"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": "abc"}, "chunk_size must be an integer"),
        ({"codec": "gzip"}, "unknown codec"),
        ({"codec": "kivi", "codec_params": {"bits": 3}}, "bits"),
        ({"partial_chunk": "pad"}, "partial_chunk"),
        ({"promote_on_hit": "maybe"}, "boolean"),
    ],
)
def test_bad_config_is_named(data, match):
    with pytest.raises(ConfigError, match=match):
        KVPlugConfig.from_dict(data)


def test_unknown_env_and_yaml_keys(tmp_path):
    with pytest.raises(ConfigError, match="environment.*'chunksize'"):
        KVPlugConfig.load(environ={"KVPLUG_CHUNKSIZE": "1"})
    y = tmp_path / "c.yaml"
    y.write_text("store: memory://\nttl: 5\n")
    with pytest.raises(ConfigError, match="config file.*'ttl'"):
        KVPlugConfig.load(yaml_path=str(y), environ={})
    y.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        KVPlugConfig.load(yaml_path=str(y), environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        KVPlugConfig.load(yaml_path=str(tmp_path / "nope.yaml"), environ={})


def test_env_names_owned_by_other_components_are_not_config_keys():
    env = {"KVPLUG_STORE": "memory://", "KVPLUG_SEMANTIC_REDIS": "redis://x", "KVPLUG_SGLANG_ALLOW_UNTESTED": "1"}
    assert KVPlugConfig.env_dict(env) == {"store": "memory://"}
