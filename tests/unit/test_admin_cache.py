from __future__ import annotations

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient

from proxy_app.cache import policy
from proxy_app.forwarding import forward_request_headers
from proxy_app.redis import RedisUnavailable
from tests.support.app import ADMIN_TOKEN, fake_redis_app

# Keys as the proxy makes them: from the headers it forwards (accept-encoding defaults included).
JSON = forward_request_headers([("Accept", "application/json")], request_id="r")
XML = forward_request_headers([("Accept", "application/xml")], request_id="r")
SEEDED = [
    ("/things/1", "", JSON),
    ("/things/1", "", XML),
    ("/things/1", "q=1", JSON),
    ("/things/10", "", JSON),
    ("/things/*", "", JSON),
    ("/things/[a]", "x=?", JSON),
    ("/other", "", JSON),
]


@pytest.fixture
def fake(app: Flask) -> fakeredis.FakeRedis:
    client: fakeredis.FakeRedis = app.extensions["proxy_app.redis"].cache.client
    for path, query, headers in SEEDED:
        client.set(policy.cache_key(path, query, headers), b"entry")
    client.set("api-keys:key:abc", b"record")
    client.set("proxy:index:/things/1", b"index")
    client.set("proxy:lock:proxy:GET:/x#1", b"lock")
    return client


@pytest.fixture
def admin(app: Flask) -> FlaskClient:
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {ADMIN_TOKEN}"
    return client


def invalidate(admin: FlaskClient, **body: object) -> dict[str, object]:
    response = admin.post("/internal/cache/invalidate", json=body)
    assert response.status_code == 200, response.get_json()
    answer: dict[str, object] = response.get_json()
    return answer


def remaining(fake: fakeredis.FakeRedis) -> int:
    return len(fake.keys(policy.KEY_PREFIX + "*"))


def test_exact_removes_every_variant_of_that_target_only(
    admin: FlaskClient, fake: fakeredis.FakeRedis
) -> None:
    answer = invalidate(admin, scope="exact", path="/things/1")
    assert answer == {"ok": True, "scope": "exact", "dryRun": False, "matched": 2, "deleted": 2}
    assert fake.exists(policy.cache_key("/things/1", "q=1", JSON))
    assert fake.exists(policy.cache_key("/things/10", "", JSON))
    assert remaining(fake) == 5


def test_exact_strict_removes_one_variant(admin: FlaskClient, fake: fakeredis.FakeRedis) -> None:
    answer = invalidate(
        admin,
        scope="exact",
        path="/api/v1/things/1",
        strict=True,
        headers={"Accept": "application/xml"},
    )
    assert (answer["matched"], answer["deleted"]) == (1, 1)
    assert fake.exists(policy.cache_key("/things/1", "", JSON))
    assert not fake.exists(policy.cache_key("/things/1", "", XML))


def test_exact_with_a_query_and_glob_characters(
    admin: FlaskClient, fake: fakeredis.FakeRedis
) -> None:
    assert invalidate(admin, scope="exact", path="/things/1?q=1")["deleted"] == 1
    assert invalidate(admin, scope="exact", path="/things/*")["deleted"] == 1
    assert invalidate(admin, scope="exact", path="/things/[a]?x=?")["deleted"] == 1
    assert fake.exists(policy.cache_key("/things/10", "", JSON))
    assert remaining(fake) == 4


def test_prefix_removes_keys_under_it(admin: FlaskClient, fake: fakeredis.FakeRedis) -> None:
    answer = invalidate(admin, scope="prefix", pathPrefix="/things/1")
    assert (answer["matched"], answer["deleted"]) == (4, 4)  # /things/1 (3) and /things/10
    assert remaining(fake) == 3


def test_all_removes_every_cache_entry_and_nothing_else(
    admin: FlaskClient, fake: fakeredis.FakeRedis
) -> None:
    answer = invalidate(admin, scope="all")
    assert (answer["matched"], answer["deleted"]) == (7, 7)
    assert remaining(fake) == 0
    assert (
        fake.exists("api-keys:key:abc", "proxy:index:/things/1", "proxy:lock:proxy:GET:/x#1") == 3
    )


def test_dry_run_counts_and_deletes_nothing(admin: FlaskClient, fake: fakeredis.FakeRedis) -> None:
    answer = invalidate(admin, scope="all", dryRun=True)
    assert answer == {"ok": True, "scope": "all", "dryRun": True, "matched": 7, "deleted": 0}
    assert remaining(fake) == 7


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"scope"}),
        ({"scope": "everything"}, {"scope"}),
        ({"scope": "exact"}, {"path"}),
        ({"scope": "prefix"}, {"pathPrefix"}),
        ({"scope": "exact", "path": "things"}, {"path"}),
        ({"scope": "all", "strict": True}, {"strict"}),
        ({"scope": "all", "dryRun": "perhaps"}, {"dryRun"}),
        ({"scope": "all", "extra": 1}, {"extra"}),
        ({"scope": "all", "dryRun": 1}, {"dryRun"}),
        ({"scope": "exact", "path": "/a", "strict": "true"}, {"strict"}),
        ({"scope": "all", "path": None, "headers": None}, {"path", "headers"}),
        ({"scope": "exact", "path": "/a", "strict": True, "headers": {"a": "\udc00"}}, {"headers"}),
        ({"scope": "prefix", "pathPrefix": "/\ud800"}, {"pathPrefix"}),
    ],
)
def test_invalid_bodies_get_400_naming_each_field(
    admin: FlaskClient, fake: fakeredis.FakeRedis, body: dict[str, object], fields: set[str]
) -> None:
    response = admin.post("/internal/cache/invalidate", json=body)
    assert response.status_code == 400
    assert set(response.get_json()["fields"]) == fields
    assert remaining(fake) == 7


def test_redis_unavailable_gives_503(
    app: Flask, admin: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(_operation: object) -> object:
        raise RedisUnavailable("cache is unavailable")

    monkeypatch.setattr(app.extensions["proxy_app.redis"].cache, "_guarded", down)
    response = admin.post("/internal/cache/invalidate", json={"scope": "all"})
    assert (response.status_code, response.get_json()["error"]) == (503, "cache_unavailable")


def test_exact_strict_selects_the_variant_by_added_forwarded_headers_too() -> None:
    app = fake_redis_app(proxy_forward_request_headers=("x-tenant",))
    client: fakeredis.FakeRedis = app.extensions["proxy_app.redis"].cache.client
    allowed = app.extensions["proxy_app.forwarded_headers"]
    for tenant in ("a", "b"):
        headers = forward_request_headers([("X-Tenant", tenant)], "r", allowed)
        client.set(policy.cache_key("/orders", "", headers, ("x-tenant",)), b"entry")
    admin = app.test_client()
    admin.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {ADMIN_TOKEN}"
    answer = invalidate(
        admin, scope="exact", path="/orders", strict=True, headers={"X-Tenant": "a"}
    )
    assert (answer["matched"], answer["deleted"]) == (1, 1)
    assert remaining(client) == 1
