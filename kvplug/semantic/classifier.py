"""Query classifier: keyword/regex rules first (in policy order), then the nearest labelled examples.

A category's score is the mean cosine similarity of its ``classifier.top_k`` closest ``examples`` (embedded once
at start-up). A query whose best score is below ``classifier.min_similarity`` (or a policy without examples) goes
to the default category. Rules and patterns only ever read the first ``max_chars`` characters of a query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from kvplug.semantic.policy import Policy


@dataclass(frozen=True)
class Classification:
    category: str
    source: str  # "rule", "examples" or "default"
    score: float = 0.0


class CategoryClassifier:
    """Built from a policy and the embeddings of its examples (``example_vectors[name]`` -> ``[n, dim]``)."""

    def __init__(self, policy: Policy, example_vectors: dict[str, np.ndarray], max_chars: int = 4096) -> None:
        self.policy = policy
        self.default = policy.default_category
        self.min_similarity = policy.classifier.min_similarity
        self.top_k = policy.classifier.top_k
        self.max_chars = max_chars
        self._rules: list[tuple[str, re.Pattern[str]]] = []
        for cat in policy.categories.values():
            for kw in cat.keywords:
                self._rules.append((cat.name, re.compile(r"(?<!\w)" + re.escape(kw) + r"(?!\w)", re.IGNORECASE)))
            for pat in cat.patterns:
                self._rules.append((cat.name, re.compile(pat, re.IGNORECASE)))
        self._names: list[str] = []
        self._examples: list[np.ndarray] = []
        for name, vecs in example_vectors.items():
            if len(vecs):
                self._names.append(name)
                self._examples.append(np.asarray(vecs, dtype=np.float32))

    @staticmethod
    def examples(policy: Policy) -> dict[str, list[str]]:
        return {name: list(cat.examples) for name, cat in policy.categories.items() if cat.examples}

    def scores(self, vector: np.ndarray) -> dict[str, float]:
        """Each category's mean similarity to its ``top_k`` nearest examples."""
        v = np.asarray(vector, dtype=np.float32)
        out = {}
        for name, ex in zip(self._names, self._examples, strict=True):
            sims = ex @ v
            k = min(self.top_k, len(sims))
            out[name] = float(np.sort(sims)[-k:].mean())
        return out

    def classify(self, text: str, vector: np.ndarray | None) -> Classification:
        text = text[: self.max_chars]
        for name, rx in self._rules:
            if rx.search(text):
                return Classification(name, "rule", 1.0)
        if vector is None or not self._names:
            return Classification(self.default, "default")
        scores = self.scores(vector)
        best = max(scores, key=scores.__getitem__)
        if scores[best] < self.min_similarity:
            return Classification(self.default, "default", scores[best])
        return Classification(best, "examples", scores[best])
