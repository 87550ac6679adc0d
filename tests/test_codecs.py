import struct

import pytest
import torch

from kvplug.codec import CODEC_NAMES, get_codec
from kvplug.codec import frame as fr
from kvplug.codec.quant import pack_bits, unpack_bits
from kvplug.errors import ConfigError, PayloadError

KEY = "ab" * 32
LOSSLESS = ("raw", "zstd", "lz4")


def kv(tokens=70, layers=3, heads=2, dim=40, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(layers, 2, tokens, heads, dim, generator=g) * (torch.rand(dim, generator=g) * 4 + 0.1)
    x[:, 0, :, :, 3] += 20  # an outlier key channel, as real models have
    return x.to(dtype)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 31, 70, 256])
def test_round_trip_shape_dtype_and_fresh_memory(name, dtype, tokens):
    x = kv(tokens, dtype=dtype)
    c = get_codec(name)
    p = c.encode(x, key=KEY)
    y = c.decode(p, key=KEY, shape=x.shape, dtype=dtype)
    assert y.shape == x.shape and y.dtype == dtype
    if name in LOSSLESS:
        assert torch.equal(y, x)
    y.add_(1)  # decoded tensors are owned: modifying one never changes the payload
    assert torch.equal(c.decode(p, key=KEY), c.decode(p, key=KEY))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_kivi_error_bound_per_group(bits):
    x = kv(64, dim=48, dtype=torch.float32)  # 2 heads x 48 = 96 channels = 3 value groups
    y = get_codec(f"int{bits}").decode(get_codec(f"int{bits}").encode(x))
    levels = (1 << bits) - 1
    # keys: groups of 32 tokens per channel; error <= half a step of that group's range (+ fp16 rounding slack)
    k = x[:, 0].reshape(3, 2, 32, -1)
    step_k = (k.amax(2, keepdim=True) - k.amin(2, keepdim=True)) / levels
    assert ((y[:, 0].reshape(3, 2, 32, -1) - k).abs() <= step_k * 0.51 + 1e-3).all()
    # values: groups of 32 channels per token
    v = x[:, 1].reshape(3, 64, -1, 32)
    step_v = (v.amax(3, keepdim=True) - v.amin(3, keepdim=True)) / levels
    assert ((y[:, 1].reshape(3, 64, -1, 32) - v).abs() <= step_v * 0.51 + 1e-3).all()


def test_kivi_keys_per_channel_beat_per_token_on_outlier_channels():
    x = kv(64, dtype=torch.float32)
    y = get_codec("int4").decode(get_codec("int4").encode(x))
    err_outlier_channel = (y[:, 0, :, :, 3] - x[:, 0, :, :, 3]).abs().max()
    # per-channel grouping keeps the +20 outlier channel from widening other channels' steps
    assert (y[:, 0, :, :, 0] - x[:, 0, :, :, 0]).abs().max() < err_outlier_channel + 1.0


def test_fp8_relative_error_per_vector():
    x = kv(32, dtype=torch.float32)
    y = get_codec("fp8").decode(get_codec("fp8").encode(x))
    amax = x.abs().amax(-1, keepdim=True)
    assert ((y - x).abs() <= amax * 2**-4 + 1e-6).all()  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("level,bound", [(1, 0.35), (2, 0.2), (3, 0.1)])
def test_cachegen_levels_trade_size_for_error(level, bound):
    x = kv(256, dtype=torch.float32)
    c = get_codec("cachegen", quant_level=level)
    p = c.encode(x)
    y = c.decode(p)
    assert float((y - x).norm() / x.norm()) < bound
    assert len(p) < x.numel() * 2 / 2.5  # well below bf16 size


def test_sizes_shrink_with_bits():
    x = kv(256, dim=64)
    sizes = {n: len(get_codec(n).encode(x)) for n in ("raw", "fp8", "int8", "int4", "int2")}
    assert sizes["raw"] > sizes["int8"] > sizes["int4"] > sizes["int2"]
    assert sizes["raw"] / sizes["int4"] > 3.0
    assert sizes["raw"] / sizes["fp8"] > 1.9


def test_pack_bits_round_trip():
    for bits in (2, 4, 8):
        q = torch.randint(0, 1 << bits, (1001,), dtype=torch.uint8)
        assert torch.equal(unpack_bits(pack_bits(q, bits), bits, 1001), q)


# ---- refusal: every doubt is a PayloadError ---------------------------------------------------------------
def test_wrong_key_shape_dtype_codec_params_are_refused():
    x = kv(32)
    p = get_codec("int4").encode(x, key=KEY)
    with pytest.raises(PayloadError, match="key"):
        get_codec("int4").decode(p, key="cd" * 32)
    with pytest.raises(PayloadError, match="shape"):
        get_codec("int4").decode(p, key=KEY, shape=(3, 2, 33, 2, 40))
    with pytest.raises(PayloadError, match="dtype"):
        get_codec("int4").decode(p, key=KEY, dtype=torch.float16)
    with pytest.raises(PayloadError, match="codec"):
        get_codec("raw").decode(p, key=KEY)
    with pytest.raises(PayloadError, match="codec"):
        get_codec("int4", group_size=64).decode(p, key=KEY)


def test_checksum_truncation_version_magic():
    p = bytearray(get_codec("raw").encode(kv(8), key=KEY))
    bad = bytearray(p)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(PayloadError) as e:
        get_codec("raw").decode(bytes(bad))
    assert e.value.kind == "checksum"
    with pytest.raises(PayloadError) as e:
        get_codec("raw").decode(bytes(p[:-1]))
    assert e.value.kind == "truncated"
    v2 = bytearray(p)
    v2[4] = fr.FORMAT_VERSION + 1
    with pytest.raises(PayloadError) as e:
        get_codec("raw").decode(bytes(v2))
    assert e.value.kind == "version"
    with pytest.raises(PayloadError) as e:
        get_codec("raw").decode(b"\x80\x04pickle-bytes-are-never-read" * 4)
    assert e.value.kind == "foreign"


def test_consistent_checksum_but_inconsistent_body_is_refused():
    # a frame whose checksum is right but whose body is too short for its shape (a buggy or hostile writer)
    p = fr.pack(
        5,
        torch.bfloat16,
        (1, 2, 32, 1, 32),
        {"params": {"bits": 4, "group_size": 32}, "k": "f16", "v": "f16"},
        [b"\x00" * 10],
    )
    with pytest.raises(PayloadError) as e:
        get_codec("int4").decode(p)
    assert e.value.kind == "corrupt"
    assert struct.unpack_from("<4s", p)[0] == fr.MAGIC


def test_bad_codec_names_and_params_are_named():
    with pytest.raises(ConfigError, match="unknown codec 'gzip'"):
        get_codec("gzip")
    with pytest.raises(ConfigError, match="bits"):
        get_codec("kivi", bits=3)
    with pytest.raises(ConfigError, match="fixes"):
        get_codec("int4", bits=2)
    with pytest.raises(ConfigError, match="bad parameters"):
        get_codec("fp8", nonsense=1)
    with pytest.raises(ValueError, match="KV tensor"):
        get_codec("int4").encode(torch.zeros(4, 4))
