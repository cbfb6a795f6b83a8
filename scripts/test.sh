#!/usr/bin/env bash
# Every check, from a fresh clone: virtualenv and requirements, redis-server (apt) when missing,
# formatting, lint, types, the test suite, then the delivery checks and the Swarm check.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
ensure_venv requirements-dev.txt

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing it with apt"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server >/dev/null
fi

echo "== ruff format --check"
ruff format --check .
echo "== ruff check"
ruff check .
echo "== mypy"
mypy
echo "== pytest"
pytest "$@"
if [ -f scripts/check_delivery.sh ]; then
  echo "== delivery checks"
  bash scripts/check_delivery.sh
fi
if [ -f scripts/check_swarm.sh ]; then
  # The stack on a real single-node Swarm behind Traefik, on loopback only (about 6 minutes;
  # root for dockerd, with this virtualenv's Python).
  echo "== swarm check"
  as_root env PATH="$PATH" PYTHON="$(command -v python)" bash scripts/check_swarm.sh
fi
