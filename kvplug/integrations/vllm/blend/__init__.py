"""Blending in vLLM: reuse stored document KV at any position, repaired by selective recompute (docs/blending.md).

``register_models()`` (called by the plugin) makes the supported architectures resolve to kvplug's subclasses;
they behave exactly like vLLM's own until a request carries a blend plan. ``KVPLUG_BLEND=off`` skips it.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("kvplug.vllm.blend")
MODELS_MODULE = "kvplug.integrations.vllm.blend.models"
#: architecture -> kvplug class (kept here too so registration needs no vLLM model import)
ARCHITECTURES = {
    "LlamaForCausalLM": "BlendLlamaForCausalLM",
    "Qwen2ForCausalLM": "BlendQwen2ForCausalLM",
    "Qwen3ForCausalLM": "BlendQwen3ForCausalLM",
}


def enabled_by_env() -> bool:
    return os.environ.get("KVPLUG_BLEND", "").strip().lower() not in ("off", "0", "false")


def register_models() -> list[str]:
    """Register the blend model classes (idempotent); returns the architectures now served by kvplug."""
    if not enabled_by_env():
        return []
    from kvplug.integrations.vllm._compat import register_model_class

    done = []
    for arch, cls in ARCHITECTURES.items():
        if register_model_class(arch, f"{MODELS_MODULE}:{cls}"):
            done.append(arch)
    return done


def supports(architecture: str) -> bool:
    return architecture in ARCHITECTURES
