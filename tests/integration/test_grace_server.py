"""Grace mode: keyed traffic through a Redis outage, with a real redis-server made to hang
(SIGSTOP, as a stuck or partitioned Redis does) and come back (SIGCONT) with its data."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.support.app import ADMIN_TOKEN
from tests.support.gateway import Gateway
from tests.support.redis_server import RedisServer
from tests.support.stub_upstream import Reply, StubUpstream

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LIMIT = 4


@pytest.fixture
def hung_redis(redis_server: RedisServer) -> Iterator[Callable[[bool], None]]:
    """``hang(True)`` stops the redis-server process, ``hang(False)`` resumes it."""
    stopped = []

    def hang(on: bool) -> None:
        assert redis_server.process is not None
        redis_server.process.send_signal(signal.SIGSTOP if on else signal.SIGCONT)
        if on:
            stopped.append(True)
        else:
            stopped.clear()

    yield hang
    if stopped and redis_server.process is not None:
        redis_server.process.send_signal(signal.SIGCONT)


def get(gateway: Gateway, key: str) -> requests.Response:
    return requests.get(gateway.url + "/api/v1/x", headers={"x-api-key": key}, timeout=10)


def first_answer_judged_by_redis(gateway: Gateway, key: str) -> requests.Response:
    """Once Redis is back: the first answer that no longer comes from grace (10 s at most)."""
    deadline = time.monotonic() + 10
    answer = get(gateway, key)
    while "x-auth-mode" in answer.headers and time.monotonic() < deadline:
        time.sleep(0.2)
        answer = get(gateway, key)
    return answer


def test_remembered_keys_are_served_through_an_outage_and_exact_limits_resume(
    start_gateway: Callable[..., Gateway],
    stub: StubUpstream,
    hung_redis: Callable[[bool], None],
) -> None:
    stub.reply("/x", Reply(headers=(("cache-control", "no-store"),)))
    gateway = start_gateway(
        {
            "HTTP_CLIENT_BASE_URL": stub.url,
            "API_KEYS_OUTAGE_GRACE_SECONDS": "300",
            "API_KEYS_OUTAGE_SHARE": "2",
            "API_KEYS_RATE_LIMIT_MAX_REQUESTS": str(LIMIT * 2),
            "API_KEYS_RATE_LIMIT_WINDOW_SECONDS": "3600",
            "REDIS_TIMEOUT_MS": "200",
        },
        workers=1,
        with_key=False,
    )
    used = gateway.create_key(ADMIN_TOKEN, owner="used")
    unseen = gateway.create_key(ADMIN_TOKEN, owner="unseen")
    revoked = gateway.create_key(ADMIN_TOKEN, owner="revoked")
    deleted = gateway.create_key(ADMIN_TOKEN, owner="deleted")
    scoped = gateway.create_key(ADMIN_TOKEN, owner="scoped", allowedIps=["127.0.0.0/8"])
    for key in (used, revoked, deleted, scoped):
        assert get(gateway, key["apiKey"]).status_code == 200
    # Changed after this worker last saw them: only the key events tell it.
    assert requests.post(
        f"{gateway.url}/internal/api-keys/{revoked['keyId']}/revoke", headers=ADMIN, timeout=5
    ).ok
    assert requests.delete(
        f"{gateway.url}/internal/api-keys/{deleted['keyId']}", headers=ADMIN, timeout=5
    ).ok
    time.sleep(0.5)  # the events travel through Redis to the worker's listener

    hung_redis(True)
    answers = [get(gateway, used["apiKey"]) for _ in range(LIMIT + 2)]
    # The worker's share of the limit (8 / 2), then 429, each answer marked.
    assert [a.status_code for a in answers] == [200] * LIMIT + [429, 429]
    assert {a.headers["x-auth-mode"] for a in answers} == {"grace"}
    assert answers[0].headers["x-ratelimit-limit"] == str(LIMIT)
    assert answers[-1].json()["error"] == "rate_limited"
    refusals = {
        "unseen": get(gateway, unseen["apiKey"]),
        "revoked": get(gateway, revoked["apiKey"]),
        "deleted": get(gateway, deleted["apiKey"]),
        "scoped": get(gateway, scoped["apiKey"]),
    }
    assert {name: (r.status_code, r.json()["error"]) for name, r in refusals.items()} == {
        "unseen": (503, "auth_unavailable"),
        "revoked": (401, "revoked_api_key"),
        "deleted": (401, "invalid_api_key"),
        "scoped": (503, "auth_unavailable"),  # scopes and addresses are not judged in grace
    }
    assert "x-auth-mode" not in refusals["unseen"].headers
    metrics = requests.get(gateway.url + "/internal/metrics", headers=ADMIN, timeout=10).text
    assert f'proxy_auth_grace_total{{outcome="ok"}} {LIMIT}.0' in metrics

    hung_redis(False)
    answer = first_answer_judged_by_redis(gateway, used["apiKey"])
    # Redis judges again, with its count: 1 before the outage and this one. A check sent to
    # the hung Redis before the gateway gave up on it (the first of the outage, and a probe
    # after each cool-down) still runs when Redis resumes, and counts: at most a few.
    assert answer.status_code == 200
    assert "x-auth-mode" not in answer.headers
    assert LIMIT * 2 - 2 - 3 <= int(answer.headers["x-ratelimit-remaining"]) <= LIMIT * 2 - 2
    assert get(gateway, unseen["apiKey"]).status_code == 200


def test_grace_is_off_by_default(
    start_gateway: Callable[..., Gateway],
    stub: StubUpstream,
    hung_redis: Callable[[bool], None],
) -> None:
    stub.reply("/x", Reply(headers=(("cache-control", "no-store"),)))
    gateway = start_gateway(
        {"HTTP_CLIENT_BASE_URL": stub.url, "REDIS_TIMEOUT_MS": "200"}, with_key=False
    )
    key = gateway.create_key(ADMIN_TOKEN)["apiKey"]
    assert get(gateway, key).status_code == 200
    hung_redis(True)
    refused = get(gateway, key)
    assert (refused.status_code, refused.json()["error"]) == (503, "auth_unavailable")


def test_remembered_keys_are_served_while_redis_is_down_and_back(
    start_gateway: Callable[..., Gateway],
    stub: StubUpstream,
    redis_server: RedisServer,
) -> None:
    """Redis killed (not hung) and started again from its last snapshot."""
    stub.reply("/x", Reply(headers=(("cache-control", "no-store"),)))
    gateway = start_gateway(
        {
            "HTTP_CLIENT_BASE_URL": stub.url,
            "API_KEYS_OUTAGE_GRACE_SECONDS": "300",
            "API_KEYS_RATE_LIMIT_MAX_REQUESTS": str(LIMIT),
            "API_KEYS_RATE_LIMIT_WINDOW_SECONDS": "3600",
        },
        workers=1,
        with_key=False,
    )
    used = gateway.create_key(ADMIN_TOKEN, owner="used")
    unseen = gateway.create_key(ADMIN_TOKEN, owner="unseen")
    revoked = gateway.create_key(ADMIN_TOKEN, owner="revoked")
    for key in (used, revoked):
        assert get(gateway, key["apiKey"]).status_code == 200
    assert requests.post(
        f"{gateway.url}/internal/api-keys/{revoked['keyId']}/revoke", headers=ADMIN, timeout=5
    ).ok
    redis_server.client().save()  # what Redis comes back with
    time.sleep(0.5)  # the revocation travels through Redis to the worker's listener

    redis_server.stop()
    answers = [get(gateway, used["apiKey"]) for _ in range(LIMIT + 1)]
    assert [a.status_code for a in answers] == [200] * LIMIT + [429]
    assert {a.headers["x-auth-mode"] for a in answers} == {"grace"}
    assert get(gateway, unseen["apiKey"]).status_code == 503
    assert get(gateway, revoked["apiKey"]).status_code == 401

    redis_server.start()
    answer = first_answer_judged_by_redis(gateway, used["apiKey"])
    # Judged by Redis again, exactly: one request before the snapshot, and this one.
    assert answer.status_code == 200
    assert "x-auth-mode" not in answer.headers
    assert answer.headers["x-ratelimit-remaining"] == str(LIMIT - 2)
    assert get(gateway, revoked["apiKey"]).status_code == 401
    assert get(gateway, unseen["apiKey"]).status_code == 200
