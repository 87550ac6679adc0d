"""Corrupted, truncated or foreign payloads: a PayloadError (a miss), never another exception or a wrong tensor."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvplug.cache import KVCache
from kvplug.chunks import Namespace
from kvplug.codec import CODEC_NAMES, get_codec
from kvplug.connectors import MemoryStore
from kvplug.errors import PayloadError

KEY = "12" * 32
X = (torch.randn(2, 2, 40, 2, 32, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16)
PAYLOADS = {n: get_codec(n).encode(X, key=KEY) for n in CODEC_NAMES}
DECODED = {n: get_codec(n).decode(p, key=KEY) for n, p in PAYLOADS.items()}


def decode_or_refuse(name: str, data: bytes) -> None:
    try:
        y = get_codec(name).decode(data, key=KEY, shape=X.shape, dtype=X.dtype)
    except PayloadError:
        return
    # a mutation that still decodes must give exactly the original tensor (it only touched nothing that matters)
    assert torch.equal(y, DECODED[name])


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(CODEC_NAMES), data=st.binary(max_size=2048))
def test_random_bytes_are_refused(name, data):
    decode_or_refuse(name, data)


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(CODEC_NAMES),
    flips=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)), min_size=1, max_size=4
    ),
)
def test_bit_flips_are_refused(name, flips):
    p = bytearray(PAYLOADS[name])
    for pos, mask in flips:
        p[pos % len(p)] ^= mask
    decode_or_refuse(name, bytes(p))


@settings(max_examples=1000)
@given(name=st.sampled_from(CODEC_NAMES), cut=st.integers(min_value=0), tail=st.binary(max_size=64))
def test_truncated_or_extended_payloads_are_refused(name, cut, tail):
    p = PAYLOADS[name]
    data = p[: cut % len(p)] + tail
    if data == p:
        return
    decode_or_refuse(name, data)


@settings(max_examples=500)
@given(name=st.sampled_from(CODEC_NAMES), other=st.sampled_from(CODEC_NAMES))
def test_other_codecs_payloads_are_refused_unless_identical_format(name, other):
    if get_codec(name).spec == get_codec(other).spec:
        return
    decode_or_refuse(name, PAYLOADS[other])


def test_kvcache_corrupted_entry_is_a_counted_miss_and_deleted():
    ns = Namespace(model="m", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_dim=32, chunk_size=16, codec="int8")
    store = MemoryStore()
    cache = KVCache(store, ns)
    tokens = list(range(40))
    assert cache.put(tokens, X) == 2
    k0, k1 = (c.prefix_key for c in cache.chunks(tokens))
    bad = bytearray(store.get(k1))
    bad[100] ^= 0x10
    store.put(k1, bytes(bad))
    got = cache.get(tokens)
    assert got[0] is not None and got[1] is None
    assert cache.payload_errors == {"checksum": 1}
    assert store.exists_many([k0, k1]) == [True, False]  # the broken entry is gone
    n, t = cache.prefix(tokens)
    assert n == 16 and t.shape[2] == 16
    # a payload stored under the wrong key (a store mix-up) is refused too
    store.put(k1, store.get(k0))
    assert cache.get(tokens)[1] is None and cache.payload_errors["key"] == 1
