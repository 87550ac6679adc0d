"""Blending: reuse stored segment KV (documents, messages) at any position and repair it by recomputing a few tokens.

Plain torch, no engine imports. :mod:`.rope` moves stored keys to new positions (every RoPE schedule transformers
knows, per layer type); :mod:`.strategies` holds one class per paper (CacheBlend, KVShare, EPIC, Cache-Craft, APE)
plus the ``full`` and ``none`` bounds, built by name with ``get_strategy("cacheblend", recompute_ratio=0.3)``;
:mod:`.segments` keys, stores and verifies segment KV. The HF reference path is
:mod:`kvplug.integrations.hf.blend`. See docs/blending.md.
"""

from kvplug.methods.blend.rope import delta_rotate, layer_type_of, rerotate, rope_for_layer, rope_signature
from kvplug.methods.blend.segments import SegmentKV, SegmentStore, segment_key, tokens_digest
from kvplug.methods.blend.strategies import (
    APE,
    STRATEGIES,
    BlendInput,
    BlendStrategy,
    CacheBlend,
    CacheCraft,
    Epic,
    Full,
    KVShare,
    NoRecompute,
    available,
    corrupt_segments,
    get_strategy,
    relative_deviation,
    token_deviation,
)

__all__ = [
    "APE",
    "STRATEGIES",
    "BlendInput",
    "BlendStrategy",
    "CacheBlend",
    "CacheCraft",
    "Epic",
    "Full",
    "KVShare",
    "NoRecompute",
    "SegmentKV",
    "SegmentStore",
    "available",
    "corrupt_segments",
    "delta_rotate",
    "get_strategy",
    "layer_type_of",
    "relative_deviation",
    "rerotate",
    "rope_for_layer",
    "rope_signature",
    "segment_key",
    "token_deviation",
    "tokens_digest",
]
