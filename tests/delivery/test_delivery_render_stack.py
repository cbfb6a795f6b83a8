"""scripts/render_stack.py: the deployable stack is pinned, complete and secret-safe."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from proxy_app.settings import SettingsError, load_settings
from tests.support.gateway import Gateway

REPO_ROOT = Path(__file__).resolve().parents[2]
RENDER = REPO_ROOT / "scripts" / "render_stack.py"
SHA = "3f2a9c4e5b6d7a8f9e0d1c2b3a4f5e6d7c8b9a0f"
DIGEST = "sha256:" + "ab" * 32
ADMIN_TOKEN = "admin-token-Zq81-never-printed"
UPSTREAM_KEY = "upstream-key-Yw72-never-printed"


def sample_env(**overrides: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "APP_IMAGE": f"ghcr.io/acme/proxy_app:{SHA}",
        "APP_HOST": "api.example.com",
        "QUANTUM_STACK": "proxy-app",
        "HTTP_CLIENT_BASE_URL": "https://upstream.example.com/v2",
        "REDIS_PLACEMENT_CONSTRAINT": "node.labels.redis == true",
        "ADMIN_API_TOKEN": ADMIN_TOKEN,
        "HTTP_CLIENT_API_KEY": UPSTREAM_KEY,
    }
    env.update(overrides)
    return {name: value for name, value in env.items() if value != "<unset>"}


def run_render(env: dict[str, str], output_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RENDER), "--output-dir", str(output_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def render_ok(tmp_path: Path, **overrides: str) -> tuple[dict[str, Any], Path, str]:
    out = tmp_path / "rendered"
    result = run_render(sample_env(**overrides), out)
    assert result.returncode == 0, result.stderr
    stack_file = out / "stack.yml"
    document = yaml.safe_load(stack_file.read_text())
    return document, stack_file, result.stdout + result.stderr


def test_renders_stack_and_project_file_and_prints_only_the_path(tmp_path: Path) -> None:
    out = tmp_path / "rendered"
    result = run_render(sample_env(), out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert (out / "stack.yml").is_file()
    project = yaml.safe_load((out / ".quantum").read_text())
    assert project["compose"] == "stack.yml"


def test_default_output_is_a_new_private_temporary_directory(tmp_path: Path) -> None:
    env = sample_env(TMPDIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, str(RENDER)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    target = Path(result.stdout.strip())
    try:
        assert target.parent == tmp_path
        assert stat.S_IMODE(target.stat().st_mode) == 0o700
        assert stat.S_IMODE((target / "stack.yml").stat().st_mode) == 0o600
    finally:
        shutil.rmtree(target)


def test_app_image_is_pinned_to_the_given_reference(tmp_path: Path) -> None:
    document, _, _ = render_ok(tmp_path)
    assert document["services"]["app"]["image"] == f"ghcr.io/acme/proxy_app:{SHA}"
    labels = document["services"]["app"]["deploy"]["labels"]
    assert labels["org.opencontainers.image.revision"] == SHA


def test_digest_reference_is_accepted_unchanged(tmp_path: Path) -> None:
    image = f"ghcr.io/acme/proxy_app@{DIGEST}"
    document, _, _ = render_ok(tmp_path, APP_IMAGE=image)
    assert document["services"]["app"]["image"] == image


@pytest.mark.parametrize(
    "image",
    [
        "ghcr.io/acme/proxy_app:latest",
        "ghcr.io/acme/proxy_app",
        "ghcr.io/acme/proxy_app:v1.2.3",
        "ghcr.io/acme/proxy_app:main",
        "ghcr.io/acme/proxy_app:3f2a9c4",
    ],
)
def test_mutable_image_tags_are_rejected(tmp_path: Path, image: str) -> None:
    result = run_render(sample_env(APP_IMAGE=image), tmp_path / "out")
    assert result.returncode != 0
    assert "APP_IMAGE" in result.stderr
    assert "mutable" in result.stderr
    assert not (tmp_path / "out" / "stack.yml").exists()


def test_missing_required_variables_are_all_named(tmp_path: Path) -> None:
    env = sample_env(APP_HOST="<unset>", ADMIN_API_TOKEN="<unset>", QUANTUM_STACK="")
    result = run_render(env, tmp_path / "out")
    assert result.returncode == 2
    for name in ("APP_HOST", "ADMIN_API_TOKEN", "QUANTUM_STACK"):
        assert f"{name}: required but not set" in result.stderr
    assert "APP_IMAGE:" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_secrets_are_external_swarm_secrets_read_from_files(tmp_path: Path) -> None:
    document, stack_file, output = render_ok(tmp_path)
    app = document["services"]["app"]
    environment = app["environment"]
    assert "ADMIN_API_TOKEN" not in environment
    assert "HTTP_CLIENT_API_KEY" not in environment
    assert environment["ADMIN_API_TOKEN_FILE"] == "/run/secrets/admin_api_token"
    assert environment["HTTP_CLIENT_API_KEY_FILE"] == "/run/secrets/http_client_api_key"
    references = {ref["source"]: ref for ref in app["secrets"]}
    assert set(references) == {"admin_api_token", "http_client_api_key"}
    for ref in references.values():
        assert ref["target"] == ref["source"]
        assert ref["uid"] == "10001"  # the image's user, who alone may read it
        assert ref["mode"] == 0o400
    declared = document["secrets"]
    assert all(spec["external"] is True for spec in declared.values())
    assert declared["admin_api_token"]["name"].startswith("proxy-app_admin_api_token_")
    assert all(len(spec["name"]) <= 64 for spec in declared.values())
    text = stack_file.read_text()
    for secret in (ADMIN_TOKEN, UPSTREAM_KEY):
        assert secret not in text
        assert secret not in output
    assert "ADMIN_API_TOKEN=set (hidden)" in output
    assert stat.S_IMODE(stack_file.stat().st_mode) == 0o600


def test_secret_names_are_versioned_by_value(tmp_path: Path) -> None:
    """A rotation is a new secret (Swarm secrets are immutable) and so a rolling update; the
    same value keeps its name, so a redeploy changes nothing."""
    first, _, _ = render_ok(tmp_path / "a")
    same, _, _ = render_ok(tmp_path / "b")
    rotated, _, _ = render_ok(tmp_path / "c", ADMIN_API_TOKEN="admin-token-rotated-Kp09")
    name = first["secrets"]["admin_api_token"]["name"]
    assert same["secrets"]["admin_api_token"]["name"] == name
    assert rotated["secrets"]["admin_api_token"]["name"] != name
    upstream = first["secrets"]["http_client_api_key"]["name"]
    assert rotated["secrets"]["http_client_api_key"]["name"] == upstream


def test_secret_names_cannot_be_chosen_from_the_environment(tmp_path: Path) -> None:
    document, _, _ = render_ok(tmp_path, ADMIN_API_TOKEN_SECRET="attacker_chosen")
    assert document["secrets"]["admin_api_token"]["name"] != "attacker_chosen"


def test_invalid_secret_is_reported_without_its_value(tmp_path: Path) -> None:
    result = run_render(sample_env(APP_IMAGE="nope", ADMIN_API_TOKEN=ADMIN_TOKEN), tmp_path / "o")
    assert result.returncode == 2
    assert ADMIN_TOKEN not in result.stdout + result.stderr


def test_unset_optional_secret_is_left_out_of_the_stack(tmp_path: Path) -> None:
    document, _, _ = render_ok(tmp_path, HTTP_CLIENT_API_KEY="<unset>")
    app = document["services"]["app"]
    assert "HTTP_CLIENT_API_KEY_FILE" not in app["environment"]
    assert [ref["source"] for ref in app["secrets"]] == ["admin_api_token"]
    assert list(document["secrets"]) == ["admin_api_token"]


def test_dollar_signs_in_values_are_escaped_for_deploy_time_interpolation(tmp_path: Path) -> None:
    document, _, _ = render_ok(tmp_path, CACHE_BYPASS_PATHS="/pa$$word-${HOME}")
    environment = document["services"]["app"]["environment"]
    assert environment["CACHE_BYPASS_PATHS"] == "/pa$$$$word-$${HOME}"


def test_app_service_has_health_resources_and_safe_rolling_updates(tmp_path: Path) -> None:
    document, _, _ = render_ok(tmp_path)
    app = document["services"]["app"]
    assert "/health/live" in " ".join(app["healthcheck"]["test"])
    deploy = app["deploy"]
    assert deploy["replicas"] >= 2
    for kind in ("limits", "reservations"):
        assert deploy["resources"][kind]["cpus"]
        assert deploy["resources"][kind]["memory"]
    update = deploy["update_config"]
    assert update["parallelism"] == 1
    assert update["order"] == "start-first"
    assert update["failure_action"] == "rollback"
    assert update["monitor"]
    assert deploy["rollback_config"]["parallelism"] == 1
    assert deploy["restart_policy"]["condition"] in {"any", "on-failure"}
    assert app["read_only"] is True


def test_single_replica_is_refused(tmp_path: Path) -> None:
    result = run_render(sample_env(APP_REPLICAS="1"), tmp_path / "out")
    assert result.returncode == 2
    assert "APP_REPLICAS" in result.stderr


def test_traefik_serves_the_host_over_tls_and_redirects_http(tmp_path: Path) -> None:
    document, _, _ = render_ok(tmp_path, APP_HOST="gw.example.org", QUANTUM_STACK="gw")
    app = document["services"]["app"]
    assert "public" in app["networks"]
    assert document["networks"]["public"]["external"] is True
    labels = app["deploy"]["labels"]
    assert labels["traefik.enable"] == "true"
    assert labels["traefik.http.routers.gw-https.rule"] == "Host(`gw.example.org`)"
    assert labels["traefik.http.routers.gw-https.tls"] == "true"
    assert labels["traefik.http.routers.gw-https.tls.certresolver"]
    assert labels["traefik.http.routers.gw-http.middlewares"] == "gw-https-redirect"
    assert labels["traefik.http.middlewares.gw-https-redirect.redirectscheme.scheme"] == "https"
    assert labels["traefik.http.services.gw.loadbalancer.server.port"] == "3000"


def test_only_safe_requests_are_retried_on_another_replica(tmp_path: Path) -> None:
    """A task that went away between Traefik's probes: safe requests are retried elsewhere,
    others never sent twice."""
    document, _, _ = render_ok(tmp_path, APP_HOST="gw.example.org", QUANTUM_STACK="gw")
    labels = document["services"]["app"]["deploy"]["labels"]
    safe = "traefik.http.routers.gw-https-safe"
    assert labels[f"{safe}.rule"] == (
        "Host(`gw.example.org`) && (Method(`GET`) || Method(`HEAD`) || Method(`OPTIONS`))"
    )
    assert labels[f"{safe}.middlewares"] == "gw-retry"
    assert int(labels["traefik.http.middlewares.gw-retry.retry.attempts"]) >= 2
    assert seconds(labels["traefik.http.middlewares.gw-retry.retry.initialinterval"]) < 1
    # The same entrypoint, TLS, certificate and service as the router for every other method,
    # which has no retries; the longer rule takes precedence over it.
    for suffix in ("entrypoints", "tls", "tls.certresolver", "service"):
        assert labels[f"{safe}.{suffix}"] == labels[f"traefik.http.routers.gw-https.{suffix}"]
    assert "traefik.http.routers.gw-https.middlewares" not in labels
    assert len(labels[f"{safe}.rule"]) > len(labels["traefik.http.routers.gw-https.rule"])


def test_redis_persists_with_aof_and_evicts_only_keys_with_a_ttl(tmp_path: Path) -> None:
    document, _, _ = render_ok(tmp_path)
    redis = document["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1].startswith("volatile-")
    assert command[command.index("--maxmemory") + 1]
    assert "ports" not in redis
    assert redis["networks"] == ["internal"]
    assert any(volume.startswith("redis-data:") for volume in redis["volumes"])
    assert "redis-data" in document["volumes"]
    assert document["networks"]["internal"]["internal"] is True
    assert redis["healthcheck"]["test"]
    assert redis["deploy"]["resources"]["limits"]["memory"]
    assert redis["deploy"]["resources"]["reservations"]["memory"]


def test_eviction_policy_that_could_drop_api_keys_is_refused(tmp_path: Path) -> None:
    result = run_render(sample_env(REDIS_EVICTION_POLICY="allkeys-lru"), tmp_path / "out")
    assert result.returncode == 2
    assert "REDIS_EVICTION_POLICY" in result.stderr


def docker_stack_config(stack_file: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """What Docker's own stack loader makes of the file (its schema and interpolation)."""
    return subprocess.run(
        ["docker", "stack", "config", "-c", str(stack_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(home)},
    )


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker client not installed")
def test_rendered_stack_is_a_valid_swarm_stack(tmp_path: Path) -> None:
    _, stack_file, _ = render_ok(tmp_path, CACHE_BYPASS_PATHS="/pa$$word")
    result = docker_stack_config(stack_file, tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["services"]["app"]["environment"]["CACHE_BYPASS_PATHS"] == "/pa$$word"


# -- the app's own settings schema judges the app's environment ------------------------------


def rendered_app_environment(
    document: dict[str, Any], *, secrets_inline: bool = True
) -> dict[str, str]:
    """What a task's environment holds once Swarm has interpolated the stack file; with
    secrets_inline, the sample secrets stand where the task reads them from files."""
    environment = document["services"]["app"]["environment"]
    resolved = {name: str(value).replace("$$", "$") for name, value in environment.items()}
    if secrets_inline:
        for name, value in (
            ("ADMIN_API_TOKEN", ADMIN_TOKEN),
            ("HTTP_CLIENT_API_KEY", UPSTREAM_KEY),
        ):
            if resolved.pop(f"{name}_FILE", None):
                resolved[name] = value
    return resolved


# Each of these once rendered fine and then crash-looped every task at start-up.
APP_REFUSES = [
    ("HTTP_CLIENT_BASE_URL", "https://upstream.example.com/v2?tenant=1"),
    ("HTTP_CLIENT_BASE_URL", "https://user:pw@upstream.example.com"),
    ("CACHE_BYPASS_PATHS", "/auth,users/me"),
    ("API_KEYS_REDIS_PREFIX", "api keys"),
    ("API_KEYS_REDIS_PREFIX", "x" * 65),
    ("HTTP_CLIENT_TIMEOUT", "600001"),
    ("PROXY_BODY_LIMIT", str(100 * 1024 * 1024 + 1)),
    ("API_KEYS_RATE_LIMIT_WINDOW_SECONDS", "86401"),
    ("LOG_LEVEL", "verbose"),
    ("CACHE_DEBUG", "maybe"),
    ("DEPLOY_ID", "run 7"),
]
# And these the render used to refuse although the app takes them.
APP_ACCEPTS = [
    ("PROXY_BODY_LIMIT", "0"),
    ("HTTP_CLIENT_TIMEOUT", "600000"),
    ("API_KEYS_REDIS_PREFIX", "tenant:api-keys.v2"),
    ("CACHE_BYPASS_PATHS", "/api/v1/auth, /users/me"),
    ("CACHE_DEBUG", "1"),
    ("LOG_LEVEL", "WARNING"),
]


@pytest.mark.parametrize(("name", "value"), APP_REFUSES, ids=lambda v: str(v)[:24])
def test_settings_the_app_refuses_are_refused_by_the_render_with_the_apps_reason(
    tmp_path: Path, name: str, value: str
) -> None:
    result = run_render(sample_env(**{name: value}), tmp_path / "out")
    assert result.returncode == 2, result.stdout
    assert f"app setting {name}=" in result.stderr
    assert not (tmp_path / "out" / "stack.yml").exists()
    # The reverse direction: the app, given what the stack would have set, refuses it too.
    document, _, _ = render_ok(tmp_path)
    environment = {**rendered_app_environment(document), name: value}
    with pytest.raises(SettingsError):
        load_settings(environment)


@pytest.mark.parametrize(("name", "value"), APP_ACCEPTS, ids=lambda v: str(v)[:24])
def test_settings_the_app_accepts_render_and_load_in_the_app(
    tmp_path: Path, name: str, value: str
) -> None:
    document, _, _ = render_ok(tmp_path, **{name: value})
    environment = rendered_app_environment(document)
    assert environment[name] == value
    load_settings(environment)


def test_the_app_starts_with_exactly_the_rendered_environment(tmp_path: Path) -> None:
    document, _, _ = render_ok(tmp_path, PROXY_BODY_LIMIT="0", ADMIN_API_TOKEN="pa$$word")
    environment = rendered_app_environment(document, secrets_inline=False)
    # Swarm mounts each secret as a file readable by the app's user; so does this test.
    for name, value in (("ADMIN_API_TOKEN", "pa$$word"), ("HTTP_CLIENT_API_KEY", UPSTREAM_KEY)):
        secret_file = tmp_path / name.lower()
        secret_file.write_text(value)
        secret_file.chmod(0o400)
        assert environment[f"{name}_FILE"] == f"/run/secrets/{name.lower()}"
        environment[f"{name}_FILE"] = str(secret_file)
    # Only where it listens and how long it drains differ from a task: a test must not wait
    # out the 20 s drain. Redis (the stack's service name) is not reachable here; the app
    # still starts and reports itself live, as a task does before Redis answers.
    environment.pop("PORT")
    environment["SHUTDOWN_DRAIN_SECONDS"] = "0"
    gateway = Gateway(environment).start()
    try:
        assert requests.get(f"{gateway.url}/health/live", timeout=5).status_code == 200
    finally:
        assert gateway.terminate() == 0


def seconds(duration: str) -> float:
    """A compose duration such as 1s, 500ms or 1m30s in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"([0-9.]+)(ms|h|m|s)", duration)
    assert parts, duration
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def test_a_new_redis_task_is_probed_within_a_second_of_starting(tmp_path: Path) -> None:
    """The new Redis task gets its DNS name at its first passing probe, one interval after it
    starts; every request is 503 until then."""
    document, _, _ = render_ok(tmp_path)
    redis = document["services"]["redis"]
    healthcheck = redis["healthcheck"]
    assert seconds(healthcheck["interval"]) <= 1
    assert seconds(redis["deploy"]["restart_policy"]["delay"]) <= 1
    # Short probes must not make a busy or loading Redis count as unhealthy and be killed.
    assert seconds(healthcheck["interval"]) * healthcheck["retries"] >= 10
    assert seconds(healthcheck["start_period"]) >= 30


def test_traefik_takes_replicas_back_within_half_a_second_of_turning_ready(tmp_path: Path) -> None:
    """After a Redis restart every replica was unready; Traefik serves them again only at its
    next passing probe, so its interval adds to the 503 window (and a stopping replica leaves
    the rotation within one interval)."""
    document, _, _ = render_ok(tmp_path, QUANTUM_STACK="gw")
    labels = document["services"]["app"]["deploy"]["labels"]
    prefix = "traefik.http.services.gw.loadbalancer.healthcheck"
    assert labels[f"{prefix}.path"] == "/health/ready"
    assert seconds(labels[f"{prefix}.interval"]) <= 0.5
    # Longer than the app's readiness can take with Redis slow (two pings of 250 ms): a
    # probe timing out takes the replica out (Traefik 3 allows a timeout above the interval).
    assert 0.5 < seconds(labels[f"{prefix}.timeout"]) <= 1


# -- REDIS_MODE=sentinel: a master, a replica and three sentinels ----------------------------


def test_sentinel_mode_renders_master_replica_and_three_sentinels(tmp_path: Path) -> None:
    document, _, _ = render_ok(
        tmp_path,
        REDIS_MODE="sentinel",
        REDIS_REPLICA_PLACEMENT_CONSTRAINT="node.labels.redis-replica == true",
        REDIS_SENTINEL_DOWN_AFTER_MS="3000",
    )
    services = document["services"]
    assert set(services) == {"app", "redis-1", "redis-2", "sentinel-1", "sentinel-2", "sentinel-3"}
    master, replica = services["redis-1"], services["redis-2"]
    # Both keep what the single Redis has: AOF, maxmemory with volatile-* eviction, limits,
    # stop-first updates; each on its own node with a volume of its own.
    for service, name in ((master, "redis-1"), (replica, "redis-2")):
        command = service["command"]
        assert command[command.index("--appendonly") + 1] == "yes"
        assert command[command.index("--maxmemory-policy") + 1].startswith("volatile-")
        assert command[command.index("--replica-announce-ip") + 1] == name
        assert service["volumes"] == [f"{name}-data:/data"]
        assert service["deploy"]["update_config"]["order"] == "stop-first"
        assert service["networks"] == ["internal"]
    assert "--replicaof" not in master["command"]
    assert replica["command"][-3:] == ["--replicaof", "redis-1", "6379"]
    assert master["deploy"]["placement"]["constraints"] == ["node.labels.redis == true"]
    assert replica["deploy"]["placement"]["constraints"] == ["node.labels.redis-replica == true"]
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        script = services[name]["command"][2]
        assert "'sentinel monitor gateway redis-1 6379 2'" in script
        assert "'sentinel down-after-milliseconds gateway 3000'" in script
        assert f"'sentinel announce-ip {name}'" in script
        assert services[name]["volumes"] == [f"{name}-data:/data"]
        assert services[name]["networks"] == ["internal"]
    url = "redis+sentinel://sentinel-1:26379,sentinel-2:26379,sentinel-3:26379/gateway/0"
    environment = rendered_app_environment(document)
    assert environment["CACHE_REDIS_URL"] == url
    assert environment["API_KEYS_REDIS_URL"] == url
    assert load_settings(environment).cache_redis_url == url
    assert "redis-data" not in document["volumes"]
    assert {f"{n}-data" for n in ("redis-1", "redis-2")} <= set(document["volumes"])


def test_sentinel_mode_needs_a_node_for_the_replica(tmp_path: Path) -> None:
    result = run_render(sample_env(REDIS_MODE="sentinel"), tmp_path / "out")
    assert result.returncode == 2
    assert "REDIS_REPLICA_PLACEMENT_CONSTRAINT: required with REDIS_MODE=sentinel" in result.stderr


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker client not installed")
def test_the_sentinel_stack_is_a_valid_swarm_stack(tmp_path: Path) -> None:
    _, stack_file, _ = render_ok(
        tmp_path,
        REDIS_MODE="sentinel",
        REDIS_REPLICA_PLACEMENT_CONSTRAINT="node.hostname == node-2",
    )
    result = docker_stack_config(stack_file, tmp_path)
    assert result.returncode == 0, result.stderr
