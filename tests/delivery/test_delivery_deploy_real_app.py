"""scripts/deploy_quantum.py verifying and smoke-testing the real service, not a stand-in.

The fake quantum-cli of the deploy tests "deploys" nothing here: the gateway already runs the
release the deploy expects (its GIT_SHA and DEPLOY_ID), as the tasks do once Swarm converged.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.delivery.test_delivery_deploy_quantum import (
    ADMIN_TOKEN,
    DEPLOY,
    FAKE_CLI,
    NEW_SHA,
    REPOSITORY,
    SMOKE_KEY,
    UPSTREAM_KEY,
)
from tests.support.gateway import Gateway
from tests.support.redis_server import RedisServer
from tests.support.stub_upstream import Reply, StubUpstream

DEPLOY_ID = "run-9-1"


@pytest.fixture
def live_release(tmp_path: Path) -> Iterator[tuple[Gateway, StubUpstream]]:
    redis_server = RedisServer()
    redis_server.start()
    stub = StubUpstream()
    # An upstream whose root is no resource, as with many APIs.
    for root in ("/v4", "/v4/"):
        stub.reply(root, Reply(status=404, body=b'{"message": "no such resource"}'))
    gateway = Gateway(
        {
            "CACHE_REDIS_URL": redis_server.url,
            "HTTP_CLIENT_BASE_URL": f"{stub.url}/v4",
            "HTTP_CLIENT_API_KEY": UPSTREAM_KEY,
            "ADMIN_API_TOKEN": ADMIN_TOKEN,
            "GIT_SHA": NEW_SHA,
            "DEPLOY_ID": DEPLOY_ID,
        }
    )
    try:
        gateway.start()
        yield gateway, stub
    finally:
        gateway.stop()
        stub.close()
        redis_server.cleanup()


def run_deploy(
    tmp_path: Path, gateway: Gateway, **overrides: str
) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    cli = bin_dir / "quantum-cli"
    cli.write_text(FAKE_CLI.format(python=sys.executable))
    cli.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "TMPDIR": str(tmp_path),
        "QUANTUM_ENDPOINT": "cluster-one",
        "QUANTUM_STACK": "proxy-app",
        "APP_IMAGE": f"{REPOSITORY}:{NEW_SHA}",
        "EXPECTED_VERSION": NEW_SHA,
        "DEPLOY_ID": DEPLOY_ID,
        "PUBLIC_URL": gateway.url,
        "APP_HOST": "api.example.com",
        "HTTP_CLIENT_BASE_URL": "https://upstream.example.com",
        "REDIS_PLACEMENT_CONSTRAINT": "node.labels.redis == true",
        "ADMIN_API_TOKEN": ADMIN_TOKEN,
        "SMOKE_API_KEY": SMOKE_KEY,
        "FAKE_QUANTUM_LOG": str(tmp_path / "cli.log"),
        "FAKE_QUANTUM_STATE": str(tmp_path / "state"),
        "DEPLOY_VERIFY_TIMEOUT_S": "10",
        "DEPLOY_POLL_INTERVAL_S": "0.2",
        "DEPLOY_HTTP_TIMEOUT_S": "5",
        **overrides,
    }
    return subprocess.run(
        [sys.executable, str(DEPLOY)], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_default_smoke_request_passes_on_a_healthy_release_of_the_real_service(
    tmp_path: Path, live_release: tuple[Gateway, StubUpstream]
) -> None:
    gateway, stub = live_release
    smoke_key = gateway.create_key(ADMIN_TOKEN, owner="deploy-smoke")["apiKey"]
    result = run_deploy(tmp_path, gateway, SMOKE_API_KEY=smoke_key)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke: GET /api/v1 with the smoke key -> 404" in result.stdout
    assert "smoke: GET /api/v1 without a key -> 401" in result.stdout
    # The keyed request went through the gateway to the upstream, with the upstream's key.
    forwarded = [call for call in stub.calls() if call.path in ("/v4", "/v4/")]
    assert len(forwarded) == 1
    assert forwarded[0].header("api_key") == UPSTREAM_KEY
    assert smoke_key not in result.stdout + result.stderr


def test_an_unknown_smoke_key_fails_the_real_services_smoke_check(
    tmp_path: Path, live_release: tuple[Gateway, StubUpstream]
) -> None:
    gateway, _ = live_release
    result = run_deploy(tmp_path, gateway, SWARM_ROLLBACK_WAIT_S="0.5")
    assert result.returncode == 1
    assert "FAILED at smoke check" in result.stdout
    assert "smoke: GET /api/v1 with the smoke key -> 401" in result.stdout
