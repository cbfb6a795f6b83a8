from __future__ import annotations

import logging

import pytest
from flask import Flask
from flask.testing import FlaskClient

from proxy_app.admin_auth import FAILURES_ALLOWED
from tests.conftest import ADMIN_TOKEN

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


def test_requests_without_a_token_are_told_401_however_many(app: Flask) -> None:
    client = app.test_client()
    statuses = {client.get("/internal/api-keys").status_code for _ in range(FAILURES_ALLOWED + 2)}
    assert statuses == {401}
