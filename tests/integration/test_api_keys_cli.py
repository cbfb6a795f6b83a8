"""scripts/api_keys.py against a real Redis and against a running gateway's admin API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.app import ADMIN_TOKEN
from tests.support.gateway import Gateway
from tests.support.stub_upstream import StubUpstream

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "api_keys.py"


def cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ADMIN_API_TOKEN"}
    if token is not None:
        env["ADMIN_API_TOKEN"] = token
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=30
    )


def test_bootstrap_against_redis_then_use_the_key_through_the_gateway(
    redis_url: str, start_gateway: Callable[..., Gateway], stub: StubUpstream
) -> None:
    created = cli("--redis", redis_url, "create", "--owner", "ops", "--label", "smoke")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["apiKey"].startswith(f"pk_{key['keyId']}_")
    assert "shown only now" in created.stderr

    listed = cli("--redis", redis_url, "list")
    assert [item["keyId"] for item in json.loads(listed.stdout)["items"]] == [key["keyId"]]
    assert key["apiKey"] not in listed.stdout

    gateway = start_gateway({"HTTP_CLIENT_BASE_URL": stub.url}, with_key=False)
    gateway.api_key = key["apiKey"]
    assert gateway.get("/api/v1/x").status_code == 200
    assert cli("--redis", redis_url, "revoke", key["keyId"]).returncode == 0
    assert gateway.get("/api/v1/x").status_code == 401
    assert cli("--redis", redis_url, "delete", key["keyId"]).returncode == 0
    missing = cli("--redis", redis_url, "show", key["keyId"])
    assert missing.returncode == 1
    assert "no API key" in missing.stderr


def test_through_the_admin_api_with_the_token_from_the_environment(
    start_gateway: Callable[..., Gateway], stub: StubUpstream
) -> None:
    gateway = start_gateway({"HTTP_CLIENT_BASE_URL": stub.url}, with_key=False)
    no_token = cli("--url", gateway.url, "list")
    assert no_token.returncode == 2
    assert "ADMIN_API_TOKEN" in no_token.stderr
    wrong = cli("--url", gateway.url, "list", token="wrong-token")
    assert wrong.returncode == 1
    assert "401" in wrong.stderr

    created = cli("--url", gateway.url, "create", "--owner", "acme", token=ADMIN_TOKEN)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert ADMIN_TOKEN not in created.stdout + created.stderr
    gateway.api_key = key["apiKey"]
    assert gateway.get("/api/v1/x").status_code == 200
    revoked = cli("--url", gateway.url, "revoke", key["keyId"], token=ADMIN_TOKEN)
    assert json.loads(revoked.stdout) == {"ok": True}
    assert gateway.get("/api/v1/x").status_code == 401
    past = cli(
        "--url",
        gateway.url,
        "create",
        "--owner",
        "a",
        "--expires-at",
        "2001-01-01T00:00:00Z",
        token=ADMIN_TOKEN,
    )
    assert past.returncode == 1
    assert "expiresAt" in past.stderr


def test_plans_patch_and_roll_through_the_admin_api(
    start_gateway: Callable[..., Gateway], stub: StubUpstream
) -> None:
    gateway = start_gateway({"HTTP_CLIENT_BASE_URL": stub.url}, with_key=False)
    url = ("--url", gateway.url)
    plan = cli(
        *url,
        "plans",
        "create",
        "pro",
        "--limits",
        '[{"max": 10, "windowSeconds": 1}, {"max": 1000, "windowSeconds": 86400}]',
        "--quota",
        '{"max": 5000, "period": "month"}',
        "--cache-hits-free",
        token=ADMIN_TOKEN,
    )
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["cacheHitsFree"] is True
    listed = json.loads(cli(*url, "plans", "list", token=ADMIN_TOKEN).stdout)
    assert [p["name"] for p in listed["items"]] == ["default", "pro"]
    created = json.loads(
        cli(*url, "create", "--owner", "acme", "--plan", "pro", token=ADMIN_TOKEN).stdout
    )
    assert created["plan"] == "pro"
    patched = cli(
        *url,
        "patch",
        created["keyId"],
        "--label",
        "renamed",
        "--metadata",
        '{"crm": "42"}',
        "--plan",
        "null",
        token=ADMIN_TOKEN,
    )
    assert patched.returncode == 0, patched.stderr
    shown = json.loads(patched.stdout)
    assert (shown["label"], shown["metadata"], shown["plan"]) == (
        "renamed",
        {"crm": "42"},
        "default",
    )
    rolled = cli(*url, "roll", created["keyId"], "--grace-seconds", "60", token=ADMIN_TOKEN)
    assert rolled.returncode == 0, rolled.stderr
    assert "shown only now" in rolled.stderr
    new = json.loads(rolled.stdout)
    assert new["rolledFrom"] == created["keyId"]
    assert new["metadata"] == {"crm": "42"}
    keys = json.loads(cli(*url, "list", "--owner", "acme", token=ADMIN_TOKEN).stdout)["items"]
    assert {k["keyId"] for k in keys} == {created["keyId"], new["keyId"]}
    in_use = cli(*url, "plans", "delete", "pro", token=ADMIN_TOKEN)
    assert in_use.returncode == 0, in_use.stderr  # nobody is on it any more
    refused = cli(*url, "plans", "show", "pro", token=ADMIN_TOKEN)
    assert refused.returncode == 1
    assert "plan_not_found" in refused.stderr
    needs_url = cli("--redis", "redis://127.0.0.1:1/0", "roll", "x", "--grace-seconds", "1")
    assert needs_url.returncode == 2
    assert "use --url" in needs_url.stderr
