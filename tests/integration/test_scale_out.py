"""Two service instances (separate processes and ports, one Redis) behave as one."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import requests

from tests.support.app import ADMIN_TOKEN
from tests.support.concurrency import in_parallel
from tests.support.gateway import Gateway
from tests.support.stub_upstream import Reply, StubUpstream

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def two_instances(start: Callable[..., Gateway], env: dict[str, str]) -> tuple[Gateway, Gateway]:
    first = start(env, workers=2, with_key=False)
    second = start(env, workers=2, with_key=False)
    return first, second


def get(gateway: Gateway, path: str, key: str, **headers: str) -> requests.Response:
    return requests.get(
        gateway.url + path,
        headers={"x-api-key": key, "Connection": "close", **headers},
        timeout=15,
    )


def spread(
    instances: tuple[Gateway, Gateway], count: int, path: str, key: str
) -> list[Callable[[], requests.Response]]:
    """``count`` calls of ``path``, alternating between the instances."""
    return [functools.partial(get, instances[n % 2], path, key) for n in range(count)]


def test_the_rate_limit_is_exact_in_total_not_per_instance(
    start_gateway: Callable[..., Gateway], stub: StubUpstream
) -> None:
    stub.reply("/x", Reply(headers=(("cache-control", "no-store"),)))
    first, second = two_instances(
        start_gateway,
        {
            "HTTP_CLIENT_BASE_URL": stub.url,
            "API_KEYS_RATE_LIMIT_MAX_REQUESTS": "40",
            "API_KEYS_RATE_LIMIT_WINDOW_SECONDS": "3600",
        },
    )
    key = first.create_key(ADMIN_TOKEN)["apiKey"]
    answers = in_parallel(spread((first, second), 120, "/api/v1/x", key))
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 40
    assert statuses.count(429) == 80
    assert len(stub.calls("/x")) == 40


def test_a_key_revoked_on_one_instance_is_refused_by_both(
    start_gateway: Callable[..., Gateway], stub: StubUpstream
) -> None:
    stub.reply("/x", Reply(headers=(("cache-control", "no-store"),)))
    first, second = two_instances(start_gateway, {"HTTP_CLIENT_BASE_URL": stub.url})
    created = first.create_key(ADMIN_TOKEN)
    key = created["apiKey"]
    assert [get(gw, "/api/v1/x", key).status_code for gw in (first, second)] == [200, 200]
    requests.post(
        f"{first.url}/internal/api-keys/{created['keyId']}/revoke", headers=ADMIN, timeout=5
    )
    for gateway in (second, first, second):
        answer = get(gateway, "/api/v1/x", key)
        assert (answer.status_code, answer.json()["error"]) == (401, "revoked_api_key")


def test_the_cache_and_its_invalidation_are_shared(
    start_gateway: Callable[..., Gateway], stub: StubUpstream
) -> None:
    stub.reply("/shared", Reply(headers=(("cache-control", "max-age=600"),)))
    first, second = two_instances(start_gateway, {"HTTP_CLIENT_BASE_URL": stub.url})
    key = first.create_key(ADMIN_TOKEN)["apiKey"]
    assert get(first, "/api/v1/shared", key).headers["x-cache"] == "MISS"
    assert get(second, "/api/v1/shared", key).headers["x-cache"] == "HIT"
    invalidated = requests.post(
        f"{first.url}/internal/cache/invalidate",
        json={"scope": "exact", "path": "/shared"},
        headers=ADMIN,
        timeout=5,
    ).json()
    assert invalidated["deleted"] == 1
    assert get(second, "/api/v1/shared", key).headers["x-cache"] == "MISS"
    assert len(stub.calls("/shared")) == 2


def test_a_stampede_across_both_instances_reaches_upstream_once(
    start_gateway: Callable[..., Gateway], stub: StubUpstream
) -> None:
    stub.reply(
        "/cold", Reply(body=b'{"cold": 1}', headers=(("cache-control", "max-age=60"),), delay_s=0.5)
    )
    first, second = two_instances(start_gateway, {"HTTP_CLIENT_BASE_URL": stub.url})
    key = first.create_key(ADMIN_TOKEN)["apiKey"]
    answers = in_parallel(spread((first, second), 100, "/api/v1/cold", key))
    assert [a.status_code for a in answers] == [200] * 100
    assert {a.content for a in answers} == {b'{"cold": 1}'}
    assert len(stub.calls("/cold")) == 1
    assert sorted(a.headers["x-cache"] for a in answers).count("MISS") == 1


def admin_call(gateway: Gateway, method: str, path: str, body: object) -> requests.Response:
    return requests.request(method, gateway.url + path, json=body, headers=ADMIN, timeout=10)


def test_plans_quotas_and_rolls_are_exact_across_instances(
    start_gateway: Callable[..., Gateway], stub: StubUpstream
) -> None:
    stub.reply("/x", Reply(headers=(("cache-control", "no-store"),)))
    stub.reply("/c", Reply(headers=(("cache-control", "max-age=600"),)))
    first, second = two_instances(start_gateway, {"HTTP_CLIENT_BASE_URL": stub.url})
    both = (first, second)
    plan = {
        "name": "pro",
        "limits": [{"max": 30, "windowSeconds": 3600}, {"max": 25, "windowSeconds": 86400}],
        "quota": {"max": 20, "period": "day"},
        "cacheHitsFree": True,
    }
    assert admin_call(first, "POST", "/internal/plans", plan).status_code == 201
    created = first.create_key(ADMIN_TOKEN, plan="pro")
    key = created["apiKey"]

    # Cache hits are free on both instances: 60 of them cost nothing.
    assert get(first, "/api/v1/c", key).headers["x-cache"] == "MISS"  # 1 charged
    hits = in_parallel(spread(both, 60, "/api/v1/c", key))
    assert {a.status_code for a in hits} == {200}
    assert {a.headers["x-cache"] for a in hits} == {"HIT"}
    # The quota (20 a day, tighter than both limits) holds exactly across both instances.
    answers = in_parallel(spread(both, 40, "/api/v1/x", key))
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 19
    assert {a.json()["error"] for a in answers if a.status_code == 429} == {"quota_exceeded"}
    assert len(stub.calls("/x")) == 19

    # A plan change made on one instance is applied by the other at its next request.
    plan["quota"] = {"max": 30, "period": "day"}
    changed = admin_call(
        first, "PUT", "/internal/plans/pro", {k: v for k, v in plan.items() if k != "name"}
    )
    assert changed.status_code == 200
    answers = in_parallel(spread(both, 20, "/api/v1/x", key))
    statuses = [a.status_code for a in answers]
    # 10 more of the quota; then the daily limit of 25 is what is left at 25 - 20 = 5.
    assert statuses.count(200) == 5
    refused = {a.json()["error"] for a in answers if a.status_code == 429}
    assert refused == {"rate_limited"}

    # A roll on one instance: the old key keeps working on both through the grace period,
    # and the new one has limits of its own.
    rolled = admin_call(
        second, "POST", f"/internal/api-keys/{created['keyId']}/roll", {"gracePeriodSeconds": 600}
    ).json()
    new_key = rolled["apiKey"]
    fresh = in_parallel(spread(both, 30, "/api/v1/x", new_key))
    assert [a.status_code for a in fresh].count(200) == 25
    assert [get(gw, "/api/v1/c", key).status_code for gw in both] == [200, 200]
