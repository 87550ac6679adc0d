"""The semantic cache: classify, search the category's HNSW index within the request's scope, fetch from Redis.

Lookup: embed the query, classify it and compute its verification features (all on the embedding worker thread,
off the event loop; a query longer than the embedder's window is a bypass), then search the category's index,
and every other category's index holding entries of the same scope, for the nearest entries. A candidate from the
query's own category needs the category's effective threshold; one from another category needs the stricter of
the two thresholds, passes the union of both categories' verification checks and the shorter TTL (so a paraphrase
classified differently from its original can still hit, never more loosely than either category allows). The
most similar candidate that reaches its threshold, passes verification (:mod:`kvplug.semantic.verify`), whose
document still exists in Redis (else the label is dropped from the index) and whose age is within the TTL (else
the document is deleted) is the hit. Insert: store the document in Redis with expiry ``max_ttl`` (the longest the
adaptive policy may keep it), add it to the index, then evict within the category quota.

``sync()`` reconciles the in-memory side with Redis: it loads every document the index does not know (start-up
rebuild, or entries written by another proxy) and drops index entries whose document is gone (expired, evicted
elsewhere, Redis flushed). It runs at start-up and every ``sweep_interval_s``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvplug.errors import PayloadError, StoreError
from kvplug.semantic.adaptive import LoadController
from kvplug.semantic.classifier import CategoryClassifier
from kvplug.semantic.document import CacheDocument
from kvplug.semantic.embedder import AsyncEmbedder
from kvplug.semantic.index import VectorIndex
from kvplug.semantic.metrics import SemanticMetrics
from kvplug.semantic.policy import CategoryPolicy, Policy
from kvplug.semantic.quota import CategoryEntries, Entry
from kvplug.semantic.scope import RequestInfo
from kvplug.semantic.store import DocStore
from kvplug.semantic.verify import CHECKS, QueryFeatures, Verifier

log = logging.getLogger("kvplug.semantic")
_EXAMPLE_VECTORS: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}  # (embedder, example texts) -> vectors


@dataclass
class Lookup:
    status: str  # "hit", "miss" or "bypass"
    reason: str = ""
    category: str = ""
    vector: np.ndarray | None = None
    similarity: float = -1.0  # best same-scope similarity seen (-1: no candidate)
    threshold: float = 1.0
    doc: CacheDocument | None = None
    features: QueryFeatures | None = None
    refused: str = ""  # the verification check that refused the best candidate above its threshold


@dataclass(frozen=True)
class _Candidate:
    similarity: float
    category: str  # where the entry lives
    label: int
    threshold: float
    checks: tuple[str, ...]
    ttl: float


class SemanticCache:
    def __init__(
        self,
        policy: Policy,
        embedder: AsyncEmbedder,
        store: DocStore,
        metrics: SemanticMetrics,
        load: LoadController,
        candidates: int = 8,
        dedup_similarity: float = 0.995,
        clock: Callable[[], float] = time.time,
        verifier: Verifier | None = None,
    ) -> None:
        self.policy = policy
        self.embedder = embedder
        self.store = store
        self.metrics = metrics
        self.load = load
        self.candidates = candidates
        self.dedup_similarity = dedup_similarity
        self.clock = clock
        vocab = getattr(embedder.embedder, "vocabulary", None) if isinstance(embedder, AsyncEmbedder) else None
        self.verifier = verifier or Verifier(vocabulary=vocab or None)
        self.classifier: CategoryClassifier | None = None
        self._features: dict[int, QueryFeatures] = {}
        self._indexes: dict[str, VectorIndex] = {}
        self._entries = {name: CategoryEntries(c.eviction) for name, c in policy.categories.items()}
        self._scope_of: dict[int, str] = {}
        self._scope_counts: Counter[tuple[str, str]] = Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.synced = False

    # ---- set-up ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Build the classifier (embeds the policy's examples), then rebuild the index from Redis."""
        examples = CategoryClassifier.examples(self.policy)
        texts = [t for ts in examples.values() for t in ts]
        key = (self.embedder.name, tuple(texts))
        vecs = _EXAMPLE_VECTORS.get(key)
        if vecs is None:
            vecs = await self.embedder.embed_many(texts)
            if texts:  # kept for the next proxy of this process (tests, benchmarks): a few policies at most
                while len(_EXAMPLE_VECTORS) >= 4:
                    del _EXAMPLE_VECTORS[next(iter(_EXAMPLE_VECTORS))]
                _EXAMPLE_VECTORS[key] = vecs
        by_cat, i = {}, 0
        for name, ts in examples.items():
            by_cat[name] = vecs[i : i + len(ts)]
            i += len(ts)
        self.classifier = CategoryClassifier(self.policy, by_cat, self.verifier.max_chars)
        clf, verifier = self.classifier, self.verifier
        self.embedder.post = lambda text, vec: (clf.classify(text, vec), verifier.features(text))
        self.embedder.clear()
        try:
            await self.sync()
        except StoreError as e:
            log.warning("semantic cache: Redis unavailable at start-up (%s); the index is rebuilt when it is back", e)

    def _index(self, category: str) -> VectorIndex:
        idx = self._indexes.get(category)
        if idx is None:
            cap = min(self.policy.categories[category].max_entries + 16, 4096)
            idx = self._indexes[category] = VectorIndex(self.embedder.dim, self.policy.hnsw, capacity=cap)
        return idx

    def _allowed(self, scope: str) -> Callable[[int], bool]:
        scope_of = self._scope_of
        return lambda label: scope_of.get(label) == scope

    # ---- entries -----------------------------------------------------------------------------------------
    def _add(self, category: str, entry: Entry, vector: np.ndarray, features: QueryFeatures | None) -> None:
        self._index(category).add(entry.doc_id, vector)
        if features is not None:
            self._features[entry.doc_id] = features
        self._scope_of[entry.doc_id] = entry.scope
        self._scope_counts[(category, entry.scope)] += 1

    def _unindex(self, category: str, doc_id: int) -> None:
        idx = self._indexes.get(category)
        if idx is not None:
            idx.remove(doc_id)
        self._features.pop(doc_id, None)
        scope = self._scope_of.pop(doc_id, None)
        if scope is not None:
            key = (category, scope)
            self._scope_counts[key] -= 1
            if self._scope_counts[key] <= 0:
                del self._scope_counts[key]

    def forget(self, category: str, doc_id: int, reason: str) -> Entry | None:
        """Drop one entry from the index and the quota accounting (not from Redis)."""
        self._unindex(category, doc_id)
        entry = self._entries[category].remove(doc_id)
        if entry is not None:
            self.metrics.evictions.labels(category, reason).inc()
        return entry

    def _enforce_quota(self, category: str) -> list[str]:
        """Evict within the category quota; returns the Redis keys to delete."""
        cat = self.policy.categories[category]
        keys = []
        for victim in self._entries[category].over_quota(cat.max_entries, cat.max_bytes):
            self._unindex(category, victim.doc_id)
            self.metrics.evictions.labels(category, "quota").inc()
            keys.append(victim.key)
        return keys

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run a background job (an insert, a delete) and keep a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("semantic cache background job failed: %r", task.exception())

    async def drain(self) -> None:
        """Wait for pending inserts and deletes (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _delete_quietly(self, keys: list[str]) -> None:
        try:
            await self.store.delete(keys)
        except StoreError:
            pass  # they expire anyway

    # ---- lookup and insert ---------------------------------------------------------------------------------
    def _candidates(self, info: RequestInfo, vec: np.ndarray, cat: CategoryPolicy, pressure: float) -> list[_Candidate]:
        """Same-scope candidates of every category index, most similar first, each with the threshold, checks and
        TTL that apply to it."""
        own = self.load.effective(cat, pressure)
        out: list[_Candidate] = []
        for name, other in self.policy.categories.items():
            n = self._scope_counts.get((name, info.scope), 0)
            if not n:
                continue
            if name == cat.name:
                thr, checks, ttl = own.threshold, cat.verify, own.ttl
            else:
                eff = self.load.effective(other, pressure)
                thr, ttl = max(own.threshold, eff.threshold), min(own.ttl, eff.ttl)
                checks = tuple(c for c in CHECKS if c in cat.verify or c in other.verify)
            for label, sim in self._index(name).search(vec, min(self.candidates, n), self._allowed(info.scope)):
                out.append(_Candidate(sim, name, label, thr, checks, ttl))
        out.sort(key=lambda c: -c.similarity)
        return out

    async def lookup(self, info: RequestInfo) -> Lookup:
        if not self.store.available:
            return Lookup("bypass", reason="redis_unavailable")
        t0 = time.perf_counter()
        emb = await self.embedder.analyze(info.query)
        if not emb.fits:  # the model would not see the whole question: two such questions could look identical
            return Lookup("bypass", reason="too_long")
        assert self.classifier is not None and emb.extra is not None, "start() first"
        classification, features = emb.extra
        vec = emb.vector
        cat = self.policy.category(classification.category)
        pressure = self.load.pressure()
        eff = self.load.effective(cat, pressure)
        lk = Lookup("miss", category=cat.name, vector=vec, threshold=eff.threshold, features=features)
        found = self._candidates(info, vec, cat, pressure)
        if found:
            lk.similarity = found[0].similarity
            self.metrics.similarity.labels(cat.name).observe(max(0.0, found[0].similarity))
        now = self.clock()
        for c in found:
            if c.similarity < c.threshold:
                continue
            if c.checks:
                stored = self._features.get(c.label)
                why = "missing" if stored is None else self.verifier.mismatch(features, stored, c.checks)
                if why:
                    self.metrics.verify_refused.labels(cat.name, why).inc()
                    lk.refused = lk.refused or why
                    continue
            try:
                raw = await self.store.fetch(c.category, c.label)
            except StoreError:
                self.metrics.lookup_seconds.labels("bypass").observe(time.perf_counter() - t0)
                return Lookup("bypass", reason="redis_unavailable", category=cat.name, similarity=lk.similarity)
            if raw is None:
                self.forget(c.category, c.label, "missing")
                continue
            try:
                doc = CacheDocument.from_fields(c.label, c.category, raw)
            except PayloadError as e:
                self.metrics.payload_errors.labels(e.kind).inc()
                self.forget(c.category, c.label, "corrupt")
                self.spawn(self._delete_quietly([self.store.key(c.category, c.label)]))
                continue
            if doc.scope != info.scope or doc.endpoint != info.endpoint:  # never serve across scopes
                self.metrics.payload_errors.labels("scope").inc()
                self.forget(c.category, c.label, "corrupt")
                continue
            if now - doc.created > c.ttl:
                if c.category == cat.name:  # too old for its own category: gone for everyone
                    self.forget(c.category, c.label, "expired")
                    self.spawn(self._delete_quietly([self.store.key(c.category, c.label)]))
                continue
            self._entries[c.category].touch(c.label, now)
            lk.status, lk.doc, lk.similarity = "hit", doc, c.similarity
            break
        self.metrics.lookup_seconds.labels(lk.status).observe(time.perf_counter() - t0)
        return lk

    async def insert(self, info: RequestInfo, lk: Lookup, response: dict[str, Any]) -> bool:
        """Store a miss's answer (``{"choices": [...], "model": ..., "usage": ...}``) under the lookup's category."""
        if lk.status != "miss" or lk.vector is None:
            return False
        cat = self.policy.categories[lk.category]
        idx = self._index(cat.name)
        if self._scope_counts.get((cat.name, info.scope)):
            near = idx.search(lk.vector, 1, self._allowed(info.scope))
            if near and near[0][1] >= self.dedup_similarity:
                self.metrics.not_stored.labels("duplicate").inc()
                return False
        now = self.clock()
        expire = cat.ttl_ceiling if self.load.params.enabled else cat.ttl
        doc = CacheDocument(
            doc_id=secrets.randbits(62) | 1,
            category=cat.name,
            scope=info.scope,
            prompt=info.query,
            model=info.model,
            endpoint=info.endpoint,
            created=now,
            ttl=self.load.effective(cat).ttl,
            max_ttl=expire,
            embedder=self.embedder.name,
            response=response,
            embedding=lk.vector,
        )
        nbytes = doc.nbytes
        if cat.max_bytes and nbytes > cat.max_bytes:
            self.metrics.not_stored.labels("too_large").inc()
            return False
        try:
            await self.store.put(doc, expire)
        except StoreError:
            self.metrics.not_stored.labels("redis").inc()
            return False
        key = self.store.key(cat.name, doc.doc_id)
        entry = Entry(doc.doc_id, key, info.scope, now, now, 0, nbytes)
        self._entries[cat.name].add(entry)
        self._add(cat.name, entry, lk.vector, lk.features or self.verifier.features(info.query))
        self.metrics.inserts.labels(cat.name).inc()
        victims = self._enforce_quota(cat.name)
        if victims:
            await self._delete_quietly(victims)
        return True

    # ---- reconcile with Redis ------------------------------------------------------------------------------
    async def sync(self) -> int:
        """Load documents missing from the index; drop index entries whose document is gone. Returns loaded."""
        # entries indexed before the scan starts were in Redis before it started: SCAN returns each of them
        # that still exists (an entry inserted meanwhile may be missed by the scan, so it is not judged)
        before = [(name, e.doc_id, e.key) for name, entries in self._entries.items() for e in entries]
        keys = set(await self.store.scan_keys())
        for name, doc_id, key in before:
            if key not in keys:
                self.forget(name, doc_id, "missing")
        known = {e.key for entries in self._entries.values() for e in entries}
        new = [k for k in keys if k not in known]
        loaded, corrupt = 0, []
        fresh: dict[str, list[tuple[Entry, np.ndarray]]] = {}
        async for key, raw in self.store.fetch_many(new):
            parsed = self.store.parse_key(key)
            if parsed is None or parsed[0] not in self._entries:
                continue  # another policy's category: left alone, it expires
            cat, doc_id = parsed
            if doc_id in self._entries[cat]:
                continue
            try:
                doc = CacheDocument.from_fields(doc_id, cat, raw)
            except PayloadError as e:
                self.metrics.payload_errors.labels(e.kind).inc()
                corrupt.append(key)
                continue
            if doc.embedder != self.embedder.name or doc.embedding is None or doc.embedding.size != self.embedder.dim:
                continue  # embedded by another model: useless here
            last = doc.last_hit or doc.created
            entry = Entry(doc_id, key, doc.scope, doc.created, last, doc.hits, doc.nbytes)
            fresh.setdefault(cat, []).append((entry, doc.embedding, self.verifier.features(doc.prompt)))
        victims: list[str] = []
        for cat, items in fresh.items():
            self._entries[cat].add_sorted([e for e, _, _ in items])
            for e, vec, feats in items:
                self._add(cat, e, vec, feats)
            loaded += len(items)
            victims += self._enforce_quota(cat)
        if corrupt or victims:
            await self._delete_quietly(corrupt + victims)
        self.synced = True
        return loaded

    # ---- introspection -------------------------------------------------------------------------------------
    def size(self, category: str | None = None) -> int:
        if category is not None:
            return len(self._entries[category])
        return sum(len(e) for e in self._entries.values())

    def update_gauges(self) -> None:
        m = self.metrics
        pressure = self.load.pressure()
        m.pressure.set(pressure)
        ewma = self.load.latency_ewma()
        m.latency_ewma.set(-1.0 if ewma is None else ewma)
        q = self.load.queue_waiting()
        m.queue.set(-1.0 if q is None else q)
        m.redis_up.set(1.0 if self.store.up else 0.0)
        for name, cat in self.policy.categories.items():
            eff = self.load.effective(cat, pressure)
            m.threshold.labels(name).set(eff.threshold)
            m.ttl.labels(name).set(eff.ttl)
            m.entries.labels(name).set(len(self._entries[name]))
            m.entry_bytes.labels(name).set(self._entries[name].nbytes)
