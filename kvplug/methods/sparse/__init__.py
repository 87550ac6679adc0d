"""Query-aware sparse attention at decode: keep every token's KV, attend to a budget of them per step.

Engine-agnostic (plain tensors); the vLLM backend (:mod:`kvplug.integrations.vllm.sparse_backend`) and the HF path
(:mod:`kvplug.integrations.hf.sparse`) drive the same classes. ``get("quest", budget=512)`` builds one by name.
See docs/sparse.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvplug.errors import ConfigError
from kvplug.methods.sparse.base import Selection, SparseMethod, SparseState
from kvplug.methods.sparse.hierarchical import HierarchicalTopK
from kvplug.methods.sparse.quest import Quest
from kvplug.methods.sparse.sentence import PUNCTUATION, SentenceKV, sentence_end_ids

METHODS: dict[str, type[SparseMethod]] = {m.name: m for m in (Quest, HierarchicalTopK, SentenceKV)}


def get(name: str, **params: Any) -> SparseMethod:
    """A sparse method by name (``quest``, ``hierarchical``, ``sentencekv``) with its hyperparameters; unknown
    names or parameters are a :class:`~kvplug.errors.ConfigError` that lists the valid ones."""
    cls = METHODS.get(name)
    if cls is None:
        raise ConfigError(f"unknown sparse method {name!r}; known: {sorted(METHODS)}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"sparse method {name!r}: unknown parameter(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**params)
    except TypeError as e:
        raise ConfigError(f"sparse method {name!r}: {e}") from None


__all__ = [
    "METHODS",
    "PUNCTUATION",
    "HierarchicalTopK",
    "Quest",
    "Selection",
    "SentenceKV",
    "SparseMethod",
    "SparseState",
    "get",
    "sentence_end_ids",
]
