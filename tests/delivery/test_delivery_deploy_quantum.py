"""scripts/deploy_quantum.py against a fake quantum-cli and a local stand-in public URL.

The fake CLI records each call and "deploys" by writing the image tag from the
rendered stack.yml into a state file; the stand-in server reports that tag as
its /health version, as the real service reports its GIT_SHA.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "scripts" / "deploy_quantum.py"
OLD_SHA = "1" * 40
NEW_SHA = "2" * 40
REPOSITORY = "ghcr.io/acme/proxy_app"
SMOKE_KEY = "smoke-key-Qa91-never-printed"
ADMIN_TOKEN = "admin-token-Zq81-never-printed"
UPSTREAM_KEY = "upstream-key-Yw72-never-printed"

FAKE_CLI = """#!{python}
import hashlib, json, os, pathlib, re, sys
args = sys.argv[1:]
entry = {{"argv": args, "endpoint": os.environ.get("QUANTUM_ENDPOINT"), "image": None}}
def finish(code, message):
    with open(os.environ["FAKE_QUANTUM_LOG"], "a") as handle:
        handle.write(json.dumps(entry) + "\\n")
    print(message, file=sys.stderr if code else sys.stdout)
    sys.exit(code)
if args[:1] == ["stacks"] and os.environ.get("FAKE_QUANTUM_NO_STACKS") == "1":
    finish(1, 'Error: unknown command "stacks" for "quantum-cli"')
if "--wait" in args and os.environ.get("FAKE_QUANTUM_NO_WAIT") == "1":
    finish(2, "flag provided but not defined: -wait")
if args[:2] == ["secrets", "create"]:
    name = args[args.index("--name") + 1]
    entry["secret"] = name
    store = pathlib.Path(os.environ["FAKE_QUANTUM_STATE"] + ".secrets")
    known = json.loads(store.read_text()) if store.exists() else {{}}
    if name in known:
        finish(1, "Error response from daemon: rpc error: secret " + name + " already exists")
    known[name] = hashlib.sha256(sys.stdin.read().encode()).hexdigest()
    store.write_text(json.dumps(known))
    finish(0, name)
if not pathlib.Path(".quantum").is_file():
    finish(3, "no .quantum project file in " + os.getcwd())
stack = pathlib.Path("stack.yml").read_text()
entry["image"] = re.search(r"^    image: (\\S+)$", stack, re.M).group(1)
if os.environ.get("FAKE_QUANTUM_FAIL") == "1":
    finish(1, "Error: the endpoint rejected the stack")
deployment = re.search(r"^      DEPLOY_ID: (\\S+)$", stack, re.M)
state = entry["image"].rsplit(":", 1)[-1]
if deployment:
    state += " " + deployment.group(1).strip("'\\"")
pathlib.Path(os.environ["FAKE_QUANTUM_STATE"]).write_text(state)
finish(0, "stack " + args[-1] + " updated")
"""


@dataclass
class Behaviour:
    """How the stand-in public URL answers."""

    state_file: Path
    stuck_version: str | None = None
    keyed_status: int = 200
    anonymous_status: int = 401
    broken_everywhere: bool = False  # the statuses above apply to every version, not the new
    # Once the fake CLI has deployed, /health answers this "version [deployment]" instead.
    after_deploy: str | None = None
    log_file: Path | None = None
    requests: list[str] = field(default_factory=list)
    # After a deploy, a replica of the release before stays in rotation (round robin with the
    # new one, over every request) until it has answered this many requests.
    old_in_rotation: int = 0
    _turn: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def old_replica_answers(self) -> bool:
        """Whether this request reaches the old replica still in rotation."""
        with self._lock:
            if self.old_in_rotation <= 0 or self._answer()[0] == OLD_SHA:
                return False
            self._turn += 1
            if self._turn % 2 == 0:
                return False
            self.old_in_rotation -= 1
            return True

    def _answer(self) -> list[str]:
        if self.after_deploy is not None and self.log_file and self.log_file.exists():
            return self.after_deploy.split()
        return self.state_file.read_text().split()

    def version(self) -> str:
        if self.stuck_version is not None:
            return self.stuck_version
        return self._answer()[0]

    def deployment(self) -> str | None:
        if self.stuck_version is not None:
            return None
        parts = self._answer()
        return parts[1] if len(parts) > 1 else None


def make_handler(behaviour: Behaviour) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            behaviour.requests.append(self.path)
            old_replica = behaviour.old_replica_answers()
            if self.path == "/health/ready":
                self._send(200, {"status": "ok"})
            elif self.path == "/health" and old_replica:
                self._send(200, {"status": "ok", "version": OLD_SHA, "deployment": None})
            elif self.path == "/health":
                self._send(
                    200,
                    {
                        "status": "ok",
                        "version": behaviour.version(),
                        "deployment": behaviour.deployment(),
                        "redis": {},
                    },
                )
            elif self.path == "/api/v1" or self.path.startswith("/api/v1/"):
                # The broken behaviour belongs to the new version; the old one answers well.
                broken = behaviour.broken_everywhere or behaviour.version() == NEW_SHA
                if self.headers.get("x-api-key") == SMOKE_KEY:
                    self._send(behaviour.keyed_status if broken else 200, {"ok": True})
                else:
                    status = behaviour.anonymous_status if broken else 401
                    self._send(status, {"error": "unauthorized"})
            else:
                self._send(404, {"error": "not_found"})

    return Handler


@dataclass
class Harness:
    tmp_path: Path
    behaviour: Behaviour
    public_url: str
    log_file: Path
    bin_dir: Path

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "TMPDIR": str(self.tmp_path),
            "QUANTUM_ENDPOINT": "cluster-one",
            "QUANTUM_STACK": "proxy-app",
            "APP_IMAGE": f"{REPOSITORY}:{NEW_SHA}",
            "EXPECTED_VERSION": NEW_SHA,
            "PUBLIC_URL": self.public_url,
            "APP_HOST": "api.example.com",
            "HTTP_CLIENT_BASE_URL": "https://upstream.example.com",
            "REDIS_PLACEMENT_CONSTRAINT": "node.labels.redis == true",
            "ADMIN_API_TOKEN": ADMIN_TOKEN,
            "HTTP_CLIENT_API_KEY": UPSTREAM_KEY,
            "SMOKE_API_KEY": SMOKE_KEY,
            "SMOKE_PATH": "/api/v1/pets/1",
            "FAKE_QUANTUM_LOG": str(self.log_file),
            "FAKE_QUANTUM_STATE": str(self.behaviour.state_file),
            "DEPLOY_VERIFY_TIMEOUT_S": "1.5",
            "ROLLBACK_VERIFY_TIMEOUT_S": "1.5",
            "SWARM_ROLLBACK_WAIT_S": "1.5",
            "DEPLOY_POLL_INTERVAL_S": "0.1",
            "DEPLOY_HTTP_TIMEOUT_S": "2",
            "DEPLOY_CLI_TIMEOUT_S": "30",
        }
        env.update(overrides)
        return env

    def deploy(self, **overrides: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(DEPLOY)],
            env=self.env(**overrides),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def all_calls(self) -> list[dict[str, Any]]:
        if not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]

    def calls(self) -> list[dict[str, Any]]:
        """The stack updates."""
        return [call for call in self.all_calls() if call["argv"][:1] != ["secrets"]]

    def secrets(self) -> dict[str, str]:
        """Secret name -> sha256 of the value the fake CLI was given."""
        store = Path(str(self.behaviour.state_file) + ".secrets")
        return dict(json.loads(store.read_text())) if store.exists() else {}


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cli = bin_dir / "quantum-cli"
    cli.write_text(FAKE_CLI.format(python=sys.executable))
    cli.chmod(0o755)
    state_file = tmp_path / "deployed-version"
    state_file.write_text(OLD_SHA)
    behaviour = Behaviour(state_file=state_file, log_file=tmp_path / "quantum-cli.log")
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(behaviour))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Harness(
            tmp_path=tmp_path,
            behaviour=behaviour,
            public_url=f"http://127.0.0.1:{server.server_address[1]}",
            log_file=tmp_path / "quantum-cli.log",
            bin_dir=bin_dir,
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def assert_no_secret_in(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    for secret in (SMOKE_KEY, ADMIN_TOKEN, UPSTREAM_KEY):
        assert secret not in output


def leftover_render_dirs(tmp_path: Path) -> list[Path]:
    return list(tmp_path.glob("proxy-app-stack-*"))


def test_stacks_update_success_exits_zero_without_rollback(harness: Harness) -> None:
    result = harness.deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    calls = harness.calls()
    assert [call["argv"] for call in calls] == [
        ["stacks", "update", "--create", "--wait", "--stack", "proxy-app"]
    ]
    assert calls[0]["endpoint"] == "cluster-one"
    assert calls[0]["image"] == f"{REPOSITORY}:{NEW_SHA}"
    assert "ROLLING BACK" not in result.stdout
    assert "SUCCESS" in result.stdout
    assert_no_secret_in(result)
    assert leftover_render_dirs(harness.tmp_path) == []


def test_smoke_check_uses_the_key_and_expects_401_without_it(harness: Harness) -> None:
    result = harness.deploy()
    assert result.returncode == 0
    assert harness.behaviour.requests.count("/api/v1/pets/1") == 2


def test_cli_without_stacks_falls_back_to_stack_update(harness: Harness) -> None:
    result = harness.deploy(FAKE_QUANTUM_NO_STACKS="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [call["argv"][:2] for call in harness.calls()] == [
        ["stacks", "update"],
        ["stack", "update"],
    ]
    assert harness.calls()[1]["argv"] == [
        "stack",
        "update",
        "--create",
        "--wait",
        "--stack",
        "proxy-app",
    ]
    assert "falling back" in result.stdout
    assert_no_secret_in(result)


def test_cli_without_wait_flag_is_retried_without_it(harness: Harness) -> None:
    result = harness.deploy(FAKE_QUANTUM_NO_WAIT="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert harness.calls()[-1]["argv"] == ["stacks", "update", "--create", "--stack", "proxy-app"]


def test_health_never_reporting_new_version_rolls_back_and_fails(harness: Harness) -> None:
    """/health answers a third release: not the one before, so this deploy rolls back."""
    harness.behaviour.after_deploy = "3" * 40
    result = harness.deploy()
    assert result.returncode == 1
    images = [call["image"] for call in harness.calls()]
    assert images == [f"{REPOSITORY}:{NEW_SHA}", f"{REPOSITORY}:{OLD_SHA}"]
    assert "FAILED at health verification" in result.stdout
    assert "ROLLING BACK" in result.stdout
    assert "SWARM ROLLED BACK" not in result.stdout
    assert "FAILURE" in result.stdout
    assert_no_secret_in(result)
    assert leftover_render_dirs(harness.tmp_path) == []


def test_a_rollback_swarm_already_did_is_reported_and_not_deployed_again(
    harness: Harness,
) -> None:
    """Swarm rolled the update back (the new tasks never turned healthy): /health answers the
    release from before. A second deploy of it would be a second rolling update."""
    harness.behaviour.state_file.write_text(f"{OLD_SHA} run-6-1")
    harness.behaviour.after_deploy = f"{OLD_SHA} run-6-1"
    result = harness.deploy(DEPLOY_ID="run-7-1")
    assert result.returncode == 1
    assert [call["image"] for call in harness.calls()] == [f"{REPOSITORY}:{NEW_SHA}"]
    assert "FAILED at health verification" in result.stdout
    assert "SWARM ROLLED BACK" in result.stdout
    assert "ROLLING BACK" not in result.stdout
    assert f"Swarm had already rolled back to {OLD_SHA}; not deployed again" in result.stdout
    assert "smoke: GET" in result.stdout
    assert_no_secret_in(result)


def test_the_previous_version_under_another_deployment_id_is_not_taken_for_a_swarm_rollback(
    harness: Harness,
) -> None:
    harness.behaviour.state_file.write_text(f"{OLD_SHA} run-6-1")
    harness.behaviour.after_deploy = f"{OLD_SHA} run-5-1"
    result = harness.deploy(DEPLOY_ID="run-7-1")
    assert result.returncode == 1
    assert "SWARM ROLLED BACK" not in result.stdout
    assert [call["image"] for call in harness.calls()][-1] == f"{REPOSITORY}:{OLD_SHA}"


def test_a_smoke_failure_of_a_healthy_new_release_is_rolled_back_by_the_deploy(
    harness: Harness,
) -> None:
    harness.behaviour.keyed_status = 502
    result = harness.deploy()
    assert result.returncode == 1
    assert "SWARM ROLLED BACK" not in result.stdout
    assert f"rolled back by this deploy to {REPOSITORY}:{OLD_SHA}" in result.stdout


@pytest.mark.parametrize(
    ("keyed_status", "passes"),
    [(200, True), (404, True), (308, False), (401, False), (429, False), (502, False)],
)
def test_the_default_smoke_request_passes_whatever_the_upstream_root_answers(
    harness: Harness, keyed_status: int, passes: bool
) -> None:
    harness.behaviour.keyed_status = keyed_status
    env = harness.env()
    del env["SMOKE_PATH"]
    result = subprocess.run(
        [sys.executable, str(DEPLOY)], env=env, capture_output=True, text=True, timeout=60
    )
    assert (result.returncode == 0) is passes, result.stdout
    assert "smoke: GET /api/v1 with the smoke key" in result.stdout


def test_a_chosen_smoke_path_must_answer_2xx(harness: Harness) -> None:
    harness.behaviour.keyed_status = 404
    result = harness.deploy(SMOKE_PATH="/api/v1/pets/1")
    assert result.returncode == 1
    assert "FAILED at smoke check" in result.stdout


@pytest.mark.parametrize(
    ("keyed_status", "anonymous_status"),
    [(502, 401), (401, 401), (200, 200)],
    ids=["keyed-request-fails", "smoke-key-rejected", "anonymous-request-not-rejected"],
)
def test_failed_smoke_check_rolls_back_and_fails(
    harness: Harness, keyed_status: int, anonymous_status: int
) -> None:
    harness.behaviour.keyed_status = keyed_status
    harness.behaviour.anonymous_status = anonymous_status
    result = harness.deploy()
    assert result.returncode == 1
    assert "FAILED at smoke check" in result.stdout
    assert [call["image"] for call in harness.calls()][-1] == f"{REPOSITORY}:{OLD_SHA}"
    assert harness.behaviour.state_file.read_text() == OLD_SHA
    assert "rollback verified" in result.stdout
    assert_no_secret_in(result)


def test_explicit_previous_image_is_the_rollback_target(harness: Harness) -> None:
    harness.behaviour.keyed_status = 500
    previous = f"{REPOSITORY}:{'3' * 40}"
    result = harness.deploy(PREVIOUS_IMAGE=previous)
    assert result.returncode == 1
    assert harness.calls()[-1]["image"] == previous


def test_failed_stack_update_fails_even_when_rollback_fails(harness: Harness) -> None:
    result = harness.deploy(FAKE_QUANTUM_FAIL="1")
    assert result.returncode == 1
    assert "FAILED at deploy" in result.stdout
    assert "rollback deploy failed" in result.stdout
    assert len(harness.calls()) == 2


def test_no_recorded_previous_version_means_no_rollback_but_still_failure(
    harness: Harness,
) -> None:
    harness.behaviour.state_file.write_text("dev")
    harness.behaviour.keyed_status = 500
    result = harness.deploy()
    assert result.returncode == 1
    assert "ROLLBACK NOT POSSIBLE" in result.stdout
    assert len(harness.calls()) == 1


def test_missing_settings_are_named_and_nothing_is_deployed(harness: Harness) -> None:
    env = harness.env()
    del env["SMOKE_API_KEY"]
    del env["QUANTUM_ENDPOINT"]
    result = subprocess.run(
        [sys.executable, str(DEPLOY)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "QUANTUM_ENDPOINT" in result.stderr
    assert "SMOKE_API_KEY" in result.stderr
    assert harness.calls() == []


def test_a_deploy_id_must_be_reported_before_verification_passes(harness: Harness) -> None:
    result = harness.deploy(DEPLOY_ID="run-7-1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deployment=run-7-1" in result.stdout


def test_old_tasks_of_the_same_commit_do_not_pass_verification(harness: Harness) -> None:
    """Tasks that report the expected version but not this deploy's id are the ones from
    before (a redeploy of the live commit): they must not count as the new deploy."""
    harness.behaviour.stuck_version = NEW_SHA  # never replaced by tasks of this deploy
    without_id = harness.deploy()
    assert without_id.returncode == 0  # the version alone cannot tell them apart
    with_id = harness.deploy(DEPLOY_ID="run-2-1")
    assert with_id.returncode == 1
    assert "FAILED at health verification" in with_id.stdout


def test_an_old_replica_still_in_rotation_keeps_verification_from_passing(
    harness: Harness,
) -> None:
    """Round robin over a new and an old replica: replies of the new release alone, however
    many in a row of some request kind, must not pass while the old one still answers."""
    harness.behaviour.old_in_rotation = 10**6
    result = harness.deploy()
    assert result.returncode == 1, result.stdout
    assert "FAILED at health verification" in result.stdout
    assert "SUCCESS" not in result.stdout


def test_verification_passes_once_the_old_replica_left_the_rotation(harness: Harness) -> None:
    harness.behaviour.old_in_rotation = 5
    result = harness.deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    assert harness.behaviour.old_in_rotation == 0  # it answered until it left
    # Six /health replies in a row (2 replicas + 1 during the update, twice) confirmed it.
    assert "6 replies in a row from version " + NEW_SHA in result.stdout


def test_a_failed_rollback_smoke_check_is_reported(harness: Harness) -> None:
    harness.behaviour.keyed_status = 502
    harness.behaviour.anonymous_status = 401
    harness.behaviour.broken_everywhere = True  # the old version fails its smoke check too
    result = harness.deploy()
    assert result.returncode == 1
    assert "rollback deployed but its smoke check fails too" in result.stdout
    assert "NOT rolled back" in result.stdout
    assert "rollback verified" not in result.stdout


def test_redirects_fail_the_smoke_check_and_are_not_followed(harness: Harness) -> None:
    harness.behaviour.keyed_status = 302
    result = harness.deploy()
    assert result.returncode == 1
    assert "FAILED at smoke check" in result.stdout
    assert "-> 302" in result.stdout


def test_a_cleartext_public_url_is_refused(harness: Harness) -> None:
    result = harness.deploy(PUBLIC_URL="http://api.example.com")
    assert result.returncode == 2
    assert "must be an https URL" in result.stderr


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_secrets_are_created_as_swarm_secrets_from_the_environment_unprinted(
    harness: Harness,
) -> None:
    result = harness.deploy()
    assert result.returncode == 0, result.stdout + result.stderr
    created = harness.secrets()
    assert sorted(created.values()) == sorted([sha256(ADMIN_TOKEN), sha256(UPSTREAM_KEY)])
    names = sorted(created)
    assert names[0].startswith("proxy-app_admin_api_token_")
    assert names[1].startswith("proxy-app_http_client_api_key_")
    secret_calls = [call for call in harness.all_calls() if call["argv"][:1] == ["secrets"]]
    assert len(secret_calls) == 2
    for call in secret_calls:  # the value travels on stdin only
        assert ADMIN_TOKEN not in json.dumps(call)
        assert UPSTREAM_KEY not in json.dumps(call)
    assert_no_secret_in(result)


def test_a_redeploy_reuses_the_secrets_and_a_rotation_creates_a_new_one(
    harness: Harness,
) -> None:
    assert harness.deploy().returncode == 0
    first = set(harness.secrets())
    again = harness.deploy()
    assert again.returncode == 0, again.stdout
    assert set(harness.secrets()) == first
    assert again.stdout.count("already there with this value") == 2
    rotated_token = "admin-token-Rt55-rotated-never-printed"
    rotated = harness.deploy(ADMIN_API_TOKEN=rotated_token)
    assert rotated.returncode == 0, rotated.stdout
    new_names = set(harness.secrets()) - first
    assert len(new_names) == 1
    (new_name,) = new_names
    assert new_name.startswith("proxy-app_admin_api_token_")
    assert harness.secrets()[new_name] == sha256(rotated_token)
    assert rotated_token not in rotated.stdout + rotated.stderr


def test_a_secret_the_cli_cannot_create_fails_the_deploy_before_the_stack_update(
    harness: Harness,
) -> None:
    broken_cli = harness.bin_dir / "quantum-cli"
    broken_cli.write_text(
        broken_cli.read_text().replace(
            'if args[:2] == ["secrets", "create"]:',
            'if args[:2] == ["secrets", "create"]:\n    finish(1, "Error: permission denied")',
        )
    )
    result = harness.deploy()
    assert result.returncode == 1
    assert "FAILED at deploy" in result.stdout
    assert "creating secret proxy-app_admin_api_token_" in result.stdout
    assert harness.calls() == []
    assert_no_secret_in(result)
