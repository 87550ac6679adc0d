"""Query classifier: keyword/regex rules first (in policy order), then the nearest category centroid.

Each category's centroid is the normalised mean embedding of its labelled ``examples`` in the policy. A query whose
best centroid similarity is below ``classifier.min_similarity`` (or a policy without examples) goes to the default
category.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from kvplug.semantic.policy import Policy


@dataclass(frozen=True)
class Classification:
    category: str
    source: str  # "rule", "centroid" or "default"
    score: float = 0.0


class CategoryClassifier:
    """Built from a policy and the embeddings of its examples (``example_vectors[name]`` -> ``[n, dim]``)."""

    def __init__(self, policy: Policy, example_vectors: dict[str, np.ndarray]) -> None:
        self.policy = policy
        self.default = policy.default_category
        self.min_similarity = policy.classifier.min_similarity
        self._rules: list[tuple[str, re.Pattern[str]]] = []
        for cat in policy.categories.values():
            for kw in cat.keywords:
                self._rules.append((cat.name, re.compile(r"(?<!\w)" + re.escape(kw) + r"(?!\w)", re.IGNORECASE)))
            for pat in cat.patterns:
                self._rules.append((cat.name, re.compile(pat, re.IGNORECASE)))
        names, rows = [], []
        for name, vecs in example_vectors.items():
            if len(vecs):
                c = np.asarray(vecs, dtype=np.float32).mean(axis=0)
                rows.append(c / max(float(np.linalg.norm(c)), 1e-12))
                names.append(name)
        self._names = names
        self._centroids = np.stack(rows) if rows else np.zeros((0, 1), dtype=np.float32)

    @staticmethod
    def examples(policy: Policy) -> dict[str, list[str]]:
        return {name: list(cat.examples) for name, cat in policy.categories.items() if cat.examples}

    def classify(self, text: str, vector: np.ndarray | None) -> Classification:
        for name, rx in self._rules:
            if rx.search(text):
                return Classification(name, "rule", 1.0)
        if vector is None or not self._names:
            return Classification(self.default, "default")
        sims = self._centroids @ np.asarray(vector, dtype=np.float32)
        best = int(np.argmax(sims))
        score = float(sims[best])
        if score < self.min_similarity:
            return Classification(self.default, "default", score)
        return Classification(self._names[best], "centroid", score)
