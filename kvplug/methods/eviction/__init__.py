"""Token eviction methods (each registers itself by name)."""

from kvplug.methods.eviction.baselines import KeyDiff, Knorm, Random, Recent, StreamingLLM
from kvplug.methods.eviction.cake import CAKE
from kvplug.methods.eviction.expected import ExpectedAttention
from kvplug.methods.eviction.h2o import H2O, Scissorhands
from kvplug.methods.eviction.kvzip import KVzip
from kvplug.methods.eviction.razor import RazorAttention, classify_heads, probe_scores
from kvplug.methods.eviction.snapkv import PyramidKV, SnapKV
from kvplug.methods.eviction.tova import TOVA

__all__ = [
    "CAKE",
    "H2O",
    "KVzip",
    "ExpectedAttention",
    "KeyDiff",
    "Knorm",
    "PyramidKV",
    "Random",
    "RazorAttention",
    "Recent",
    "Scissorhands",
    "SnapKV",
    "StreamingLLM",
    "TOVA",
    "classify_heads",
    "probe_scores",
]
