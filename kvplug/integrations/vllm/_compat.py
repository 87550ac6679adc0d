"""The few vLLM facts the connector reads beyond the public KV connector API, in one place."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger("kvplug.vllm")
TESTED_VLLM = ("0.32.0",)


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_version() -> bool:
    """Log a clear warning when the installed vLLM is not the version kvplug was tested with."""
    v = vllm_version().split("+")[0]
    if v not in TESTED_VLLM:
        log.warning(
            "kvplug was tested with vLLM %s; found %s. The connector uses the public KV connector API, "
            "but layouts may differ: run `kvplug doctor` and the kvplug tests before relying on it.",
            ", ".join(TESTED_VLLM),
            v,
        )
        return False
    return True


def attention_backend_and_isa(vllm_config: VllmConfig, kv_layer: torch.Tensor) -> tuple[str, str | None]:
    """(attention backend name, CPU ISA or None) of the model's attention layers."""
    ctx = vllm_config.compilation_config.static_forward_context
    names = set()
    for layer in ctx.values():
        backend = getattr(layer, "attn_backend", None)
        if backend is not None and getattr(layer, "kv_cache", None) is not None:
            names.add(backend.get_name())
    if len(names) != 1:
        raise NotImplementedError(f"kvplug: expected one attention backend, found {sorted(names) or 'none'}")
    name = names.pop()
    isa = None
    if name == "CPU_ATTN":
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        cc, mc = vllm_config.cache_config, vllm_config.model_config
        isa = _get_attn_isa(kv_layer.dtype, cc.block_size, mc.get_head_size(), cc.cache_dtype)
    return name, isa
