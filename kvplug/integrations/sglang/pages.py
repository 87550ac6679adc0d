"""SGLang host-pool pages <-> kvplug's canonical chunk layout ``[layers, 2, page_size, heads, head_dim]``.

SGLang's MHA host pool (``MHATokenToKVPoolHost``) keeps one buffer in one of several layouts; a page's data in
each (``get_data_page(index, flat=False)``) is:

==================  ==========================================
layer_first         ``[2, layers, page, heads, dim]``
page_first          ``[2, page, layers, heads, dim]``
page_first_direct   ``[2, 1, layers, page, heads, dim]``
page_head           ``[2, 1, heads, page, layers, dim]``
==================  ==========================================

kvplug stores every page in the canonical layout, so a page written by a server with one host layout loads
into a server with another, and the codecs (which quantize keys per channel and values per token) see the
same axes as in the vLLM connector. Pools this module does not know (MLA, page_unified, hybrid pools) are
stored as opaque bytes under a namespace that names the pool class and layout, so they only ever load into
the same kind of pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_CANONICAL_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")


@dataclass(frozen=True)
class PageGeometry:
    """What a host pool page holds. ``layout`` is SGLang's host layout name."""

    layout: str
    layers: int
    heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    pool_class: str

    @property
    def canonical(self) -> bool:
        """True when pages convert to ``[layers, 2, page, heads, dim]`` (the MHA pool's known layouts)."""
        return self.layout in _CANONICAL_LAYOUTS and self.pool_class in _MHA_POOLS

    @property
    def canonical_shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers, 2, self.page_size, self.heads, self.head_dim)

    @property
    def stored_shape(self) -> tuple[int, ...] | None:
        """Shape of a stored page (None for opaque pages, stored flat in the pool's own order)."""
        return self.canonical_shape if self.canonical else None

    @property
    def host_shape(self) -> tuple[int, ...]:
        """Shape of one page in the host pool's own order."""
        L, H, D, P = self.layers, self.heads, self.head_dim, self.page_size  # noqa: N806
        return {
            "layer_first": (2, L, P, H, D),
            "page_first": (2, P, L, H, D),
            "page_first_direct": (2, 1, L, P, H, D),
            "page_head": (2, 1, H, P, L, D),
        }[self.layout]

    def to_canonical(self, page: torch.Tensor) -> torch.Tensor:
        """A host-order page (view or flat) as a ``[layers, 2, page, heads, dim]`` view (not copied)."""
        p = page.reshape(self.host_shape) if page.dim() == 1 else page
        if self.layout == "layer_first":
            return p.permute(1, 0, 2, 3, 4)
        if self.layout == "page_first":
            return p.permute(2, 0, 1, 3, 4)
        if self.layout == "page_first_direct":
            return p.squeeze(1).permute(1, 0, 2, 3, 4)
        return p.squeeze(1).permute(3, 0, 2, 1, 4)  # page_head: [2, H, P, L, D]

    def from_canonical(self, kv: torch.Tensor) -> torch.Tensor:
        """A canonical page as a view in host order (shape :attr:`host_shape`)."""
        if self.layout == "layer_first":
            return kv.permute(1, 0, 2, 3, 4)
        if self.layout == "page_first":
            return kv.permute(1, 2, 0, 3, 4)
        if self.layout == "page_first_direct":
            return kv.permute(1, 0, 2, 3, 4).unsqueeze(1)
        return kv.permute(1, 3, 2, 0, 4).unsqueeze(1)


# Host pool classes whose page layout the table above describes (K and V of equal head_dim).
_MHA_POOLS = ("MHATokenToKVPoolHost", "HiSparseMHATokenToKVPoolHost")


def geometry_of(pool: Any) -> PageGeometry:
    """Read a host pool's page geometry. MHA pools with ``v_head_dim != head_dim`` are treated as opaque."""
    cls = type(pool).__name__
    head_dim = int(getattr(pool, "head_dim", 0) or 0)
    v_head_dim = int(getattr(pool, "v_head_dim", head_dim) or head_dim)
    return PageGeometry(
        layout=str(getattr(pool, "layout", "unknown")),
        layers=int(getattr(pool, "layer_num", 0) or 0),
        heads=int(getattr(pool, "head_num", 1) or 1),
        head_dim=head_dim,
        page_size=int(getattr(pool, "page_size", 1) or 1),
        dtype=getattr(pool, "dtype", torch.uint8),
        pool_class=cls if v_head_dim == head_dim else f"{cls}[v_head_dim={v_head_dim}]",
    )
