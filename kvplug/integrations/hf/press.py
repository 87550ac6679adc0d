"""Apply any :mod:`kvplug.methods` method to a transformers (5.x) model: prefill compression, decode eviction.

::

    from kvplug import methods
    from kvplug.integrations.hf import KVPress

    press = KVPress(model, methods.get("snapkv", compression_ratio=0.5))
    with press:
        out = model.generate(**inputs, past_key_values=press.new_cache(), max_new_tokens=32)

How it works: entering swaps the model's attention implementation for ``kvplug``, a thin wrapper around the
one it had (sdpa or eager). During a prefill (a forward that starts from an empty cache) the wrapper records
each full-attention layer's post-RoPE queries (the last ``method.query_window`` of them). When that forward
returns, every full-attention layer's KV goes to ``method.compress`` as :class:`~kvplug.methods.LayerKV` (with
the model's RoPE and softmax scale) and the cache layers are replaced by what the method kept; positions
continue from the original length (:class:`~kvplug.integrations.hf.cache.PrunedLayer`). Pruned layers attend
with their own mask (causal over new tokens, per-head visibility for methods whose heads keep different
counts); sliding-window layers (Gemma-3's local layers) are never compressed. With ``decode=True`` and a method
that supports it, every decode step evicts back to the budget with ``method.decode_select``.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvplug.integrations.hf.cache import PrunedLayer, layer_types, make_cache
from kvplug.methods.attention import accumulated_attention
from kvplug.methods.base import DecodeState, KVMethod, LayerKV, Replay, full_layer
from kvplug.methods.rope import Rope

IMPL = "kvplug"
_ACTIVE: dict[int, KVPress] = {}  # id(model.config) of the text model -> press (attention looks it up)


def _eager(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
    """Attention for pruned layers: ``q [B, Hq, Q, D]``, ``k, v [B, H, K, D]``, additive/bool ``mask``."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _pruned_mask(layer: PrunedLayer, q_len: int, groups: int, device: torch.device) -> Tensor | None:
    """Bool mask ``[B, Hq, Q, K]``: held entries visible per ``keep``; the last ``Q`` entries causal."""
    held = layer.held
    if q_len == 1 and layer.keep is None:
        return None
    old = held - q_len
    cols = torch.arange(held, device=device)
    rows = torch.arange(q_len, device=device)
    causal = (cols.view(1, -1) < old) | (cols.view(1, -1) - old <= rows.view(-1, 1))  # [Q, K]
    mask = causal.view(1, 1, q_len, held)
    if layer.keep is not None:
        keep = layer.keep.to(device).repeat_interleave(groups, dim=1)  # [B, Hq, K]
        mask = mask & keep.unsqueeze(2)
    return mask


def kvplug_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The ``kvplug`` attention implementation (see the module docstring)."""
    press = _ACTIVE.get(id(module.config))
    if press is None:
        raise RuntimeError("kvplug attention called outside a KVPress context")
    return press.attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


AttentionInterface.register(IMPL, kvplug_attention)


def rope_of(model: nn.Module, layer_type: str = "full_attention") -> Rope | None:
    """The model's RoPE (inv_freq, attention scaling) for ``layer_type``, as methods expect it."""
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    rot = getattr(base, "rotary_emb", None)
    if rot is None:
        return None
    inv = getattr(rot, f"{layer_type}_inv_freq", None)
    scaling = getattr(rot, f"{layer_type}_attention_scaling", None)
    if inv is None:
        inv, scaling = getattr(rot, "inv_freq", None), getattr(rot, "attention_scaling", 1.0)
    return None if inv is None else Rope(inv.detach().float().cpu(), float(scaling or 1.0))


class KVPress:
    """Context manager applying ``method`` to ``model`` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        method: KVMethod | None,
        prefill: bool = True,
        decode: bool = False,
        capture_all: bool = False,
        tokenizer: Any = None,
    ) -> None:
        if decode and (method is None or not getattr(method, "supports_decode", False)):
            raise ValueError(f"{getattr(method, 'name', None)} has no decode-time eviction")
        if decode and not prefill:
            raise ValueError("decode eviction starts from the prefill's compression: use prefill=True")
        if method is not None and method.needs_replay and tokenizer is None:
            raise ValueError(f"{method.name} replays the context with a prompt: pass tokenizer= to KVPress")
        self.model = model
        self.method = method
        self.prefill = prefill
        self.decode = decode
        self.capture_all = capture_all  # keep every prefill query (for compressed_copy with several methods)
        self.tokenizer = tokenizer  # encodes the replay prompts of methods such as KVzip
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.types = layer_types(model.config)
        self.full_layers = [i for i, t in enumerate(self.types) if t == "full_attention"]
        self.rope = rope_of(model)
        self._queries: dict[int, Tensor] = {}
        self._scaling: dict[int, float] = {}
        self._cache: DynamicCache | None = None
        self._capturing = False
        self._decode_states: dict[int, DecodeState] = {}
        self._prev_impl: str | None = None
        self._hook: Any = None
        self.last_compressed: list[Any] | None = None  # CompressedLayer per full layer, from the last prefill
        self.prefilled: tuple[DynamicCache, dict, dict] | None = None  # the last prefill's cache, queries, scales
        self._input_ids: list[int] | None = None  # the last prefill's tokens (replays re-read them)
        self._replay_q: dict[int, Tensor] | None = None  # queries captured while a replay runs
        self._replays: dict[tuple, dict[int, list[Replay]]] = {}  # per replay recipe: full layer -> passes
        self._sums: dict[tuple[int, torch.dtype], Tensor] = {}  # shared attention column sums per layer, dtype
        self._shared_s: dict[Any, float] = {}  # seconds each shared item took to compute
        self.last_shared_s = 0.0  # seconds of shared work (replays, sums) the last compressed_copy relied on
        self.last_shared_fresh_s = 0.0  # ... of which it computed itself (the rest came from earlier calls)

    # -- context --------------------------------------------------------------------------------------------------
    def new_cache(self) -> DynamicCache:
        return make_cache(self.model.config)

    def __enter__(self) -> KVPress:
        impl = self.config._attn_implementation
        if impl == IMPL:
            raise RuntimeError("this model is already inside a KVPress")
        self._prev_impl = impl
        self._inner: Callable[..., Any] | None = None if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL, ALL_MASK_ATTENTION_FUNCTIONS[impl])
        _ACTIVE[id(self.config)] = self
        self._set_impl(IMPL)
        self._hook = self.model.register_forward_pre_hook(self._before, with_kwargs=True)
        self._post = self.model.register_forward_hook(self._after, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hook.remove()
        self._post.remove()
        assert self._prev_impl is not None
        self._set_impl(self._prev_impl)
        _ACTIVE.pop(id(self.config), None)

    def _set_impl(self, impl: str) -> None:
        for cfg in {id(c): c for c in (self.model.config, self.config)}.values():
            cfg._attn_implementation = impl

    # -- forward hooks ----------------------------------------------------------------------------------------------
    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values")
        if not isinstance(cache, DynamicCache) or not any(isinstance(la, PrunedLayer) for la in cache.layers):
            raise ValueError("KVPress needs a cache from press.new_cache(): pass past_key_values=press.new_cache()")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError("KVPress does not support padded batches (attention_mask with zeros)")
        self._cache = cache
        fresh = cache.get_seq_length() == 0
        self._capturing = fresh and (self.capture_all or (self.prefill and self.method is not None))
        if self._capturing:
            self._queries.clear()
            self._decode_states.clear()
            self._replays.clear()
            self._sums.clear()
            self._shared_s.clear()
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._input_ids = ids[0].tolist() if isinstance(ids, Tensor) and ids.shape[0] == 1 else None

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._capturing:
            self._capturing = False
            self.prefilled = (self._cache, dict(self._queries), dict(self._scaling))
            if self.prefill and self.method is not None:
                self.compress_cache()

    def prefill_layers(
        self, dtype: torch.dtype | None = None, cache: DynamicCache | None = None, method: KVMethod | None = None
    ) -> list[LayerKV]:
        """The full-attention layers of ``cache`` (default: the current one) as :class:`LayerKV`, with the queries
        captured by the last prefill (and the replays ``method`` needs)."""
        cache = cache if cache is not None else self._cache
        assert cache is not None
        replays = self.replay(method, cache) if method is not None and method.needs_replay else None
        layers = []
        for i in self.full_layers:
            la = cache.layers[i]
            k, v = (la.keys, la.values) if dtype is None else (la.keys.to(dtype), la.values.to(dtype))
            layers.append(
                LayerKV(
                    keys=k,
                    values=v,
                    queries=self._queries.get(i),
                    layer_idx=len(layers),
                    num_layers=len(self.full_layers),
                    rope=self.rope,
                    scaling=self._scaling.get(i),
                    replays=replays[i] if replays is not None else None,
                )
            )
        return layers

    def replay(self, method: KVMethod, cache: DynamicCache | None = None) -> dict[int, list[Replay]]:
        """Run ``method.replay_inputs`` after the last prefill's tokens on its uncompressed KV (KVzip's context
        reconstruction) and return each full layer's :class:`Replay` list; the cache is left as it was. Cached
        per prefill and recipe, so methods sharing one prefill (``compressed_copy``) replay once."""
        cache = cache if cache is not None else self._cache
        if cache is None or self._input_ids is None:
            raise RuntimeError(f"{method.name}: replays need a batch-1 prefill run through this press first")
        if self.tokenizer is None:
            raise ValueError(f"{method.name} replays the context with a prompt: pass tokenizer= to KVPress")
        method = getattr(method, "evictor", method)  # a composed method replays for its evictor
        fields = method.params()
        recipe = tuple((k, v) for k, v in sorted(fields.items()) if k not in ("compression_ratio", "token_budget"))
        if recipe in self._replays:
            self.last_shared_s += self._shared_s[recipe]
            return self._replays[recipe]
        t0 = time.perf_counter()

        def encode(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False).input_ids

        n = len(self._input_ids)
        if any(cache.layers[i].held != n for i in self.full_layers):
            raise RuntimeError(f"{method.name}: replays need the uncompressed prefill ({n} tokens)")
        out: dict[int, list[Replay]] = {i: [] for i in self.full_layers}
        device = next(self.model.parameters()).device
        for start, end, ids in method.replay_inputs(self._input_ids, encode):  # type: ignore[attr-defined]
            saved = {i: copy.deepcopy(la) for i, la in enumerate(cache.layers) if i not in self.full_layers}
            self._replay_q = {}
            try:
                pos = torch.arange(n, n + len(ids), device=device).unsqueeze(0)
                with torch.no_grad():
                    self.model(torch.tensor([ids], device=device), past_key_values=cache, position_ids=pos)
                for i in self.full_layers:
                    la = cache.layers[i]
                    out[i].append(Replay(self._replay_q[i], la.keys[:, :, n:].clone(), start, end))
            finally:
                self._replay_q = None
                for i in self.full_layers:
                    cache.layers[i].truncate(n)
                for i, la in saved.items():
                    cache.layers[i] = la
        self._replays[recipe] = out
        self._shared_s[recipe] = took = time.perf_counter() - t0
        self.last_shared_s += took
        self.last_shared_fresh_s += took
        return out

    def _attention_sums(self, layers: list[LayerKV], dtype: torch.dtype | None) -> None:
        """Attach every prompt query's attention column sums, computed once per prefill and dtype."""
        for i, la in zip(self.full_layers, layers, strict=True):
            if la.queries is None or la.queries.shape[2] != la.length:
                return  # not every query was captured
            key = (i, la.keys.dtype if dtype is None else dtype)
            if key not in self._sums:
                t0 = time.perf_counter()
                acc = accumulated_attention(la.queries, la.keys, la.scale)  # [B, H, G, N]
                self._sums[key] = acc.reshape(la.batch, -1, la.length)
                self._shared_s[key] = took = time.perf_counter() - t0
                self.last_shared_fresh_s += took
            self.last_shared_s += self._shared_s[key]
            la.attention_sums = self._sums[key]

    def compressed_copy(self, method: KVMethod | None, dtype: torch.dtype | None = None) -> tuple[DynamicCache, list]:
        """A new cache holding the current (captured, uncompressed) prefill compressed by ``method``: run one
        prefill with ``capture_all=True``, then compare many methods on the same prompt. ``dtype`` casts the KV
        handed to the method (e.g. bfloat16, as an engine stores it). Returns (cache, CompressedLayer list)."""
        if self.prefilled is None:
            raise RuntimeError("compressed_copy needs a prefill run with capture_all=True first")
        if self.prefill and self.method is not None:
            raise RuntimeError(
                "compressed_copy needs an uncompressed prefill: use KVPress(model, None, capture_all=True)"
            )
        source, self._queries, self._scaling = self.prefilled
        self.last_shared_s = self.last_shared_fresh_s = 0.0
        layers = self.prefill_layers(dtype, source, method)
        for la in layers:
            w = method.query_window if method is not None else 0
            if la.queries is not None and w is not None:
                la.queries = la.queries[:, :, -w:, :] if w > 0 else None
        if method is not None and method.uses_attention_sums:
            self._attention_sums(layers, dtype)
        out = method.compress(layers) if method is not None else [full_layer(la) for la in layers]
        cache = self.new_cache()
        for i, src in enumerate(source.layers):
            if i in self.full_layers:
                c = out[self.full_layers.index(i)]
                dst = cache.layers[i]
                dst.lazy_initialization(src.keys, src.values)
                dst.replace(c.keys, c.values, c.keep)
                dst.logical = src.get_seq_length()
            else:
                cache.layers[i] = copy.deepcopy(src)
        self.last_compressed = out
        self._decode_states.clear()
        return cache, out

    # -- the work ----------------------------------------------------------------------------------------------------
    def compress_cache(self) -> None:
        """Compress every full-attention layer of the current cache with the method (end of prefill)."""
        assert self._cache is not None and self.method is not None
        out = self.method.compress(self.prefill_layers(method=self.method))
        for i, c in zip(self.full_layers, out, strict=True):
            self._cache.layers[i].replace(c.keys, c.values, c.keep)
        self.last_compressed = out
        self._queries.clear()

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
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        layer = self._cache.layers[idx] if self._cache is not None else None
        if self._replay_q is not None and isinstance(layer, PrunedLayer):
            self._replay_q[idx] = query.detach()
        if self._capturing and isinstance(layer, PrunedLayer):
            w = None if self.capture_all else (self.method.query_window if self.method is not None else 0)
            if w is None or w > 0:
                self._queries[idx] = (query if w is None else query[:, :, -w:, :]).detach()
            self._scaling[idx] = scale
        if isinstance(layer, PrunedLayer) and layer.pruned:
            q_len = query.shape[-2]
            if self.decode and q_len == 1:
                key, value = self._evict(idx, layer, query, key, value, scale)
            groups = query.shape[1] // key.shape[1]
            mask = _pruned_mask(layer, q_len, groups, query.device)
            return _eager(module, query, key, value, mask, scale), None
        if self._inner is None:  # the model's own eager attention (Gemma's differs from Llama's)
            eager = sys.modules[type(module).__module__].eager_attention_forward
            return eager(module, query, key, value, attention_mask, scaling=scale, dropout=dropout, **kwargs)
        return self._inner(module, query, key, value, attention_mask, scaling=scale, dropout=dropout, **kwargs)

    def _evict(self, idx: int, layer: PrunedLayer, query: Tensor, key: Tensor, value: Tensor, scale: float):
        method = self.method
        assert method is not None and hasattr(method, "decode_select")
        state = self._decode_states.get(idx)
        if state is None:
            prefill = None
            if self.last_compressed is not None:
                prefill = self.last_compressed[self.full_layers.index(idx)]
            state = method.new_state(prefill=prefill)  # type: ignore[attr-defined]
            self._decode_states[idx] = state
        pos = self.full_layers.index(idx)  # the same layer numbering as the prefill compression
        lk = LayerKV(
            keys=key,
            values=value,
            queries=query,
            layer_idx=pos,
            num_layers=len(self.full_layers),
            rope=self.rope,
            scaling=scale,
        )
        keep = method.decode_select(lk, state)  # type: ignore[attr-defined]  # [B, H, k] ascending
        if keep.shape[-1] == key.shape[-2]:
            return key, value
        gather = keep.unsqueeze(-1).expand(-1, -1, -1, key.shape[-1])
        k2, v2 = key.gather(2, gather), value.gather(2, gather)
        layer.keys, layer.values = k2, v2
        if layer.keep is not None:
            layer.keep = layer.keep.gather(-1, keep)
        return k2, v2


__all__ = ["IMPL", "KVPress", "kvplug_attention", "rope_of"]
