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
from tests.support.app import ADMIN_TOKEN, fake_redis_app
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
    revoke, activate, roll = one + "/revoke", one + "/activate", one + "/roll"
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
        Exchange(roll, "POST", f"{keys}/{key_id}/roll", 409, json={"gracePeriodSeconds": 0}),
        Exchange(revoke, "POST", f"{keys}/{missing}/revoke", 404),
        Exchange(activate, "POST", f"{keys}/{key_id}/activate", 200),
        Exchange(activate, "POST", f"{keys}/{missing}/activate", 404),
        *plan_and_lifecycle_exchanges(key_id),
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


def plan_and_lifecycle_exchanges(key_id: str) -> list[Exchange]:
    """Plans, and a key put on one, changed, listed and rolled; every 409 with its code."""
    keys, one = "/internal/api-keys", "/internal/api-keys/{keyId}"
    roll = one + "/roll"
    plans, plan = "/internal/plans", "/internal/plans/{name}"
    missing = "Zz0000000000"
    per_second = {"max": 10, "windowSeconds": 1}
    gold = {
        "name": "gold",
        "limits": [per_second, {"max": 1000, "windowSeconds": 86400}],
        "quota": {"max": 100000, "period": "month"},
        "cacheHitsFree": True,
    }
    replaced = {"limits": [{"max": 20, "windowSeconds": 1}], "quota": None, "shareByOwner": True}
    on_gold = {
        "owner": "acme",
        "plan": "gold",
        "limits": [{"max": 5, "windowSeconds": 1}],
        "quota": {"max": 10, "period": "day"},
        "metadata": {"team": "billing", "tier": 2},
        "scopes": {"methods": ["GET"], "pathPrefixes": ["/items"]},
        "allowedIps": ["203.0.113.0/24", "2001:db8::/32"],
    }
    return [
        Exchange(plans, "POST", plans, 201, json=gold),
        Exchange(plans, "POST", plans, 409, json=gold),
        Exchange(plans, "POST", plans, 400, json={"name": "default", "limits": []}),
        Exchange(plans, "POST", plans, 201, json={"name": "spare", "limits": [per_second]}),
        Exchange(plans, "GET", plans, 200),
        Exchange(plans, "GET", plans, 401, headers={}),
        Exchange(plan, "GET", f"{plans}/gold", 200),
        Exchange(plan, "GET", f"{plans}/default", 200),
        Exchange(plan, "GET", f"{plans}/nope", 404),
        Exchange(plan, "PUT", f"{plans}/gold", 200, json=replaced),
        Exchange(plan, "PUT", f"{plans}/nope", 404, json=replaced),
        Exchange(plan, "PUT", f"{plans}/default", 409, json=replaced),
        Exchange(plan, "PUT", f"{plans}/gold", 400, json={"limits": [{"max": 0}]}),
        Exchange(plan, "DELETE", f"{plans}/spare", 200),
        Exchange(plan, "DELETE", f"{plans}/spare", 404),
        Exchange(plan, "DELETE", f"{plans}/default", 409),
        Exchange(keys, "POST", keys, 201, json=on_gold),
        Exchange(keys, "POST", keys, 400, json={"owner": "acme", "plan": "nope"}),
        Exchange(one, "PATCH", f"{keys}/{key_id}", 200, json={"plan": "gold", "label": "moved"}),
        Exchange(one, "PATCH", f"{keys}/{key_id}", 200, json={"limits": None, "expiresAt": None}),
        Exchange(one, "PATCH", f"{keys}/{key_id}", 400, json={}),
        Exchange(one, "PATCH", f"{keys}/{key_id}", 400, json={"metadata": {"n": 2**70}}),
        Exchange(one, "PATCH", f"{keys}/{missing}", 404, json={"label": "x"}),
        Exchange(plan, "DELETE", f"{plans}/gold", 409),
        Exchange(keys, "GET", f"{keys}?owner=acme&status=active&plan=gold&limit=1", 200),
        Exchange(keys, "GET", f"{keys}?limit=0&status=gone&cursor=x", 400),
        Exchange(roll, "POST", f"{keys}/{key_id}/roll", 201, json={"gracePeriodSeconds": 60}),
        Exchange(roll, "POST", f"{keys}/{key_id}/roll", 409, json={"gracePeriodSeconds": 60}),
        Exchange(roll, "POST", f"{keys}/{key_id}/roll", 400, json={"gracePeriodSeconds": -1}),
        Exchange(roll, "POST", f"{keys}/{missing}/roll", 404, json={"gracePeriodSeconds": 0}),
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

    def down(*_args: object, **_kwargs: object) -> object:
        raise RedisUnavailable("redis is unavailable")

    for service in app.extensions["proxy_app.redis"].services():
        monkeypatch.setattr(service, "_guarded", down)
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
    assert admin.post("/internal/api-keys", json={"owner": "acme"}).status_code == 201
    answer = admin.get("/internal/api-keys")
    assert answer.status_code == 200
    listed = answer.get_json()
    listed["items"].append({**listed["items"][0], "hash": "0" * 64})
    with pytest.raises(jsonschema.ValidationError) as refused:
        document.validate_response(
            "/internal/api-keys",
            "GET",
            200,
            "application/json",
            json.dumps(listed).encode(),
            {"cache-control": "no-store"},
        )
    assert "'hash' was unexpected" in refused.value.message
    # The real answer, without the stray field, is fine.
    listed["items"].pop()
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
