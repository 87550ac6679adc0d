"""TOVA: the current query's attention, averaged over heads, decides for the whole layer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvplug.methods.attention import layer_window_attention
from kvplug.methods.base import Evictor, LayerKV
from kvplug.methods.registry import register


@register("tova")
@dataclass
class TOVA(Evictor):
    """TOVA (Oren et al., "Transformers are Multi-State RNNs", EMNLP'24, arXiv 2401.06104): drop the tokens the
    last query attends to least, averaged over all heads (one choice shared by the layer's heads)."""

    supports_decode = True
    decode_needs_queries = True

    @property
    def query_window(self) -> int | None:
        return 1

    def score(self, layer: LayerKV) -> Tensor:
        probs = layer_window_attention(layer, 1)[:, :, :, -1]  # [B, H, G, N]
        return probs.mean(dim=(1, 2)).unsqueeze(1).expand(-1, layer.heads, -1)
