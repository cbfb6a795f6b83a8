"""The admin API's OpenAPI document (proxy_app/openapi.json) says what the app does: every
/internal route and method is in it and nothing else, and real answers of each route, errors
included, match the schemas it gives."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from proxy_app.blueprints.admin_openapi import DOCUMENT_PATH
from proxy_app.redis import RedisUnavailable
from tests.conftest import ADMIN_TOKEN, fake_redis_app
from tests.support.openapi import OpenApiDocument, path_shape

AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}
FUTURE = "2099-01-31T00:00:00Z"


@pytest.fixture(scope="module")
def document() -> OpenApiDocument:
    return OpenApiDocument()


@pytest.fixture
def admin(app: Flask) -> FlaskClient:
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {ADMIN_TOKEN}"
    return client


def internal_operations(app: Flask) -> set[tuple[str, str]]:
    """The app's /internal routes as (path shape, METHOD); HEAD and OPTIONS come with every
    rule from Flask and are not operations of their own."""
    return {
        (path_shape(rule.rule), method)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/internal")
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }


def test_every_internal_route_and_method_is_documented_and_nothing_else(
    app: Flask, document: OpenApiDocument
) -> None:
    assert internal_operations(app) == document.operations()


def test_every_documented_path_lies_under_internal(document: OpenApiDocument) -> None:
    assert all(path.startswith("/internal/") for path in document.document["paths"])


def test_the_document_is_valid_openapi_3_1_with_valid_json_schemas(
    document: OpenApiDocument,
) -> None:
    # The OpenAPI 3.1 meta-schema as schemathesis (a pinned development requirement) ships it.
    from schemathesis.specs.openapi.definitions import OPENAPI_31

    jsonschema.Draft202012Validator(OPENAPI_31).validate(document.document)
    assert document.document["openapi"].startswith("3.1.")
    for schema in document.document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_operation_ids_are_unique_and_links_name_existing_ones(document: OpenApiDocument) -> None:
    operations = [
        operation
        for item in document.document["paths"].values()
        for method, operation in item.items()
        if method != "parameters"
    ]
    ids = [operation["operationId"] for operation in operations]
    assert len(ids) == len(set(ids))
    linked = {
        link["operationId"]
        for operation in operations
        for response in operation["responses"].values()
        for link in response.get("links", {}).values()
    }
    assert linked
    assert linked <= set(ids)


def test_the_document_is_served_to_the_admin_and_refused_without_the_token(
    app: Flask, admin: FlaskClient
) -> None:
    served = admin.get("/internal/openapi.json")
    assert served.status_code == 200
    assert served.content_type == "application/json"
    assert served.headers["cache-control"] == "no-store"
    assert served.data == DOCUMENT_PATH.read_bytes()
    refused = app.test_client().get("/internal/openapi.json")
    assert refused.status_code == 401


@dataclass
class Exchange:
    """One request, the documented path it belongs to, and the status it must get."""

    path: str
    method: str
    url: str
    status: int
    json: Any = None
    headers: dict[str, str] = field(default_factory=lambda: dict(AUTH))
    data: str | None = None


def exchanges(key_id: str) -> list[Exchange]:
    keys, one = "/internal/api-keys", "/internal/api-keys/{keyId}"
    revoke, activate = one + "/revoke", one + "/activate"
    invalidate = "/internal/cache/invalidate"
    missing = "Zz0000000000"
    return [
        Exchange("/internal/openapi.json", "GET", "/internal/openapi.json", 200),
        Exchange("/internal/metrics", "GET", "/internal/metrics", 200),
        Exchange("/internal/metrics", "GET", "/internal/metrics", 401, headers={}),
        Exchange(keys, "POST", keys, 201, json={"owner": "acme"}),
        Exchange(
            keys,
            "POST",
            keys,
            201,
            json={
                "owner": "acme",
                "label": "ci",
                "contact": "ops@acme.test",
                "createdBy": "alice",
                "expiresAt": FUTURE,
            },
        ),
        Exchange(keys, "POST", keys, 400, json={"label": "no owner", "expiresAt": "soon"}),
        Exchange(keys, "POST", keys, 400, data="owner=acme"),
        Exchange(keys, "POST", keys, 401, json={"owner": "acme"}, headers={}),
        Exchange(keys, "GET", keys, 200),
        Exchange(keys, "GET", keys, 401, headers={"authorization": "Bearer wrong"}),
        Exchange(one, "GET", f"{keys}/{key_id}", 200),
        Exchange(one, "GET", f"{keys}/{missing}", 404),
        Exchange(revoke, "POST", f"{keys}/{key_id}/revoke", 200),
        Exchange(one, "GET", f"{keys}/{key_id}", 200),
        Exchange(revoke, "POST", f"{keys}/{missing}/revoke", 404),
        Exchange(activate, "POST", f"{keys}/{key_id}/activate", 200),
        Exchange(activate, "POST", f"{keys}/{missing}/activate", 404),
        Exchange(one, "DELETE", f"{keys}/{key_id}", 200),
        Exchange(one, "DELETE", f"{keys}/{key_id}", 404),
        Exchange(invalidate, "POST", invalidate, 200, json={"scope": "exact", "path": "/a?b=1"}),
        Exchange(
            invalidate,
            "POST",
            invalidate,
            200,
            json={"scope": "exact", "path": "/a", "strict": True, "headers": {"accept": "a/b"}},
        ),
        Exchange(invalidate, "POST", invalidate, 200, json={"scope": "prefix", "pathPrefix": "/a"}),
        Exchange(invalidate, "POST", invalidate, 200, json={"scope": "all", "dryRun": True}),
        Exchange(invalidate, "POST", invalidate, 400, json={"scope": "prefix", "strict": True}),
        Exchange(invalidate, "POST", invalidate, 400, json={"scope": "all", "headers": {"a": 1}}),
        Exchange(invalidate, "POST", invalidate, 401, json={"scope": "all"}, headers={}),
    ]


def send(client: FlaskClient, exchange: Exchange) -> TestResponse:
    return client.open(
        exchange.url,
        method=exchange.method,
        json=exchange.json,
        data=exchange.data,
        headers=exchange.headers,
    )


def assert_documented(document: OpenApiDocument, exchange: Exchange, answer: TestResponse) -> None:
    assert answer.status_code == exchange.status, (exchange, answer.data)
    document.validate_response(
        exchange.path,
        exchange.method,
        answer.status_code,
        answer.content_type or "",
        answer.data,
        dict(answer.headers),
    )


def test_real_answers_of_every_operation_match_the_document(
    app: Flask, document: OpenApiDocument
) -> None:
    client = app.test_client()
    with app.app_context():
        record, _raw = app.extensions["proxy_app.key_registry"].create(owner="acme")
    exercised = set()
    for exchange in exchanges(record.key_id):
        assert_documented(document, exchange, send(client, exchange))
        exercised.add((path_shape(exchange.path), exchange.method))
    assert exercised == document.operations()


def test_answers_while_redis_is_unavailable_match_the_document(
    document: OpenApiDocument, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = fake_redis_app()

    def down(_operation: object) -> object:
        raise RedisUnavailable("redis is unavailable")

    for service in app.extensions["proxy_app.redis"].services():
        monkeypatch.setattr(service, "call", down)
    client = app.test_client()
    for exchange in exchanges("Zz0000000000"):
        if exchange.status in (200, 201, 404) and exchange.path != "/internal/openapi.json":
            if exchange.path == "/internal/metrics":
                continue  # metrics come from the worker's own counters, not from Redis
            exchange.status = 503
            assert_documented(document, exchange, send(client, exchange))


def test_a_field_the_document_does_not_know_fails_validation(
    admin: FlaskClient, document: OpenApiDocument
) -> None:
    answer = admin.get("/internal/api-keys")
    assert answer.status_code == 200
    listed = answer.get_json()
    listed["items"].append(
        {
            "keyId": "Zz0000000000",
            "owner": "acme",
            "label": None,
            "contact": None,
            "createdAt": "2026-01-01T00:00:00Z",
            "createdBy": None,
            "expiresAt": None,
            "revoked": False,
            "revokedAt": None,
            "plan": "gold",
        }
    )
    with pytest.raises(jsonschema.ValidationError, match="plan"):
        document.validate_response(
            "/internal/api-keys",
            "GET",
            200,
            "application/json",
            json.dumps(listed).encode(),
            {"cache-control": "no-store"},
        )


def test_a_validation_error_that_names_no_field_fails_validation(
    admin: FlaskClient, document: OpenApiDocument
) -> None:
    answer = admin.post("/internal/api-keys", json={})
    assert answer.status_code == 400
    body = answer.get_json()
    assert body["fields"] == {"owner": ["Missing data for required field."]}
    del body["fields"]
    with pytest.raises(jsonschema.ValidationError, match="fields"):
        document.validate_response(
            "/internal/api-keys", "POST", 400, "application/json", json.dumps(body).encode(), {}
        )
