#!/usr/bin/env bash
# Fresh machine -> `kvtier demo` (multi-turn chat on synthetic:small, prefix caching off vs on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec "$PY" -m kvtier.cli demo "$@"
