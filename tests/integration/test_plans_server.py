"""Plans, per-key limits, quotas, scopes, allowed addresses and the key lifecycle, through the
real server, a real redis-server and a stub upstream."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.support.app import ADMIN_TOKEN
from tests.support.gateway import Gateway
from tests.support.stub_upstream import Reply, StubUpstream

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
NO_STORE = Reply(headers=(("cache-control", "no-store"), ("content-type", "application/json")))
CACHEABLE = Reply(headers=(("cache-control", "max-age=600"), ("content-type", "application/json")))


def admin(gateway: Gateway, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, gateway.url + path, headers=ADMIN, timeout=10, **kwargs)


def keyed(
    gateway: Gateway, key: str, path: str = "/api/v1/x", method: str = "GET", **headers: str
) -> requests.Response:
    return requests.request(
        method, gateway.url + path, headers={"x-api-key": key, **headers}, timeout=10
    )


@pytest.fixture
def gateway(start_gateway: StartGateway, stub: StubUpstream) -> Gateway:
    stub.reply("/x", NO_STORE)
    return start_gateway({"HTTP_CLIENT_BASE_URL": stub.url}, with_key=False)


def make_plan(gateway: Gateway, **plan: Any) -> dict[str, Any]:
    response = admin(gateway, "POST", "/internal/plans", json=plan)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def make_key(gateway: Gateway, **fields: Any) -> dict[str, Any]:
    return gateway.create_key(ADMIN_TOKEN, **fields)


def test_a_request_must_fit_every_limit_of_its_plan_and_each_is_named(
    gateway: Gateway, stub: StubUpstream
) -> None:
    make_plan(
        gateway,
        name="pro",
        limits=[{"max": 5, "windowSeconds": 3600}, {"max": 3, "windowSeconds": 86400}],
    )
    key = make_key(gateway, plan="pro")["apiKey"]
    first = keyed(gateway, key)
    assert first.status_code == 200
    assert first.headers["ratelimit-policy"] == ('"pro-3600s";q=5;w=3600, "pro-86400s";q=3;w=86400')
    # The daily limit is the closer one: 2 left of 3, against 4 of 5.
    assert first.headers["ratelimit"].startswith('"pro-86400s";r=2;t=')
    assert first.headers["x-ratelimit-limit"] == "3"
    assert first.headers["x-ratelimit-remaining"] == "2"
    statuses = [keyed(gateway, key).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert len(stub.calls("/x")) == 3
    refused = keyed(gateway, key)
    assert refused.json()["error"] == "rate_limited"
    assert int(refused.headers["retry-after"]) > 3600  # the daily limit decides


def test_a_plan_change_reaches_the_keys_on_it_with_their_next_request(gateway: Gateway) -> None:
    make_plan(gateway, name="small", limits=[{"max": 1, "windowSeconds": 3600}])
    key = make_key(gateway, plan="small")["apiKey"]
    assert keyed(gateway, key).status_code == 200
    assert keyed(gateway, key).status_code == 429
    changed = admin(
        gateway, "PUT", "/internal/plans/small", json={"limits": [{"max": 3, "windowSeconds": 60}]}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["keys"] == 1
    answer = keyed(gateway, key)
    assert answer.status_code == 200
    assert answer.headers["ratelimit-policy"] == '"small";q=3;w=60'


def test_a_quota_refuses_with_quota_exceeded_until_the_next_utc_day(gateway: Gateway) -> None:
    make_plan(
        gateway,
        name="metered",
        limits=[{"max": 100, "windowSeconds": 60}],
        quota={"max": 2, "period": "day"},
    )
    key = make_key(gateway, plan="metered")["apiKey"]
    first = keyed(gateway, key)
    assert first.headers["x-quota-limit"] == "2"
    assert first.headers["x-quota-remaining"] == "1"
    now = dt.datetime.now(dt.UTC)
    midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    to_midnight = (midnight - now).total_seconds()
    assert abs(int(first.headers["x-quota-reset"]) - to_midnight) < 5
    assert '"metered-quota";q=2;w=86400' in first.headers["ratelimit-policy"]
    assert keyed(gateway, key).status_code == 200
    refused = keyed(gateway, key)
    assert refused.status_code == 429
    body = refused.json()
    assert body["error"] == "quota_exceeded"
    assert body["quota"] == {"max": 2, "period": "day"}
    assert abs(int(refused.headers["retry-after"]) - to_midnight) < 5
    assert refused.headers["x-quota-remaining"] == "0"


def test_a_key_s_own_limits_and_quota_override_its_plan(gateway: Gateway) -> None:
    make_plan(gateway, name="base", limits=[{"max": 1, "windowSeconds": 3600}])
    key = make_key(gateway, plan="base", limits=[{"max": 4, "windowSeconds": 3600}], quota=None)
    statuses = [keyed(gateway, key["apiKey"]).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    shown = admin(gateway, "GET", f"/internal/api-keys/{key['keyId']}").json()
    assert shown["plan"] == "base"
    assert shown["limits"] == [{"max": 4, "windowSeconds": 3600}]


def test_keys_of_one_owner_share_a_plan_shared_by_owner(gateway: Gateway) -> None:
    make_plan(
        gateway,
        name="team",
        limits=[{"max": 3, "windowSeconds": 3600}],
        quota={"max": 100, "period": "month"},
        shareByOwner=True,
    )
    first = make_key(gateway, owner="acme", plan="team")["apiKey"]
    second = make_key(gateway, owner="acme", plan="team")["apiKey"]
    other = make_key(gateway, owner="globex", plan="team")["apiKey"]
    assert [keyed(gateway, k).status_code for k in (first, second, first, second)] == [
        200,
        200,
        200,
        429,
    ]
    answer = keyed(gateway, other)
    assert answer.status_code == 200
    assert answer.headers["x-quota-remaining"] == "99"


def test_scopes_refuse_other_methods_and_paths_without_calling_the_upstream(
    gateway: Gateway, stub: StubUpstream
) -> None:
    stub.reply("/items/3", NO_STORE)
    key = make_key(gateway, scopes={"methods": ["GET"], "pathPrefixes": ["/items"]})["apiKey"]
    assert keyed(gateway, key, "/api/v1/items/3").status_code == 200
    for method, path in (
        ("POST", "/api/v1/items/3"),
        ("GET", "/api/v1/itemsx"),
        ("GET", "/api/v1/x"),
    ):
        refused = keyed(gateway, key, path, method)
        assert refused.status_code == 403, (method, path)
        assert refused.json()["error"] == "forbidden_scope"
    assert len(stub.calls()) == 1


def test_allowed_ips_and_trusted_proxies(start_gateway: StartGateway, stub: StubUpstream) -> None:
    stub.reply("/x", NO_STORE)
    direct = start_gateway({"HTTP_CLIENT_BASE_URL": stub.url}, with_key=False)
    inside = make_key(direct, allowedIps=["127.0.0.0/8", "::1"])["apiKey"]
    outside = make_key(direct, allowedIps=["10.0.0.0/8", "2001:db8::/32"])["apiKey"]
    assert keyed(direct, inside).status_code == 200
    refused = keyed(direct, outside)
    assert refused.status_code == 403
    assert refused.json()["error"] == "ip_not_allowed"
    # Without trusted proxies, X-Forwarded-For is the client's word and counts for nothing.
    assert keyed(direct, outside, **{"X-Forwarded-For": "10.1.2.3"}).status_code == 403

    behind = start_gateway(
        {"HTTP_CLIENT_BASE_URL": stub.url, "TRUSTED_PROXIES": "127.0.0.1,192.168.0.0/16"},
        with_key=False,
    )
    key = make_key(behind, allowedIps=["10.0.0.0/8"])["apiKey"]
    # The right-most address that is not a trusted proxy is the client's.
    assert keyed(behind, key, **{"X-Forwarded-For": "203.0.113.9, 10.1.2.3, 192.168.1.1"}).ok
    assert keyed(behind, key, **{"X-Forwarded-For": "10.1.2.3, 203.0.113.9"}).status_code == 403
    assert keyed(behind, key).status_code == 403  # the proxy's own address


def test_patch_changes_only_what_it_names(gateway: Gateway) -> None:
    make_plan(gateway, name="gold", limits=[{"max": 10, "windowSeconds": 60}])
    created = make_key(gateway, label="old", contact="ops@example.com")
    key_id = created["keyId"]
    patched = admin(
        gateway,
        "PATCH",
        f"/internal/api-keys/{key_id}",
        json={"label": "new", "plan": "gold", "metadata": {"tier": 2}, "expiresAt": None},
    )
    assert patched.status_code == 200, patched.text
    shown = patched.json()
    assert shown["label"] == "new"
    assert shown["contact"] == "ops@example.com"
    assert shown["plan"] == "gold"
    assert shown["metadata"] == {"tier": 2}
    assert admin(gateway, "GET", "/internal/plans/gold").json()["keys"] == 1
    answer = keyed(gateway, created["apiKey"])
    assert answer.headers["ratelimit-policy"] == '"gold";q=10;w=60'
    # Back to the default plan.
    reset = admin(gateway, "PATCH", f"/internal/api-keys/{key_id}", json={"plan": None})
    assert reset.json()["plan"] == "default"
    assert admin(gateway, "GET", "/internal/plans/gold").json()["keys"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"plan": "nope"}, "plan"),
        ({"metadata": {"x": "y" * 2100}}, "metadata"),
        ({"limits": []}, "limits"),
        ({"limits": [{"max": 1, "windowSeconds": 60}, {"max": 2, "windowSeconds": 60}]}, "limits"),
        ({"quota": {"max": 5, "period": "week"}}, "quota"),
        ({"scopes": {"methods": ["FETCH"]}}, "scopes"),
        ({"scopes": {"pathPrefixes": ["items"]}}, "scopes"),
        ({"allowedIps": ["10.0.0.0/33"]}, "allowedIps"),
        ({"owner": "someone-else"}, "owner"),
        ({"expiresAt": "2001-01-01T00:00:00Z"}, "expiresAt"),
    ],
)
def test_patch_names_each_bad_field(gateway: Gateway, body: dict[str, Any], field: str) -> None:
    key_id = make_key(gateway)["keyId"]
    refused = admin(gateway, "PATCH", f"/internal/api-keys/{key_id}", json=body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == "validation_failed"
    assert set(refused.json()["fields"]) == {field}


def test_patch_of_an_unknown_key_is_404(gateway: Gateway) -> None:
    refused = admin(gateway, "PATCH", "/internal/api-keys/AAAAAAAAAAAA", json={"label": "x"})
    assert refused.status_code == 404
    assert refused.json()["error"] == "api_key_not_found"


def test_a_rolled_key_works_through_its_grace_period_then_expires(gateway: Gateway) -> None:
    make_plan(gateway, name="gold", limits=[{"max": 10, "windowSeconds": 60}])
    old = make_key(
        gateway, owner="acme", plan="gold", metadata={"crm": "42"}, scopes={"methods": ["GET"]}
    )
    rolled = admin(
        gateway,
        "POST",
        f"/internal/api-keys/{old['keyId']}/roll",
        json={"gracePeriodSeconds": 3600},
    )
    assert rolled.status_code == 201, rolled.text
    new = rolled.json()
    assert new["keyId"] != old["keyId"]
    assert new["apiKey"] != old["apiKey"]
    for field in ("owner", "plan", "metadata", "scopes"):
        assert new[field] == old[field], field
    assert new["rolledFrom"] == old["keyId"]
    assert new["previous"]["rolledTo"] == new["keyId"]
    assert keyed(gateway, old["apiKey"]).status_code == 200
    assert keyed(gateway, new["apiKey"]).status_code == 200
    again = admin(
        gateway, "POST", f"/internal/api-keys/{old['keyId']}/roll", json={"gracePeriodSeconds": 0}
    )
    assert again.status_code == 409
    assert again.json()["error"] == "api_key_rolled"

    # With no grace at all, the old key stops at once.
    second = admin(
        gateway, "POST", f"/internal/api-keys/{new['keyId']}/roll", json={"gracePeriodSeconds": 0}
    ).json()
    refused = keyed(gateway, new["apiKey"])
    assert refused.status_code == 401
    assert refused.json()["error"] == "expired_api_key"
    assert keyed(gateway, second["apiKey"]).status_code == 200
    listed = admin(gateway, "GET", "/internal/api-keys?owner=acme&limit=10").json()["items"]
    links = {item["keyId"]: (item["rolledFrom"], item["rolledTo"]) for item in listed}
    assert links == {
        old["keyId"]: (None, new["keyId"]),
        new["keyId"]: (old["keyId"], second["keyId"]),
        second["keyId"]: (new["keyId"], None),
    }


@pytest.mark.parametrize("grace", [-1, 30 * 86400 + 1, "60"])
def test_roll_refuses_a_grace_period_out_of_range(gateway: Gateway, grace: object) -> None:
    key_id = make_key(gateway)["keyId"]
    refused = admin(
        gateway, "POST", f"/internal/api-keys/{key_id}/roll", json={"gracePeriodSeconds": grace}
    )
    assert refused.status_code == 400
    assert set(refused.json()["fields"]) == {"gracePeriodSeconds"}


def test_last_used_at_is_shown_after_use(gateway: Gateway) -> None:
    created = make_key(gateway)
    assert created["lastUsedAt"] is None
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    assert keyed(gateway, created["apiKey"]).status_code == 200
    shown = admin(gateway, "GET", f"/internal/api-keys/{created['keyId']}").json()
    used = dt.datetime.fromisoformat(shown["lastUsedAt"].replace("Z", "+00:00"))
    assert before <= used <= dt.datetime.now(dt.UTC)


def test_the_key_list_pages_with_a_cursor_and_filters(gateway: Gateway) -> None:
    make_plan(gateway, name="gold", limits=[{"max": 10, "windowSeconds": 60}])
    acme = {make_key(gateway, owner="acme")["keyId"] for _ in range(7)}
    gold = {make_key(gateway, owner="globex", plan="gold")["keyId"] for _ in range(2)}
    revoked = make_key(gateway, owner="globex")["keyId"]
    assert admin(gateway, "POST", f"/internal/api-keys/{revoked}/revoke").ok
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        query = "?owner=acme&limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = admin(gateway, "GET", "/internal/api-keys" + query).json()
        assert len(page["items"]) <= 3
        seen += [item["keyId"] for item in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(acme)
    by_plan = admin(gateway, "GET", "/internal/api-keys?plan=gold").json()["items"]
    assert {item["keyId"] for item in by_plan} == gold
    by_status = admin(gateway, "GET", "/internal/api-keys?status=revoked").json()["items"]
    assert [item["keyId"] for item in by_status] == [revoked]
    assert all(item["status"] == "revoked" for item in by_status)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("status=gone", "status"),
        ("cursor=abc", "cursor"),
        ("sort=owner", "sort"),
    ],
)
def test_the_key_list_names_bad_parameters(gateway: Gateway, query: str, field: str) -> None:
    refused = admin(gateway, "GET", f"/internal/api-keys?{query}")
    assert refused.status_code == 400
    assert set(refused.json()["fields"]) == {field}


def test_plans_admin_api(gateway: Gateway) -> None:
    listed = admin(gateway, "GET", "/internal/plans").json()["items"]
    assert [plan["name"] for plan in listed] == ["default"]
    assert listed[0]["implicit"] is True
    created = make_plan(
        gateway,
        name="pro",
        limits=[{"max": 10, "windowSeconds": 1}, {"max": 10000, "windowSeconds": 86400}],
        quota={"max": 100000, "period": "month"},
        cacheHitsFree=True,
    )
    assert created["keys"] == 0
    assert created["cacheHitsFree"] is True
    duplicate = admin(
        gateway,
        "POST",
        "/internal/plans",
        json={"name": "pro", "limits": [{"max": 1, "windowSeconds": 1}]},
    )
    assert duplicate.status_code == 409
    assert duplicate.json()["error"] == "plan_exists"
    reserved = admin(
        gateway,
        "POST",
        "/internal/plans",
        json={"name": "default", "limits": [{"max": 1, "windowSeconds": 1}]},
    )
    assert reserved.status_code == 400
    assert set(reserved.json()["fields"]) == {"name"}
    assert (
        admin(
            gateway,
            "PUT",
            "/internal/plans/default",
            json={"limits": [{"max": 1, "windowSeconds": 1}]},
        ).status_code
        == 409
    )
    assert admin(gateway, "GET", "/internal/plans/nope").status_code == 404
    assert (
        admin(
            gateway,
            "PUT",
            "/internal/plans/nope",
            json={"limits": [{"max": 1, "windowSeconds": 1}]},
        ).status_code
        == 404
    )
    make_key(gateway, plan="pro")
    make_key(gateway, plan="pro")
    in_use = admin(gateway, "DELETE", "/internal/plans/pro")
    assert in_use.status_code == 409
    assert in_use.json()["error"] == "plan_in_use"
    assert in_use.json()["keys"] == 2
    assert "2 API keys" in in_use.json()["message"]
    unused = make_plan(gateway, name="unused", limits=[{"max": 1, "windowSeconds": 1}])
    assert admin(gateway, "DELETE", f"/internal/plans/{unused['name']}").json() == {"ok": True}
    assert admin(gateway, "GET", "/internal/plans/unused").status_code == 404
    missing_plan = admin(
        gateway, "POST", "/internal/api-keys", json={"owner": "x", "plan": "unused"}
    )
    assert missing_plan.status_code == 400
    assert set(missing_plan.json()["fields"]) == {"plan"}


def test_cache_hits_are_free_on_a_plan_that_says_so(gateway: Gateway, stub: StubUpstream) -> None:
    stub.reply("/c", CACHEABLE)
    make_plan(
        gateway, name="hits-free", limits=[{"max": 2, "windowSeconds": 3600}], cacheHitsFree=True
    )
    make_plan(gateway, name="hits-count", limits=[{"max": 2, "windowSeconds": 3600}])
    free = make_key(gateway, plan="hits-free")["apiKey"]
    counted = make_key(gateway, plan="hits-count")["apiKey"]
    free_answers = [keyed(gateway, free, "/api/v1/c") for _ in range(5)]
    assert [a.status_code for a in free_answers] == [200] * 5
    assert [a.headers["x-cache"] for a in free_answers] == ["MISS"] + ["HIT"] * 4
    # Only the miss was charged: one request of two is left for what reaches the upstream.
    assert free_answers[-1].headers["x-ratelimit-remaining"] == "1"
    assert keyed(gateway, free, "/api/v1/x").status_code == 200
    assert keyed(gateway, free, "/api/v1/x").status_code == 429
    assert keyed(gateway, free, "/api/v1/c").status_code == 200  # still a hit, still free
    counted_answers = [keyed(gateway, counted, "/api/v1/c").status_code for _ in range(3)]
    assert counted_answers == [200, 200, 429]
    assert len(stub.calls("/c")) == 1
