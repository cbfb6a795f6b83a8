#!/usr/bin/env bash
# Run the service locally: settings from the environment (and .env), Redis at CACHE_REDIS_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
ensure_venv requirements.txt
exec python -m proxy_app
