"""Category-aware semantic cache: an OpenAI-compatible proxy in front of vLLM (or any OpenAI server).

A response-level cache after Wang et al., "Category-Aware Semantic Caching" (arXiv 2510.26835): each query is
classified into a category, embedded (all-MiniLM-L6-v2 by default), searched in an in-process HNSW index per
category and, above the category's similarity threshold and within its TTL, answered from Redis, which holds the
documents. Before a hit is served, lexical verification checks that numbers, dates, entities, negation, conversion
direction and opposite words agree between the cached and the new question (per category). Thresholds, TTLs, quotas
and eviction are per category (a YAML policy), and loosen within bounds when the upstream is loaded. Entries are
scoped to model, system prompt, conversation history, generation parameters and tenant, so one tenant's answer is
never served to another.

Modules: ``policy`` (the YAML policy), ``config`` (proxy settings), ``embedder`` (the Embedder protocol and
implementations), ``classifier``, ``verify`` (verification before a hit), ``index`` (hnswlib), ``quota`` (per-
category eviction), ``document`` (the Redis record format), ``store`` (async Redis with a circuit breaker),
``scope`` (request analysis: query, scope, bypass), ``openai_io`` (OpenAI bodies and SSE), ``adaptive`` (load-
adaptive thresholds), ``metrics``, ``cache`` (lookup/insert/rebuild/sweep), ``proxy`` (the aiohttp server), ``cli``
(``kvplug semantic-cache``), ``testing`` (a tiny OpenAI upstream for tests and the benchmark).

Heavy dependencies (aiohttp, hnswlib, sentence-transformers) are imported by the modules that need them, not here.
"""

from __future__ import annotations

from kvplug.semantic.config import SemanticCacheConfig
from kvplug.semantic.policy import DEFAULT_POLICY, CategoryPolicy, Policy, load_policy

__all__ = ["DEFAULT_POLICY", "CategoryPolicy", "Policy", "SemanticCacheConfig", "load_policy"]
