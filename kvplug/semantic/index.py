"""One in-process HNSW index (hnswlib, cosine space) per category: embeddings and integer ids only.

Labels are the documents' 62-bit ids; the documents themselves live in Redis. Removal marks the label deleted and
the slot is reused by the next insertion (``allow_replace_deleted``); the index doubles when full. Every call runs
on the event loop thread (hnswlib is not safe for concurrent add and query), and each takes well under a
millisecond at the sizes a category quota allows.
"""

from __future__ import annotations

from collections.abc import Callable

import hnswlib
import numpy as np

from kvplug.semantic.policy import HnswParams


class VectorIndex:
    def __init__(self, dim: int, params: HnswParams, capacity: int = 256) -> None:
        self.dim = dim
        self.params = params
        self._index = hnswlib.Index(space="cosine", dim=dim)
        self._index.init_index(
            max_elements=max(16, capacity),
            M=params.M,
            ef_construction=params.ef_construction,
            allow_replace_deleted=True,
        )
        self._index.set_ef(params.ef_search)
        self._live: set[int] = set()
        self._deleted = 0  # slots marked deleted and not yet reused

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, label: int) -> bool:
        return label in self._live

    def add(self, label: int, vector: np.ndarray) -> None:
        if label in self._live:
            return
        if self._deleted:
            self._deleted -= 1  # replace_deleted reuses one of them
        elif self._index.get_current_count() >= self._index.get_max_elements():
            self._index.resize_index(self._index.get_max_elements() * 2)
        self._index.add_items(np.asarray(vector, dtype=np.float32).reshape(1, self.dim), [label], replace_deleted=True)
        self._live.add(label)

    def remove(self, label: int) -> bool:
        if label not in self._live:
            return False
        self._index.mark_deleted(label)
        self._live.discard(label)
        self._deleted += 1
        return True

    def search(
        self, vector: np.ndarray, k: int, allowed: Callable[[int], bool] | None = None
    ) -> list[tuple[int, float]]:
        """Up to ``k`` nearest live labels passing ``allowed``, as ``(label, cosine similarity)``, best first."""
        k = min(k, len(self._live), self.params.ef_search)
        q = np.asarray(vector, dtype=np.float32).reshape(1, self.dim)
        while k > 0:
            try:
                labels, dists = self._index.knn_query(q, k=k, filter=allowed)
            except RuntimeError:  # fewer than k labels pass the filter
                k = 1 if k > 1 else 0
                continue
            return [(int(lbl), 1.0 - float(d)) for lbl, d in zip(labels[0], dists[0], strict=True)]
        return []
