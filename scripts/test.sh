#!/usr/bin/env bash
# Creates .venv, installs kvplug with its test extras and vLLM (CPU), checks lint, runs the whole test suite.
# The tests start their own Redis servers on free ports; they never touch a Redis already running.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh test,bench,vllm,semantic
install_sglang_cpu
ensure_redis
ruff check .
python -m pytest -q -ra "$@"
