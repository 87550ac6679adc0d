"""Out-of-tree model classes for blending, registered over vLLM's own through ``ModelRegistry`` by the plugin
(no fork): one mixin, one thin subclass per architecture family. A step without a blend plan calls the stock
``forward`` unchanged (compiled or not); a step with one runs :func:`kvplug.integrations.vllm.blend.runtime.
blend_forward` eagerly."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from kvplug.integrations.vllm.blend import runtime


class BlendMixin:
    """Selective-recompute forward for requests that carry a blend plan (see :mod:`.runtime`)."""

    kvplug_blend = True

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)  # type: ignore[call-arg]
        self.kvplug_vllm_config = vllm_config

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if runtime.active() and input_ids is not None and intermediate_tensors is None and inputs_embeds is None:
            paged = runtime.paged_cache()
            if paged is not None:
                try:
                    out = runtime.blend_forward(self, input_ids, positions, paged)
                except Exception as e:  # noqa: BLE001 - the stock forward recomputes (and rewrites) every layer's KV
                    runtime.failed(e)
                    out = None
                if out is not None:
                    return out
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)  # type: ignore[misc]


class BlendLlamaForCausalLM(BlendMixin, LlamaForCausalLM):
    """Llama family (Llama 2/3, SmolLM2, Mistral-style configs served by vLLM's Llama class)."""


class BlendQwen2ForCausalLM(BlendMixin, Qwen2ForCausalLM):
    """Qwen2 / Qwen2.5 family."""


class BlendQwen3ForCausalLM(BlendMixin, Qwen3ForCausalLM):
    """Qwen3 family."""
