"""Hostile payloads: bodies that pass the checksum (it was recomputed after the mutation) but are not valid for
their codec, decompression bombs, and payload authentication with an operator secret. Nothing may raise into
the caller, nothing may blow up memory, and a refused entry is counted and deleted."""

from __future__ import annotations

import resource
import struct
import time

import lz4.frame
import numpy as np
import pytest
import torch
import xxhash
import zstandard

from kvplug.cache import KVCache
from kvplug.chunks import Namespace
from kvplug.codec import CODEC_NAMES, get_codec
from kvplug.codec import frame as fr
from kvplug.connectors import MemoryStore
from kvplug.errors import PayloadError

KEY = "ab" * 32
X = (torch.randn(2, 2, 40, 2, 32, generator=torch.Generator().manual_seed(3)) * 2).to(torch.bfloat16)
SECRET = "correct horse battery staple, 2026"
CASES_PER_CODEC = 2300  # x 9 codecs = 20,700 forged-checksum cases per run


def reseal(p: bytearray) -> bytes:
    """Recompute the xxh3 trailer: what a writer that is not kvplug (or a bug) could store."""
    body = bytes(p[: len(p) - fr.CHECKSUM_LEN])
    return body + xxhash.xxh3_64_digest(body)


def header_offsets(p: bytes) -> tuple[int, int, int]:
    """(start of meta, start of body, end of body) of an unkeyed frame."""
    ndim = p[7]
    meta_len, body_len = struct.unpack_from("<IQ", p, 12)
    meta = fr._HEADER.size + 8 * ndim
    return meta, meta + meta_len, meta + meta_len + body_len


def mutate(p: bytes, rng: np.random.Generator) -> bytes:
    """Flip, overwrite, cut or grow the body (header lengths fixed up), or rewrite the metadata; then reseal."""
    meta_start, body_start, body_end = header_offsets(p)
    out = bytearray(p[: len(p) - fr.CHECKSUM_LEN])
    op = rng.integers(0, 5)
    if op == 0:  # bit flips in the body
        for _ in range(int(rng.integers(1, 5))):
            i = int(rng.integers(body_start, body_end))
            out[i] ^= int(rng.integers(1, 256))
    elif op == 1:  # a run of random bytes in the body
        i = int(rng.integers(body_start, body_end))
        n = int(rng.integers(1, 64))
        out[i : i + n] = rng.integers(0, 256, size=min(n, body_end - i), dtype=np.uint8).tobytes()
    elif op in (2, 3):  # cut or grow the body and fix the header's body length
        body = bytes(out[body_start:body_end])
        if op == 2:
            body = body[: int(rng.integers(0, len(body)))]
        else:
            body = body + rng.integers(0, 256, size=int(rng.integers(1, 256)), dtype=np.uint8).tobytes()
        out = out[:body_start] + body
        struct.pack_into("<Q", out, 16, len(body))
    else:  # rewrite the codec metadata (scale dtypes, extra keys) and fix its length
        choices = [b'{"params":{}}', b'{"scale":"f64"}', b"[]", b'{"params":' + p[meta_start + 10 : body_start]]
        meta = choices[int(rng.integers(0, len(choices)))]
        out = out[:meta_start] + meta + out[body_start:]
        struct.pack_into("<I", out, 12, len(meta))
    return reseal(out + bytes(fr.CHECKSUM_LEN))


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_forged_checksums_never_raise_or_blow_up(name):
    codec = get_codec(name)
    payload = codec.encode(X, key=KEY)
    original = codec.decode(payload, key=KEY)
    rng = np.random.default_rng(CODEC_NAMES.index(name))
    rss0 = max_rss_mb()
    refused = accepted = 0
    for _ in range(CASES_PER_CODEC):
        data = mutate(payload, rng)
        try:
            y = codec.decode(data, key=KEY, shape=X.shape, dtype=X.dtype)
        except PayloadError:
            refused += 1
            continue
        # the checksum was forged: the tensor may differ, but it is well formed and owns its memory
        accepted += 1
        assert y.shape == X.shape and y.dtype == X.dtype
        y.add_(0)
    assert refused + accepted == CASES_PER_CODEC and refused > 0
    assert max_rss_mb() - rss0 < 256, "decoding hostile payloads grew memory"
    assert torch.equal(codec.decode(payload, key=KEY), original)


def test_decompression_bombs_are_refused_before_allocating():
    n = fr.tensor_nbytes(X.shape, X.dtype)
    bomb = lz4.frame.compress(bytes(1 << 30), store_size=False)  # ~4 MB inflating to 1 GiB
    liar = lz4.frame.compress(bytes(n), store_size=True)
    liar = liar[:6] + struct.pack("<Q", 1 << 40) + liar[14:]  # declares 1 TiB of content
    zbomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 28))
    cases = [
        (get_codec("lz4", shuffle=False), bomb),
        (get_codec("lz4", shuffle=False), liar),
        (get_codec("zstd", shuffle=False), zbomb),
        (get_codec("cachegen"), struct.pack("<Q", len(zbomb)) + zbomb),
    ]
    rss0 = max_rss_mb()
    for codec, body in cases:
        payload = fr.pack(codec.codec_id, X.dtype, X.shape, {"params": codec.params()}, [body], KEY)
        t0 = time.perf_counter()
        with pytest.raises(PayloadError):
            codec.decode(payload, key=KEY, shape=X.shape, dtype=X.dtype)
        assert time.perf_counter() - t0 < 2.0, codec.name
    assert max_rss_mb() - rss0 < 256
    # a frame declaring a huge tensor is refused from its header alone
    with pytest.raises(PayloadError, match="exceeds"):
        huge = fr.pack(1, torch.float32, (1, 1), {"params": {}}, [b""], KEY)
        huge = bytearray(huge)
        struct.pack_into("<QQ", huge, fr._HEADER.size, 1 << 30, 1 << 30)
        get_codec("raw").decode(reseal(huge), key=KEY)


def test_a_checksum_valid_but_undecodable_entry_is_a_counted_miss_and_deleted():
    ns = Namespace(model="m", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_dim=32, chunk_size=40, codec="zstd")
    store = MemoryStore()
    cache = KVCache(store, ns)
    tokens = list(range(40))
    assert cache.put(tokens, X) == 1
    key = cache.chunks(tokens)[0].prefix_key
    p = bytearray(store.get(key))
    _, body_start, body_end = header_offsets(bytes(p))
    p[body_start:body_end] = b"\x28\xb5\x2f\xfd" + bytes(body_end - body_start - 4)  # zstd magic, garbage frame
    store.put(key, reseal(p))
    assert cache.get(tokens) == [None]  # no ZstdError escapes
    assert cache.payload_errors == {"corrupt": 1}
    assert store.exists_many([key]) == [False]  # deleted: the next request recomputes instead of failing again


def test_authenticated_payloads():
    ns = Namespace(model="m", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_dim=32, chunk_size=40)
    store = MemoryStore()
    tokens = list(range(40))
    keyed = KVCache(store, ns, secret=SECRET)
    assert keyed.put(tokens, X) == 1
    assert torch.equal(keyed.get(tokens)[0], X)
    assert SECRET not in repr(keyed.payloads.mac_key) and SECRET not in repr(keyed.namespace)
    key = keyed.chunks(tokens)[0].prefix_key
    # another secret, or none, derives other keys: never a hit, never a fight over the same entries
    assert KVCache(store, ns, secret=SECRET + "!").lookup(tokens) == 0
    assert KVCache(store, ns).lookup(tokens) == 0
    # a writer without the secret (it can write Redis, it cannot compute the MAC) forges an entry: refused
    forged = get_codec("raw").encode(torch.zeros_like(X), key=key)
    store.put(key, forged)
    assert keyed.get(tokens) == [None] and keyed.payload_errors == {"auth": 1}
    # a keyed frame with a flipped body byte, resealed with a recomputed MAC under a guessed key: refused
    wrong = get_codec("raw").encode(torch.zeros_like(X), key=key, mac_key=fr.MacKey.from_secret("x" * 32))
    store.put(key, wrong)
    assert keyed.get(tokens) == [None] and keyed.payload_errors == {"auth": 2}
    # a reader without a secret refuses authenticated frames (it cannot check them)
    good = get_codec("raw").encode(X, key=KEY, mac_key=fr.MacKey.from_secret(SECRET))
    with pytest.raises(PayloadError, match="auth"):
        get_codec("raw").decode(good, key=KEY)
    # tampering with an authenticated frame is caught for every byte position class
    for i in (5, 40, len(good) // 2, len(good) - 1):
        bad = bytearray(good)
        bad[i] ^= 1
        with pytest.raises(PayloadError):
            get_codec("raw").decode(bytes(bad), key=KEY, mac_key=fr.MacKey.from_secret(SECRET))
    with pytest.raises(ValueError, match="at least 16 bytes"):
        fr.MacKey.from_secret("short")
