"""Sparse decode attention on a transformers (5.x) model: the HF path of :mod:`kvplug.methods.sparse`.

::

    from kvplug.integrations.hf.sparse import SparseAttention
    from kvplug.methods import sparse

    with SparseAttention(model, sparse.Quest(budget=512)):
        out = model.generate(**inputs, max_new_tokens=32)

Entering swaps the model's attention implementation for ``kvplug_sparse``, a wrapper around the one it had. A
forward that starts from an empty cache (the prefill) runs the original attention. In every later forward, each
query token of a full-attention layer attends to the units the method selects (plus the tail), exactly as a
decode step would: so a forward over several tokens after the prefill is a teacher-forced run of that many
decode steps (how the benchmarks score answers). Units are summarised from the cache as they complete; the unit
defaults to the method's paper granularity (Quest's page, the hierarchical block, one token for SentenceKV).
Sliding-window layers (Gemma-3's local layers) keep their own attention. Batch size 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvplug.integrations.hf.cache import layer_types
from kvplug.methods import sparse
from kvplug.methods.sparse.attention import attend_contiguous, attend_gathered, gather_selected

IMPL = "kvplug_sparse"
_ACTIVE: dict[int, SparseAttention] = {}


def paper_unit(method: sparse.SparseMethod) -> int:
    """The selection granule each paper uses: Quest's page, LLSA's block, one token for SentenceKV."""
    if isinstance(method, sparse.Quest):
        return method.page_size
    if isinstance(method, sparse.HierarchicalTopK):
        return method.block_size
    return 1


def kvplug_sparse_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The ``kvplug_sparse`` attention implementation (see the module docstring)."""
    sa = _ACTIVE.get(id(module.config))
    if sa is None:
        raise RuntimeError("kvplug_sparse attention called outside a SparseAttention context")
    return sa.attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


AttentionInterface.register(IMPL, kvplug_sparse_attention)


class HostKVLayer(DynamicLayer):
    """A full-attention cache layer whose KV lives in host memory (SentenceKV's memory saving): the device holds
    only the method's summaries, and each step fetches the selected units. On CPU the host is the device, so the
    same code path runs on the host copy."""

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, torch.device("cpu")
        self.keys = torch.empty(0, dtype=self.dtype)
        self.values = torch.empty(0, dtype=self.dtype)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states.to("cpu")], dim=-2)
        self.values = torch.cat([self.values, value_states.to("cpu")], dim=-2)
        return self.keys, self.values


class SparseAttention:
    """Context manager running ``method`` in ``model``'s full-attention layers (see the module docstring).
    With ``offload=True`` use :meth:`new_cache`: full-attention KV stays in host memory and every decode step
    fetches only the selected units (``fetched_bytes`` counts them)."""

    def __init__(
        self,
        model: nn.Module,
        method: sparse.SparseMethod,
        unit: int | None = None,
        backend: str = "auto",
        offload: bool = False,
    ) -> None:
        self.model = model
        self.method = method
        self.unit = unit or paper_unit(method)
        self.backend = backend
        self.offload = offload
        self.fetched_bytes = 0
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.types = layer_types(model.config)
        self.states: dict[int, sparse.SparseState] = {}
        self.ids: list[int] = []
        self._inner: Callable[..., Any] | None = None
        self._prev: str | None = None

    def new_cache(self) -> DynamicCache:
        """A ``DynamicCache`` for the model; with ``offload``, its full-attention layers keep KV in host memory."""
        cache = DynamicCache(config=self.model.config)
        if self.offload:
            for i, kind in enumerate(self.types):
                if kind == "full_attention":
                    cache.layers[i] = HostKVLayer()
        return cache

    def __enter__(self) -> SparseAttention:
        impl = self.config._attn_implementation
        if impl == IMPL or id(self.config) in _ACTIVE:
            raise RuntimeError("this model is already inside a SparseAttention (or another kvplug) context")
        self._prev = impl
        self._inner = None if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL, ALL_MASK_ATTENTION_FUNCTIONS[impl])
        _ACTIVE[id(self.config)] = self
        self._set_impl(IMPL)
        self._hook = self.model.register_forward_pre_hook(self._before, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hook.remove()
        assert self._prev is not None
        self._set_impl(self._prev)
        _ACTIVE.pop(id(self.config), None)

    def _set_impl(self, impl: str) -> None:
        for cfg in {id(c): c for c in (self.model.config, self.config)}.values():
            cfg._attn_implementation = impl

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, Tensor):
            raise ValueError("SparseAttention needs input_ids (SentenceKV segments the text by token)")
        if ids.shape[0] != 1:
            raise ValueError(f"SparseAttention runs batch size 1, got {ids.shape[0]}")
        cache = kwargs.get("past_key_values")
        past = 0 if cache is None else cache.get_seq_length()
        if past == 0:
            self.states.clear()
            self.ids = []
        elif past != len(self.ids):
            raise ValueError(
                f"SparseAttention: the cache holds {past} tokens but {len(self.ids)} were seen; for a cache prefilled "
                "outside the context call resume(prompt_ids) first"
            )
        self.ids.extend(int(t) for t in ids[0].tolist())

    def resume(self, ids: list[int]) -> None:
        """Continue from a cache prefilled outside this context: ``ids`` are the tokens it holds."""
        self.states.clear()
        self.ids = [int(t) for t in ids]

    @property
    def stats(self) -> dict[str, int]:
        """Rankings computed and reused (selection cache) over all layers since the last prefill."""
        return {
            "selections": sum(s.selections for s in self.states.values()),
            "reuses": sum(s.reuses for s in self.states.values()),
        }

    def attend(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        scaling: float | None,
        dropout: float,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        idx = module.layer_idx
        q_len, k_len = query.shape[2], key.shape[2]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if self.types[idx] != "full_attention" or q_len == k_len:  # local layers and the prefill: as before
            key, value = key.to(query.device), value.to(query.device)  # a host-memory layer's prefill
            if self._inner is None:
                eager = sys.modules[type(module).__module__].eager_attention_forward
                return eager(module, query, key, value, attention_mask, scaling=scale, dropout=dropout, **kwargs)
            return self._inner(module, query, key, value, attention_mask, scaling=scale, dropout=dropout, **kwargs)
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("SparseAttention: attention logit soft-capping")
        m, u = self.method, self.unit
        st = self.states.get(idx)
        if st is None:  # summaries live with the queries (on the device), the KV may not
            st = self.states[idx] = m.new_state(key.shape[1], key.shape[-1], u, query.device)
        keys, values = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, H, D]
        out = torch.empty(1, q_len, query.shape[1], query.shape[-1], device=query.device, dtype=query.dtype)
        p0 = k_len - q_len
        for i in range(q_len):
            p = p0 + i
            full = p // u  # units completed before this token
            if full > st.n_units:
                a, b = st.n_units * u, full * u
                m.append(st, keys[a:b], values[a:b] if m.needs_values else None, self.ids[a:b])
            tid = self.ids[p] if p < len(self.ids) else None
            sel = m.select(query[0, :, i], st, p + 1, token_id=tid, layer=idx)
            if self.offload or keys.device != query.device:  # fetch only the selected units
                k, v = gather_selected(keys[: p + 1], values[: p + 1], sel, u, st.n_units)
                self.fetched_bytes += (k.numel() + v.numel()) * k.element_size()
                out[0, i] = attend_gathered(query[0, :, i], k.to(query.device), v.to(query.device), sel, scale)
            else:
                out[0, i] = attend_contiguous(
                    query[0, :, i], keys[: p + 1], values[: p + 1], sel, u, st.n_units, scale, self.backend
                )
        return out, None
