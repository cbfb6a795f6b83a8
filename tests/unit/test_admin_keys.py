from __future__ import annotations

import logging

import pytest
from flask import Flask
from flask.testing import FlaskClient

from proxy_app.admin_auth import FAILURES_ALLOWED
from proxy_app.redis import RedisUnavailable
from tests.support.app import ADMIN_TOKEN, fake_redis_app

AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def admin(app: Flask) -> FlaskClient:
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {ADMIN_TOKEN}"
    return client


def test_create_returns_the_raw_key_once_and_list_never_shows_it(
    admin: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy_app.audit")
    created = admin.post(
        "/internal/api-keys",
        json={
            "owner": "acme",
            "label": "ci",
            "contact": "ops@acme.test",
            "expiresAt": "2031-06-01T12:00:00+02:00",
            "createdBy": "alice",
        },
    )
    assert created.status_code == 201
    body = created.get_json()
    assert body["apiKey"].startswith(f"pk_{body['keyId']}_")
    assert body["owner"] == "acme"
    assert body["expiresAt"] == "2031-06-01T10:00:00Z"
    assert body["revoked"] is False
    listed = admin.get("/internal/api-keys").get_json()
    assert [item["keyId"] for item in listed["items"]] == [body["keyId"]]
    assert "apiKey" not in listed["items"][0]
    assert "hash" not in listed["items"][0]
    assert body["apiKey"] not in admin.get("/internal/api-keys").get_data(as_text=True)
    audit = [r for r in caplog.records if r.name == "proxy_app.audit"]
    assert [(r.action, r.outcome) for r in audit] == [("api_key.create", "ok")]  # type: ignore[attr-defined]
    assert body["apiKey"] not in caplog.text


@pytest.mark.parametrize(
    ("payload", "bad_fields"),
    [
        ({}, {"owner"}),
        ({"owner": ""}, {"owner"}),
        ({"owner": "x" * 201}, {"owner"}),
        ({"owner": "a", "expiresAt": "tomorrow"}, {"expiresAt"}),
        ({"owner": "a", "expiresAt": "2001-01-01T00:00:00Z"}, {"expiresAt"}),
        ({"owner": "a", "role": "admin"}, {"role"}),
        ({"owner": 5, "label": 7}, {"owner", "label"}),
        ({"owner": "\ud800"}, {"owner"}),
        ({"owner": "a", "expiresAt": "9999-12-31T23:59:59-05:00"}, {"expiresAt"}),
    ],
)
def test_invalid_bodies_get_400_naming_each_field(
    admin: FlaskClient, payload: dict[str, object], bad_fields: set[str]
) -> None:
    response = admin.post("/internal/api-keys", json=payload)
    assert response.status_code == 400
    body = response.get_json()
    assert body["error"] == "validation_failed"
    assert set(body["fields"]) == bad_fields
    assert admin.get("/internal/api-keys").get_json() == {"items": [], "nextCursor": None}


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b'"owner"'])
def test_non_object_bodies_get_400(admin: FlaskClient, data: bytes) -> None:
    response = admin.post("/internal/api-keys", data=data, content_type="application/json")
    assert (response.status_code, response.get_json()["error"]) == (400, "invalid_body")


def test_lifecycle_calls_answer_ok_or_404(admin: FlaskClient) -> None:
    key_id = admin.post("/internal/api-keys", json={"owner": "a"}).get_json()["keyId"]
    for path in (f"{key_id}/revoke", f"{key_id}/activate"):
        response = admin.post(f"/internal/api-keys/{path}")
        assert (response.status_code, response.get_json()) == (200, {"ok": True})
    assert admin.get(f"/internal/api-keys/{key_id}").get_json()["revoked"] is False
    assert admin.delete(f"/internal/api-keys/{key_id}").get_json() == {"ok": True}
    for method, path in (
        ("POST", f"{key_id}/revoke"),
        ("POST", "nope/activate"),
        ("DELETE", key_id),
        ("GET", key_id),
    ):
        response = admin.open(f"/internal/api-keys/{path}", method=method)
        assert (response.status_code, response.get_json()["error"]) == (404, "api_key_not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/internal/api-keys"),
        ("GET", "/internal/api-keys"),
        ("POST", "/internal/api-keys/x/revoke"),
        ("DELETE", "/internal/api-keys/x"),
        ("POST", "/internal/cache/invalidate"),
    ],
)
def test_admin_routes_refuse_a_wrong_token_and_change_nothing(
    app: Flask, method: str, path: str
) -> None:
    client = app.test_client()
    response = client.open(
        path,
        method=method,
        json={"owner": "x", "scope": "all"},
        headers={"authorization": "Bearer wrong"},
    )
    assert response.status_code == 401
    listed = client.get("/internal/api-keys", headers=AUTH).get_json()
    assert listed == {"items": [], "nextCursor": None}


def test_repeated_wrong_tokens_are_throttled_but_the_right_token_still_works(app: Flask) -> None:
    client = app.test_client()
    statuses = [
        client.get("/internal/api-keys", headers={"authorization": "Bearer wrong"}).status_code
        for _ in range(FAILURES_ALLOWED + 2)
    ]
    assert statuses[:FAILURES_ALLOWED] == [401] * FAILURES_ALLOWED
    assert statuses[-1] == 429
    assert client.get("/internal/api-keys", headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/internal/api-keys"),
        ("get", "/internal/api-keys"),
        ("get", "/internal/api-keys/abc"),
        ("post", "/internal/api-keys/abc/revoke"),
        ("delete", "/internal/api-keys/abc"),
    ],
)
def test_redis_unavailable_gives_503_and_changes_nothing(
    app: Flask, admin: FlaskClient, monkeypatch: pytest.MonkeyPatch, method: str, path: str
) -> None:
    def down(*_args: object, **_kwargs: object) -> object:
        raise RedisUnavailable("keys is unavailable")

    monkeypatch.setattr(app.extensions["proxy_app.redis"].keys, "_guarded", down)
    response = admin.open(path, method=method.upper(), json={"owner": "acme"})
    body = response.get_json()
    assert (response.status_code, body["error"]) == (503, "keys_unavailable")
    assert body["message"] == "The key store (Redis) is unavailable; nothing was changed."


def test_the_number_of_wrong_tokens_allowed_is_a_setting() -> None:
    client = fake_redis_app(admin_auth_max_failures=2).test_client()
    statuses = [
        client.get("/internal/api-keys", headers={"authorization": "Bearer wrong"}).status_code
        for _ in range(3)
    ]
    assert statuses == [401, 401, 429]
    assert client.get("/internal/api-keys", headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=%C2%B2", "limit"),  # '²' is a digit to str.isdigit(), not to int()
        ("cursor=%C2%B2", "cursor"),
        ("cursor=1%3A%C2%B2", "cursor"),
        ("cursor=18446744073709551616", "cursor"),  # beyond 64 bits: Redis refuses it
        ("cursor=", "cursor"),
        ("status=", "status"),
    ],
)
def test_key_list_parameters_that_are_not_valid_get_400_naming_them(
    admin: FlaskClient, query: str, field: str
) -> None:
    answer = admin.get(f"/internal/api-keys?{query}")
    assert answer.status_code == 400
    assert list(answer.get_json()["fields"]) == [field]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"metadata": {"n": 2**64}}, "metadata"),  # cannot be shown back as JSON
        ({"allowedIps": ["fe80::1%eth0"]}, "allowedIps"),
        ({"scopes": {"pathPrefixes": ["/items\n"]}}, "scopes"),
        ({"plan": "gold\n"}, "plan"),
    ],
)
def test_key_fields_that_cannot_be_kept_get_400_naming_them(
    admin: FlaskClient, body: dict[str, object], field: str
) -> None:
    created = admin.post("/internal/api-keys", json={"owner": "acme", **body})
    assert created.status_code == 400
    assert list(created.get_json()["fields"]) == [field]
    key_id = admin.post("/internal/api-keys", json={"owner": "acme"}).get_json()["keyId"]
    patched = admin.patch(f"/internal/api-keys/{key_id}", json=body)
    assert patched.status_code == 400
    assert list(patched.get_json()["fields"]) == [field]


def test_a_change_without_expires_at_leaves_it_and_an_empty_change_names_the_body(
    admin: FlaskClient,
) -> None:
    created = admin.post("/internal/api-keys", json={"owner": "acme", "expiresAt": "2099-01-01"})
    key_id = created.get_json()["keyId"]
    patched = admin.patch(f"/internal/api-keys/{key_id}", json={"label": "ci"})
    assert patched.status_code == 200
    assert patched.get_json()["expiresAt"] == "2099-01-01T00:00:00Z"
    assert patched.get_json()["label"] == "ci"
    empty = admin.patch(f"/internal/api-keys/{key_id}", json={})
    assert empty.status_code == 400
    assert list(empty.get_json()["fields"]) == ["_schema"]


def test_integers_may_be_written_with_a_zero_fraction_and_flags_only_as_booleans(
    admin: FlaskClient,
) -> None:
    plan = {"name": "gold", "limits": [{"max": 10.0, "windowSeconds": 1}]}
    created = admin.post("/internal/plans", json=plan)
    assert created.status_code == 201
    assert created.get_json()["limits"] == [{"max": 10, "windowSeconds": 1}]
    half = admin.post(
        "/internal/plans",
        json={**plan, "name": "half", "limits": [{"max": 1.5, "windowSeconds": 1}]},
    )
    assert half.status_code == 400
    flag = admin.post("/internal/plans", json={**plan, "name": "flag", "cacheHitsFree": 1})
    assert flag.status_code == 400
    assert list(flag.get_json()["fields"]) == ["cacheHitsFree"]
    key_id = admin.post("/internal/api-keys", json={"owner": "acme"}).get_json()["keyId"]
    rolled = admin.post(f"/internal/api-keys/{key_id}/roll", json={"gracePeriodSeconds": 60.0})
    assert rolled.status_code == 201


def test_requests_without_a_token_are_told_401_however_many(app: Flask) -> None:
    client = app.test_client()
    statuses = {client.get("/internal/api-keys").status_code for _ in range(FAILURES_ALLOWED + 2)}
    assert statuses == {401}
