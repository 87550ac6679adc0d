"""Engine-agnostic KV methods: eviction, quantization, channel pruning and cross-layer merging on plain tensors.

``get("snapkv", compression_ratio=0.5)`` builds a method by name, ``available()`` lists them, ``"snapkv+kivi"``
composes an evictor with a quantizer. A method's ``compress(layers)`` takes one :class:`LayerKV` per attention
layer and returns one :class:`CompressedLayer` each; decode-time evictors add ``new_state`` / ``decode_select``.
See docs/methods.md.
"""

from kvplug.methods.base import (
    INDEX_BYTES,
    CompressedLayer,
    DecodeState,
    Evictor,
    KVMethod,
    LayerKV,
    Quantizer,
    Replay,
    Transform,
)
from kvplug.methods.budget import allocate, pyramid_budgets, uniform_budget
from kvplug.methods.compose import Composed, compose
from kvplug.methods.eviction import (
    CAKE,
    H2O,
    TOVA,
    ExpectedAttention,
    KeyDiff,
    Knorm,
    KVzip,
    PyramidKV,
    Random,
    RazorAttention,
    Recent,
    Scissorhands,
    SnapKV,
    StreamingLLM,
    classify_heads,
    probe_scores,
)
from kvplug.methods.minicache import MiniCache
from kvplug.methods.quant import KIVI, Fp8, Int8, KVQuant
from kvplug.methods.registry import available, get, method_class, parameters, register
from kvplug.methods.rope import Rope
from kvplug.methods.think import ThinK

__all__ = [
    "CAKE",
    "H2O",
    "INDEX_BYTES",
    "KIVI",
    "KVzip",
    "TOVA",
    "CompressedLayer",
    "Composed",
    "DecodeState",
    "Evictor",
    "ExpectedAttention",
    "Fp8",
    "Int8",
    "KVMethod",
    "KVQuant",
    "KeyDiff",
    "Knorm",
    "LayerKV",
    "MiniCache",
    "PyramidKV",
    "Quantizer",
    "Random",
    "RazorAttention",
    "Recent",
    "Replay",
    "Rope",
    "Scissorhands",
    "SnapKV",
    "StreamingLLM",
    "ThinK",
    "Transform",
    "allocate",
    "available",
    "classify_heads",
    "compose",
    "get",
    "method_class",
    "parameters",
    "probe_scores",
    "pyramid_budgets",
    "register",
    "uniform_budget",
]
