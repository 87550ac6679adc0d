"""vLLM integration. ``register()`` is the ``vllm.general_plugins`` entry point: it runs in every vLLM process
and is idempotent. Without the plugin, use ``"kv_connector_module_path": "kvplug.integrations.vllm.connector"``."""

from __future__ import annotations

import logging

log = logging.getLogger("kvplug.vllm")
CONNECTOR_NAME = "KVPlugConnector"
CONNECTOR_MODULE = "kvplug.integrations.vllm.connector"
SPARSE_BACKEND = "kvplug.integrations.vllm.sparse_backend.SparseCPUAttentionBackend"


def register() -> None:
    """Register ``KVPlugConnector`` with vLLM's connector factory (no-op when already registered)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from kvplug.integrations.vllm._compat import check_version

    _register_sparse_backend()
    _register_blend_models()
    _register_eviction()
    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    check_version()
    KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    log.debug("kvplug: registered %s", CONNECTOR_NAME)


def _register_blend_models() -> None:
    """Llama/Qwen2/Qwen3 resolve to kvplug's blend classes: the stock forward until a request carries a blend plan
    (docs/blending.md). Idempotent; ``KVPLUG_BLEND=off`` leaves vLLM's classes in place."""
    from kvplug.integrations.vllm.blend import register_models

    archs = register_models()
    if archs:
        log.debug("kvplug: blend model classes for %s", ", ".join(archs))


def _register_sparse_backend() -> None:
    """On CPU, ``CPU_ATTN`` becomes kvplug's subclass: the stock backend until a sparse config switches it on
    (docs/sparse.md). Idempotent; ``KVPLUG_SPARSE=off`` leaves vLLM's class in place."""
    import os

    from kvplug.integrations.vllm._compat import override_cpu_attention

    if os.environ.get("KVPLUG_SPARSE", "").strip().lower() in ("off", "0", "false"):
        return
    if override_cpu_attention(SPARSE_BACKEND):
        log.debug("kvplug: CPU_ATTN -> %s", SPARSE_BACKEND)


def _register_eviction() -> None:
    """Register kvplug's eviction KV cache spec and let full-attention layers report it when an engine's config
    asks for eviction (docs/engine-eviction.md); otherwise vLLM's specs are untouched. ``KVPLUG_EVICT=off`` skips
    it."""
    import os

    if os.environ.get("KVPLUG_EVICT", "").strip().lower() in ("off", "0", "false"):
        return
    from kvplug.integrations.vllm.evict import register as register_eviction

    register_eviction()
