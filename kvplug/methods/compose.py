"""Composition: evict first, then quantize (or prune key channels of) what is kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from kvplug.errors import ConfigError
from kvplug.methods.base import (
    INDEX_BYTES,
    CompressedLayer,
    DecodeState,
    Evictor,
    KVMethod,
    LayerKV,
    Transform,
    _checked,
    gather_tokens,
)


@dataclass
class Composed(KVMethod):
    """``evictor`` then ``transform`` on the kept tokens; ``name`` is ``"evictor+transform"``."""

    evictor: Evictor
    transform: Transform

    def __post_init__(self) -> None:
        if not isinstance(self.evictor, Evictor):
            raise ConfigError(f"compose: the first method must be an Evictor, got {type(self.evictor).__name__}")
        if not isinstance(self.transform, Transform):
            raise ConfigError(f"compose: the second method must be a Transform, got {type(self.transform).__name__}")
        self.name = f"{self.evictor.name}+{self.transform.name}"  # type: ignore[misc]

    @property
    def whole_model(self) -> bool:  # type: ignore[override]
        return self.evictor.whole_model

    @property
    def supports_decode(self) -> bool:  # type: ignore[override]
        return self.evictor.supports_decode

    @property
    def needs_replay(self) -> bool:  # type: ignore[override]
        return self.evictor.needs_replay

    @property
    def uses_attention_sums(self) -> bool:  # type: ignore[override]
        return self.evictor.uses_attention_sums

    @property
    def query_window(self) -> int | None:
        a, b = self.evictor.query_window, self.transform.query_window
        return None if a is None or b is None else max(a, b)

    def params(self) -> dict[str, Any]:
        out = {f"{self.evictor.name}.{k}": v for k, v in self.evictor.params().items()}
        out.update({f"{self.transform.name}.{k}": v for k, v in self.transform.params().items()})
        return out

    def compress(self, layers: Sequence[LayerKV]) -> list[CompressedLayer]:
        layers = _checked(layers)
        out = []
        for la, ev in zip(layers, self.evictor.compress(layers), strict=True):
            kept = LayerKV(
                ev.keys,
                ev.values,
                queries=la.queries,
                layer_idx=la.layer_idx,
                num_layers=la.num_layers,
                rope=la.rope,
                scaling=la.scaling,
                positions=_kept_positions(la, ev.indices),
            )
            c = self.transform.apply(kept, ev.keep)
            visible = int(ev.kept.sum())
            indexed = visible < la.batch * la.heads * la.length
            nbytes = c.nbytes + (INDEX_BYTES * visible if indexed else 0)
            out.append(CompressedLayer(c.keys, c.values, ev.keep, nbytes, ev.indices, ev.scores))
        return out

    # decode-time eviction is the evictor's; new tokens stay unquantized until the engine requantizes
    def new_state(self, budget: int | None = None, prefill: CompressedLayer | None = None) -> DecodeState:
        return self.evictor.new_state(budget, prefill)

    def decode_select(self, layer: LayerKV, state: DecodeState) -> Tensor:
        return self.evictor.decode_select(layer, state)


def _kept_positions(layer: LayerKV, indices: Tensor | None) -> Tensor | None:
    if indices is None:
        return layer.positions
    pos = layer.key_positions()
    if pos.ndim == 1:
        return pos[indices.clamp_min(0)]
    return gather_tokens(pos.expand(layer.batch, layer.heads, -1), indices.clamp_min(0))


def compose(evictor: Evictor, transform: Transform) -> Composed:
    """A method that evicts with ``evictor`` and then applies ``transform`` (a quantizer or ThinK)."""
    return Composed(evictor, transform)
