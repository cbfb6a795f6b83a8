#!/usr/bin/env bash
# Run the service locally: settings from the environment (and .env), Redis at CACHE_REDIS_URL.
# Nothing needs to be installed or running first: when no Redis URL is configured and nothing
# answers at the default 127.0.0.1:6379, a private redis-server (installed with apt when
# missing) serves this run on a free loopback port, with its data in .local/redis, and stops
# with the service. A Redis URL that is configured is used as it is, even when it is down.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
ensure_venv requirements.txt

DEFAULT_REDIS_HOST=127.0.0.1
DEFAULT_REDIS_PORT=6379
PRIVATE_REDIS_DIR=.local/redis

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Whether the service was told where Redis is, in its environment or in .env (which the
# service reads too; the environment wins, so either counts).
redis_configured() {
  if [ -n "${CACHE_REDIS_URL:-}" ] || [ -n "${API_KEYS_REDIS_URL:-}" ]; then
    return 0
  fi
  [ -f .env ] && grep -Eq '^[[:space:]]*(export[[:space:]]+)?(CACHE|API_KEYS)_REDIS_URL=[^[:space:]#]' .env
}

answers() {
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

free_loopback_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

if redis_configured || answers "$DEFAULT_REDIS_HOST" "$DEFAULT_REDIS_PORT"; then
  exec python -m proxy_app
fi

if ! command -v redis-server >/dev/null 2>&1; then
  echo "run.sh: redis-server not found: installing it with apt" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server >/dev/null
fi

mkdir -p "$PRIVATE_REDIS_DIR"
port=$(free_loopback_port)
# setsid: out of the terminal's process group, so that Ctrl-C reaches the service, which
# then finishes with Redis still there; this script stops Redis afterwards.
setsid redis-server --bind 127.0.0.1 --port "$port" --dir "$PWD/$PRIVATE_REDIS_DIR" \
  --appendonly yes --save "" --logfile "$PWD/$PRIVATE_REDIS_DIR/redis.log" </dev/null &
redis_pid=$!
# shellcheck disable=SC2317 # called by the EXIT trap
stop_redis() {
  kill -TERM "$redis_pid" 2>/dev/null || true
  wait "$redis_pid" 2>/dev/null || true
}
trap stop_redis EXIT
for _ in $(seq 100); do
  answers 127.0.0.1 "$port" && break
  kill -0 "$redis_pid" 2>/dev/null || {
    echo "run.sh: the private redis-server did not start; see $PRIVATE_REDIS_DIR/redis.log" >&2
    exit 1
  }
  sleep 0.1
done
echo "run.sh: no Redis at $DEFAULT_REDIS_HOST:$DEFAULT_REDIS_PORT and none configured: started a private redis-server on 127.0.0.1:$port (data in $PRIVATE_REDIS_DIR), stopped when the service stops" >&2
export CACHE_REDIS_URL="redis://127.0.0.1:$port/0"

python -m proxy_app &
app_pid=$!
# The service decides how to stop (SIGTERM drains); this script only passes signals on.
trap 'kill -TERM "$app_pid" 2>/dev/null || true' TERM
trap 'kill -INT "$app_pid" 2>/dev/null || true' INT
set +e
wait "$app_pid"
status=$?
# A trapped signal interrupts `wait`; wait again for the service's own exit status.
while kill -0 "$app_pid" 2>/dev/null; do
  wait "$app_pid"
  status=$?
done
set -e
exit "$status"
