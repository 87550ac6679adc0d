#!/usr/bin/env bash
# The kvpress oracle's environment: kvpress 0.5.5 needs transformers < 5.3, kvplug runs a newer one, so the oracle
# gets its own virtualenv. It reuses the calling environment's packages (torch above all) through a .pth file
# placed after its own site-packages: pip installs only what kvpress needs on top (transformers 5.2, tokenizers,
# huggingface-hub, datasets, ...; about 30 s and 300 MB from PyPI), and nothing of the calling environment changes.
# Idempotent. Usage: PYTHON=.venv/bin/python scripts/kvpress-env.sh   (prints the oracle's python)
set -euo pipefail
PY=${PYTHON:-python3}
VENV=${KVPLUG_KVPRESS_VENV:-$HOME/.cache/kvplug/kvpress-0.5.5}
if [ ! -f "$VENV/.complete" ]; then
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  base=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  own=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$base" > "$own/zz_kvplug_base.pth"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q "kvpress==0.5.5" 2>&1 \
    | grep -v -E "dependency (resolver|conflicts)| requires |is ignored" >&2 || true
  "$VENV/bin/python" - <<'EOF'
import importlib.metadata as m
import kvpress, torch, transformers  # noqa: F401
assert m.version("kvpress") == "0.5.5", m.version("kvpress")
major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
assert (major, minor) < (5, 3), transformers.__version__
EOF
  touch "$VENV/.complete"
fi
echo "$VENV/bin/python"
