#!/usr/bin/env bash
# Installs kvtier into the current Python environment. Idempotent: safe to run again.
# Where no torch is present, the CPU build is installed first, so that the open torch range in
# pyproject.toml never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] no torch found: installing the CPU build torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".${extras:+[$extras]}"
