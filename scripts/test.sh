#!/usr/bin/env bash
# Fresh machine -> the whole test suite (slow tests included), with a real redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if ! command -v redis-server >/dev/null 2>&1; then
  echo "[test] installing redis-server (Debian package)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
PY=${PYTHON:-python3}
exec "$PY" -m pytest "$@"
