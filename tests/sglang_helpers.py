"""SGLang pieces for the HiCache backend tests, run on CPU with ``sglang==0.5.23`` installed ``--no-deps``.

SGLang's host pool class ``MHATokenToKVPoolHost`` cannot be imported on a CPU-only machine: its package imports
``sglang.srt.configs``, which imports torchvision (no CPU build exists here), and its constructor needs the GPU
pool's pointer tables. So :func:`host_pool` builds a stand-in whose page methods (``get_data_page``,
``get_dummy_flat_data_page``, ``set_from_flat_data_page``) are SGLang's own source, taken from the installed
``mha.py`` with ``ast`` and executed unchanged, over a CPU buffer with the shape SGLang's ``init_kv_buffer``
allocates for each layout. Everything else in the tests (backend factory, storage config, page hashes) is real
SGLang code.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Any

import torch

LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
PAGE_METHODS = ("get_data_page", "get_dummy_flat_data_page", "set_from_flat_data_page")


@functools.cache
def _mha_page_methods() -> dict[str, Any]:
    spec = importlib.util.find_spec("sglang")
    assert spec is not None and spec.origin is not None
    src_path = Path(spec.origin).parent / "srt" / "mem_cache" / "pool_host" / "mha.py"
    tree = ast.parse(src_path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MHATokenToKVPoolHost")
    funcs = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in PAGE_METHODS]
    assert sorted(f.name for f in funcs) == sorted(PAGE_METHODS), "SGLang's MHA host pool changed its page methods"
    module = ast.Module(body=funcs, type_ignores=[])
    namespace: dict[str, Any] = {"torch": torch}
    exec(compile(module, str(src_path), "exec"), namespace)
    return {name: namespace[name] for name in PAGE_METHODS}


def host_pool(
    layout: str,
    layers: int = 3,
    heads: int = 2,
    head_dim: int = 8,
    page_size: int = 4,
    pages: int = 16,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A CPU host pool with SGLang's page methods for ``layout`` (see the module docstring)."""
    cls = type("MHATokenToKVPoolHost", (), dict(_mha_page_methods()))
    pool = cls()
    size = pages * page_size
    dims = {
        "layer_first": (2, layers, size, heads, head_dim),
        "page_first": (2, size, layers, heads, head_dim),
        "page_first_direct": (2, pages, layers, page_size, heads, head_dim),
        "page_head": (2, pages, heads, page_size, layers, head_dim),
    }[layout]
    pool.__dict__.update(
        layout=layout,
        layer_num=layers,
        head_num=heads,
        head_dim=head_dim,
        v_head_dim=head_dim,
        page_size=page_size,
        size=size,
        page_num=pages,
        dtype=dtype,
        device="cpu",
        pin_memory=False,
        kv_buffer=torch.zeros(dims, dtype=dtype),
    )
    return pool


def token_pages(pool: Any, page_indices: list[int]) -> torch.Tensor:
    """Host indices (one per token) of the given pages, as SGLang's controller passes them."""
    ps = pool.page_size
    return torch.cat([torch.arange(p * ps, (p + 1) * ps) for p in page_indices])
