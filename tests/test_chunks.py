import dataclasses
import hashlib
import subprocess
import sys

import numpy as np
import pytest

from kvplug.chunks import ChunkKeyer, Namespace, token_bytes
from kvplug.errors import ConfigError

NS = Namespace(model="m", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_dim=8, chunk_size=4)


def test_prefix_keys_follow_the_documented_chain():
    tokens = list(range(10))
    keys = ChunkKeyer(NS).prefix_keys(tokens)
    h = NS.digest
    expected = []
    for i in range(2):  # 10 tokens -> 2 full chunks of 4, partial dropped
        h = hashlib.sha256(h + np.array(tokens[4 * i : 4 * i + 4], "<u4").tobytes()).digest()
        expected.append(h.hex())
    assert keys == expected


def test_keys_are_stable_across_processes_and_hash_seeds():
    code = (
        "from kvplug.chunks import Namespace, ChunkKeyer;"
        "ns=Namespace(model='m', dtype='bfloat16', num_layers=2, num_kv_heads=2, head_dim=8, chunk_size=4);"
        "print(ChunkKeyer(ns).prefix_keys(list(range(12)))[-1])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True
        ).stdout
        for seed in ("1", "2", "random")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == ChunkKeyer(NS).prefix_keys(list(range(12)))[-1]


def test_changing_a_token_changes_that_chunk_and_every_later_prefix_key():
    a = list(range(16))
    b = list(a)
    b[5] = 999  # chunk 1
    ka, kb = ChunkKeyer(NS).prefix_keys(a), ChunkKeyer(NS).prefix_keys(b)
    assert ka[0] == kb[0]
    assert all(x != y for x, y in zip(ka[1:], kb[1:], strict=True))


def test_blend_keys_are_position_independent():
    keyer = ChunkKeyer(NS)
    doc = [7, 8, 9, 10]
    a = keyer.chunks([1, 2, 3, 4, *doc])
    b = keyer.chunks([*doc, 5, 6, 7, 8])
    assert a[1].blend_key == b[0].blend_key
    assert a[1].prefix_key != b[0].prefix_key


def test_partial_chunk_policy():
    assert [c.num_tokens for c in ChunkKeyer(NS, "drop").chunks(range(10))] == [4, 4]
    keep = ChunkKeyer(NS, "keep").chunks(range(10))
    assert [(c.start, c.end) for c in keep] == [(0, 4), (4, 8), (8, 10)]
    # a partial last chunk never collides with the full chunk that extends it
    assert ChunkKeyer(NS, "keep").chunks(range(12))[2].prefix_key != keep[2].prefix_key
    with pytest.raises(ConfigError, match="partial"):
        ChunkKeyer(NS, "pad")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"revision": "abc"},
        {"dtype": "float16"},
        {"num_layers": 3},
        {"num_kv_heads": 4},
        {"head_dim": 16},
        {"layout": "blocks"},
        {"tp_rank": 1, "tp_size": 2},
        {"tp_size": 2},
        {"codec": "int8"},
        {"codec_params": Namespace.items({"bits": 4})},
        {"rope": Namespace.items({"theta": 1e5})},
        {"tenant_salt": "tenant-b"},
        {"chunk_size": 8},
    ],
)
def test_every_namespace_field_changes_every_key(change):
    other = dataclasses.replace(NS, **change)
    tokens = list(range(8))
    a, b = ChunkKeyer(NS).chunks(tokens), ChunkKeyer(other).chunks(tokens)
    assert NS.digest != other.digest
    assert not {c.prefix_key for c in a} & {c.prefix_key for c in b}
    assert not {c.blend_key for c in a} & {c.blend_key for c in b}


def test_bad_namespace_and_tokens_are_named():
    with pytest.raises(ConfigError, match="tp_rank"):
        Namespace(model="m", dtype="bf16", num_layers=1, num_kv_heads=1, head_dim=1, tp_rank=2, tp_size=2)
    with pytest.raises(ConfigError, match="num_layers"):
        Namespace(model="m", dtype="bf16", num_layers=0, num_kv_heads=1, head_dim=1)
    with pytest.raises(ValueError, match="token ids"):
        token_bytes([-1])
    with pytest.raises(ValueError, match="one-dimensional"):
        token_bytes([[1, 2]])
