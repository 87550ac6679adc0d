"""RoPE for position-independent KV: move keys stored post-RoPE at their old positions to new ones.

A segment's KV is computed once (at the positions it had then) and reused at other positions. Values carry no
position; keys do, so on load they are turned from ``old_pos`` to ``new_pos``. :func:`rerotate` undoes the rotation
at ``old_pos`` and applies the one at ``new_pos`` with the angles computed exactly as HF transformers computes them
(``float32(positions) * inv_freq``), so the result matches keys the model computes at ``new_pos`` to float32
rounding (a pure delta rotation by ``new_pos - old_pos`` is the same map mathematically, but its float32 angles
differ from the model's by about ``pos * 1e-7`` radians: :func:`delta_rotate` for engines that prefer it).

:func:`rope_for_layer` builds a layer's :class:`~kvplug.methods.rope.Rope` from a transformers config: the plain,
linear, dynamic-NTK, llama3, YaRN and LongRoPE frequency schedules (through transformers' own
``ROPE_INIT_FUNCTIONS``, so they are exactly the model's), partial rotary, and per-layer-type parameters (Gemma-3's
local layers use ``rope_local_base_freq``, its global layers ``rope_theta``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.rope import Rope


def rerotate(k: Tensor, old_pos: Tensor, new_pos: Tensor, rope: Rope, old_rope: Rope | None = None) -> Tensor:
    """Keys stored post-RoPE at ``old_pos`` (``[..., T, D]``, ``T`` positions) rotated to ``new_pos``; float32 out.

    Exact for RoPE types whose rotation composes additively (default, linear, llama3, YaRN, Gemma-3 local/global
    with each layer's own ``rope``). For dynamic NTK the frequencies depend on the sequence length: pass the Rope the
    KV was computed with as ``old_rope`` (it inverts with the old frequencies, then applies ``rope``'s)."""
    old_pos = torch.as_tensor(old_pos, device=k.device)
    new_pos = torch.as_tensor(new_pos, device=k.device)
    if old_pos.shape[-1] != k.shape[-2] or new_pos.shape[-1] != k.shape[-2]:
        raise ValueError(
            f"rerotate: {k.shape[-2]} keys but {old_pos.shape[-1]} old and {new_pos.shape[-1]} new positions"
        )
    if 2 * rope.inv_freq.numel() > k.shape[-1]:
        raise ValueError(f"rerotate: rope rotates {2 * rope.inv_freq.numel()} channels, keys have {k.shape[-1]}")
    same = old_rope is None or (
        old_rope.inv_freq.shape == rope.inv_freq.shape
        and torch.equal(old_rope.inv_freq, rope.inv_freq)
        and old_rope.attention_scaling == rope.attention_scaling
    )
    if same and torch.equal(old_pos.expand_as(new_pos), new_pos):
        return k.float()
    return rope.apply((old_rope or rope).invert(k, old_pos), new_pos)


def delta_rotate(k: Tensor, delta: Tensor | int, rope: Rope) -> Tensor:
    """Keys rotated by ``delta`` positions (``[T]`` or a scalar), without the attention scaling (which the stored keys
    already carry): the one-rotation form engines use. Mathematically equal to :func:`rerotate`; in float32 it
    differs from the model's own keys by about ``position * 1e-7`` relative."""
    delta = torch.as_tensor(delta, device=k.device)
    if delta.ndim == 0:
        delta = delta.expand(k.shape[-2])
    unscaled = Rope(rope.inv_freq, 1.0, rope.interleaved)
    return unscaled.apply(k, delta)


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_type_of(config: Any, layer_idx: int) -> str | None:
    """The layer's type (``full_attention``, ``sliding_attention``, ...) or None when the config has no types."""
    cfg = _text_config(config)
    n = int(cfg.num_hidden_layers)
    if not 0 <= layer_idx < n:
        raise ValueError(f"layer {layer_idx} outside [0, {n})")
    types = getattr(cfg, "layer_types", None)
    return str(types[layer_idx]) if types else None


def _rope_params(cfg: Any, layer_type: str | None) -> tuple[dict[str, Any], str | None]:
    """The layer's RoPE parameter dict and the layer-type key to pass to transformers (None: not nested)."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            return dict(params[layer_type]), layer_type
        if "rope_theta" in params or "rope_type" in params or "type" in params:
            return dict(params), None
    # transformers 4.x configs: rope_theta / rope_scaling / Gemma-3's rope_local_base_freq
    theta = getattr(cfg, "rope_theta", None)
    if layer_type == "sliding_attention" and getattr(cfg, "rope_local_base_freq", None) is not None:
        return {"rope_type": "default", "rope_theta": cfg.rope_local_base_freq}, None
    scaling = dict(getattr(cfg, "rope_scaling", None) or {})
    if theta is None and not scaling:
        raise ConfigError(f"{type(cfg).__name__}: no RoPE parameters (rope_parameters / rope_theta) in the config")
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    scaling.setdefault("rope_theta", theta if theta is not None else 10000.0)
    return scaling, None


def rope_for_layer(config: Any, layer_idx: int, seq_len: int | None = None) -> Rope:
    """Layer ``layer_idx``'s RoPE from a transformers config (inv_freq and attention scaling as the model computes
    them). ``seq_len``: the sequence length for dynamic NTK / LongRoPE, whose frequencies depend on it (transformers
    uses ``max(position) + 1``; LongRoPE picks its long factors past the original length); ignored by the others."""
    cfg = _text_config(config)
    layer_type = layer_type_of(cfg, layer_idx)
    params, nested = _rope_params(cfg, layer_type)
    rope_type = params.get("rope_type", params.get("type", "default"))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if rope_type == "default":
        dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0)))
        theta = float(params["rope_theta"])
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return Rope(inv, 1.0)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # the model's own schedules

    fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    if fn is None:
        raise ConfigError(f"unsupported RoPE type {rope_type!r}; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    kwargs: dict[str, Any] = {"layer_type": nested} if nested is not None else {}
    if rope_type in ("dynamic", "longrope") and seq_len is not None:
        kwargs["seq_len"] = int(seq_len)
    inv, scaling = fn(cfg, None, **kwargs)
    return Rope(inv.detach().float().cpu(), float(scaling or 1.0))


def rope_signature(config: Any) -> tuple[tuple[str, Any], ...]:
    """What of the config's RoPE changes stored keys (for a namespace's ``rope`` field)."""
    cfg = _text_config(config)
    out = []
    for i in range(int(cfg.num_hidden_layers)):
        lt = layer_type_of(cfg, i)
        params, _ = _rope_params(cfg, lt)
        out.append((str(lt or "all"), tuple(sorted((k, str(v)) for k, v in params.items()))))
    return tuple(sorted(set(out)))
