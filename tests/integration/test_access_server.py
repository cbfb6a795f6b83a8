"""API keys, rate limits and the admin API through the real server and a real redis-server."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import requests

from tests.support.app import ADMIN_TOKEN, UPSTREAM_KEY
from tests.support.concurrency import in_parallel
from tests.support.gateway import Gateway
from tests.support.redis_server import RedisServer
from tests.support.stub_upstream import Reply, StubUpstream

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def fresh_connection_get(gateway: Gateway, path: str, key: str) -> requests.Response:
    # A new connection each time, so that requests land on every worker.
    return requests.get(
        f"{gateway.url}{path}", headers={"x-api-key": key, "Connection": "close"}, timeout=10
    )


def test_revocation_and_deletion_apply_to_the_very_next_request_on_every_worker(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/x", Reply(headers=(("cache-control", "no-store"),)))
    gateway = start_gateway({"HTTP_CLIENT_BASE_URL": stub.url}, workers=2, with_key=False)
    created = gateway.create_key(ADMIN_TOKEN, owner="acme")
    key, key_id = created["apiKey"], created["keyId"]
    assert {fresh_connection_get(gateway, "/api/v1/x", key).status_code for _ in range(10)} == {200}
    calls_before = len(stub.calls())
    revoked = requests.post(
        f"{gateway.url}/internal/api-keys/{key_id}/revoke", headers=ADMIN, timeout=5
    )
    assert revoked.json() == {"ok": True}
    answers = [fresh_connection_get(gateway, "/api/v1/x", key) for _ in range(10)]
    assert {a.status_code for a in answers} == {401}
    assert {a.json()["error"] for a in answers} == {"revoked_api_key"}
    requests.post(f"{gateway.url}/internal/api-keys/{key_id}/activate", headers=ADMIN, timeout=5)
    assert fresh_connection_get(gateway, "/api/v1/x", key).status_code == 200
    requests.delete(f"{gateway.url}/internal/api-keys/{key_id}", headers=ADMIN, timeout=5)
    answers = [fresh_connection_get(gateway, "/api/v1/x", key) for _ in range(10)]
    assert {a.status_code for a in answers} == {401}
    assert len(stub.calls()) == calls_before + 1


def test_rate_limit_is_exact_under_concurrency_across_workers(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/x", Reply(headers=(("cache-control", "no-store"),)))
    gateway = start_gateway(
        {
            "HTTP_CLIENT_BASE_URL": stub.url,
            "API_KEYS_RATE_LIMIT_MAX_REQUESTS": "50",
            "API_KEYS_RATE_LIMIT_WINDOW_SECONDS": "3600",
        },
        workers=2,
        with_key=False,
    )
    key = gateway.create_key(ADMIN_TOKEN)["apiKey"]
    answers = in_parallel([lambda: fresh_connection_get(gateway, "/api/v1/x", key)] * 200)
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 50
    assert statuses.count(429) == 150
    limited = [a for a in answers if a.status_code == 429]
    assert all(int(a.headers["retry-after"]) >= 1 for a in limited)
    assert all(a.headers["x-ratelimit-remaining"] == "0" for a in limited)
    assert {a.json()["error"] for a in limited} == {"rate_limited"}
    assert len(stub.calls("/x")) == 50


def test_a_burst_at_a_window_edge_does_not_double_the_rate(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/x", Reply(headers=(("cache-control", "no-store"),)))
    gateway = start_gateway(
        {
            "HTTP_CLIENT_BASE_URL": stub.url,
            "API_KEYS_RATE_LIMIT_MAX_REQUESTS": "5",
            "API_KEYS_RATE_LIMIT_WINDOW_SECONDS": "2",
        }
    )
    # (sent at, previous answer at, remaining) of every allowed request
    allowed: list[tuple[float, float, int]] = []
    session = requests.Session()
    deadline = time.monotonic() + 4.5
    answered = time.monotonic()
    while time.monotonic() < deadline:
        sent = time.monotonic()
        answer = session.get(f"{gateway.url}/api/v1/x", headers=gateway.key_headers(), timeout=5)
        if answer.status_code == 200:
            allowed.append((sent, answered, int(answer.headers["x-ratelimit-remaining"])))
        else:
            assert answer.status_code == 429
        answered = time.monotonic()
        time.sleep(0.01)
    assert len(allowed) >= 5
    # The first second may hold the burst of 5. After it, with requests every 10 ms, a request
    # is allowed only as the limit refills, one per 0.4 s, and leaves nothing over; a fixed
    # window would let a fresh burst of 5 through at each window edge (2 s, 4 s), the first of
    # them leaving 4. Only a client that itself stalled (a busy machine) can have more left.
    first = allowed[0][0]
    assert len([sent for sent, _, _ in allowed if sent < first + 0.2]) <= 5
    for sent, previous, remaining in allowed:
        if sent >= first + 1.0:
            stalled_s = sent - previous
            assert remaining <= stalled_s / 0.4 + 1, (sent - first, stalled_s, remaining)
    assert len(allowed) <= 5 + 4.5 / 0.4 + 1


def test_one_redis_down_means_503_for_keyed_requests_while_health_answers(
    start_gateway: StartGateway, stub: StubUpstream, redis_server: RedisServer
) -> None:
    gateway = start_gateway({"HTTP_CLIENT_BASE_URL": stub.url, "REDIS_TIMEOUT_MS": "100"})
    assert gateway.get("/api/v1/x").status_code == 200
    calls = len(stub.calls())
    redis_server.stop()
    try:
        started = time.monotonic()
        answers = [gateway.get("/api/v1/x") for _ in range(10)]
        assert time.monotonic() - started < 3
        assert {a.status_code for a in answers} == {503}
        assert {a.json()["error"] for a in answers} == {"auth_unavailable"}
        health = gateway.get("/health")
        assert (health.status_code, health.json()["status"]) == (200, "degraded")
        assert gateway.get("/health/live").status_code == 200
        assert (
            requests.get(f"{gateway.url}/internal/api-keys", headers=ADMIN, timeout=5).status_code
            == 503
        )
    finally:
        redis_server.start()
    assert len(stub.calls()) == calls


def test_invalidation_through_the_admin_api(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    for path in ("/v/things/1", "/v/things/*", "/v/things/[x]", "/v/other"):
        stub.reply(path, Reply(headers=(("cache-control", "max-age=600"),)))
    gateway = start_gateway({"HTTP_CLIENT_BASE_URL": stub.url})
    targets = [
        ("/api/v1/v/things/1", "application/json"),
        ("/api/v1/v/things/1", "text/plain"),
        ("/api/v1/v/things/1?page=2", "application/json"),
        ("/api/v1/v/things/%2A", "application/json"),
        ("/api/v1/v/things/%5Bx%5D?q=%3F", "application/json"),
        ("/api/v1/v/other", "application/json"),
    ]
    for path, accept in targets:
        assert gateway.get(path, headers={"Accept": accept}).headers["x-cache"] == "MISS"

    def invalidate(**body: object) -> dict[str, object]:
        answer = requests.post(
            f"{gateway.url}/internal/cache/invalidate", json=body, headers=ADMIN, timeout=5
        )
        assert answer.status_code == 200, answer.text
        result: dict[str, object] = answer.json()
        return result

    assert invalidate(scope="all", dryRun=True)["matched"] == 6
    assert invalidate(scope="exact", path="/v/things/1")["deleted"] == 2
    json = {"Accept": "application/json"}
    assert gateway.get("/api/v1/v/things/1?page=2", headers=json).headers["x-cache"] == "HIT"
    assert invalidate(scope="exact", path="/api/v1/v/things/%2A")["deleted"] == 1
    assert invalidate(scope="exact", path="/v/things/%5Bx%5D?q=%3F")["deleted"] == 1
    assert invalidate(scope="prefix", pathPrefix="/v/things")["deleted"] == 1
    assert gateway.get("/api/v1/v/other", headers=json).headers["x-cache"] == "HIT"
    assert invalidate(scope="all") == {
        "ok": True,
        "scope": "all",
        "dryRun": False,
        "matched": 1,
        "deleted": 1,
    }
    assert gateway.get("/api/v1/v/other", headers=json).headers["x-cache"] == "MISS"


def test_admin_actions_are_audited_without_secrets(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    gateway = start_gateway(
        {"HTTP_CLIENT_BASE_URL": stub.url, "HTTP_CLIENT_API_KEY": UPSTREAM_KEY}, with_key=False
    )
    created = gateway.create_key(ADMIN_TOKEN, owner="acme")
    requests.post(
        f"{gateway.url}/internal/api-keys/{created['keyId']}/revoke",
        headers={**ADMIN, "X-Admin-Actor": "alice"},
        timeout=5,
    )
    requests.get(
        f"{gateway.url}/internal/api-keys", headers={"Authorization": "Bearer nope"}, timeout=5
    )
    fresh_connection_get(gateway, "/api/v1/x", created["apiKey"])
    assert gateway.terminate() == 0
    output = gateway.output()
    for secret in (
        ADMIN_TOKEN,
        UPSTREAM_KEY,
        created["apiKey"],
        created["apiKey"].split("_", 2)[2],
    ):
        assert secret not in output
    audit = [r for r in gateway.log_records() if r["logger"] == "proxy_app.audit"]
    assert [(r["action"], r["outcome"]) for r in audit] == [
        ("api_key.create", "ok"),
        ("api_key.revoke", "ok"),
        ("admin.auth", "denied"),
    ]
    assert audit[1]["key_id"] == created["keyId"]
    assert audit[1]["owner"] == "acme"
    assert audit[1]["actor"] == "alice"
    assert all("request_id" in r for r in audit)
