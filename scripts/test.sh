#!/usr/bin/env bash
# Fresh machine -> the whole test suite (slow tests included), with a real redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if ! command -v redis-server >/dev/null 2>&1 || ! command -v memcached >/dev/null 2>&1; then
  echo "[test] installing redis-server and memcached (Debian packages)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server memcached >/dev/null
fi
PY=${PYTHON:-python3}
exec "$PY" -m pytest "$@"
