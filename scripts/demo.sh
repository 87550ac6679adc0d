#!/usr/bin/env bash
# Creates .venv, installs kvplug, and runs the demo on the embedded local-disk store (no Redis needed).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh
kvplug demo "$@"
