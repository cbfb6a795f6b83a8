"""Request handling of /api/v1 with a mocked upstream (requests-mock): fast checks of what the
client and the upstream see. The same behaviours run against real servers in integration/."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import requests_mock
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import UPSTREAM_KEY

BASE = "http://upstream.test/v4"


def sent_request(upstream: requests_mock.Mocker) -> Any:
    """What the mocked upstream received last."""
    request = upstream.last_request
    assert request is not None, "the upstream was not called"
    return request


@pytest.fixture
def upstream() -> Iterator[requests_mock.Mocker]:
    with requests_mock.Mocker() as mock:
        yield mock


def test_get_is_forwarded_with_path_query_and_upstream_key(
    client: FlaskClient, upstream: requests_mock.Mocker
) -> None:
    upstream.get(
        f"{BASE}/things/1", content=b'{"id": 1}', headers={"Content-Type": "application/json"}
    )
    response = client.get("/api/v1/things/1?b=2&a=1&b=3")
    assert response.status_code == 200
    assert response.data == b'{"id": 1}'
    assert response.headers["content-type"] == "application/json"
    sent = sent_request(upstream)
    assert sent.url == f"{BASE}/things/1?b=2&a=1&b=3"
    assert sent.headers["api_key"] == UPSTREAM_KEY
    assert "x-api-key" not in {name.lower() for name in sent.headers}


def test_upstream_error_status_and_body_are_passed_through(
    client: FlaskClient, upstream: requests_mock.Mocker
) -> None:
    upstream.get(f"{BASE}/missing", status_code=404, content=b'{"detail": "nope"}')
    response = client.get("/api/v1/missing")
    assert response.status_code == 404
    assert response.data == b'{"detail": "nope"}'


def test_response_without_content_type_gets_none_invented(
    client: FlaskClient, upstream: requests_mock.Mocker
) -> None:
    upstream.get(f"{BASE}/raw", content=b"bytes")
    response = client.get("/api/v1/raw")
    assert "content-type" not in response.headers


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PROPFIND"])
def test_other_methods_get_405_with_allow(client: FlaskClient, method: str) -> None:
    response = client.open("/api/v1/things", method=method)
    assert response.status_code == 405
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    assert allowed == {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
    assert response.json is not None
    assert response.json["error"] == "method_not_allowed"


def test_options_is_forwarded_not_answered_locally(
    client: FlaskClient, upstream: requests_mock.Mocker
) -> None:
    upstream.options(f"{BASE}/things", status_code=204, headers={"Allow": "GET, POST"})
    response = client.options("/api/v1/things")
    assert response.status_code == 204
    assert response.headers["allow"] == "GET, POST"
    assert upstream.call_count == 1


def test_head_keeps_the_upstream_content_length(
    client: FlaskClient, upstream: requests_mock.Mocker
) -> None:
    upstream.head(f"{BASE}/big", headers={"Content-Length": "12345"})
    response = client.head("/api/v1/big")
    assert response.status_code == 200
    assert response.headers["content-length"] == "12345"
    assert response.data == b""


def test_smuggled_path_is_refused_without_calling_upstream(
    client: FlaskClient, upstream: requests_mock.Mocker
) -> None:
    response = client.get("/api/v1/%2e%2e/internal/metrics")
    assert response.status_code == 400
    assert response.json is not None
    assert response.json["error"] == "invalid_path"
    assert upstream.call_count == 0


def test_post_json_bytes_are_forwarded_unchanged(
    client: FlaskClient, upstream: requests_mock.Mocker
) -> None:
    upstream.post(f"{BASE}/things", status_code=201, content=b'{"id": 2}')
    body = b'{ "name" : "caf\xc3\xa9",  "n": 1.50 }'
    response = client.post(
        "/api/v1/things", data=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 201
    assert sent_request(upstream).body == body


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_non_json_bodies_get_415(
    client: FlaskClient, upstream: requests_mock.Mocker, content_type: str
) -> None:
    response = client.post("/api/v1/things", data=b"a=1", headers={"content-type": content_type})
    assert response.status_code == 415
    assert response.json is not None
    assert response.json["error"] == "unsupported_media_type"
    assert upstream.call_count == 0


def test_vendor_json_types_are_accepted(
    client: FlaskClient, upstream: requests_mock.Mocker
) -> None:
    upstream.patch(f"{BASE}/things/1", content=b"{}")
    response = client.patch(
        "/api/v1/things/1", data=b'[{"op":"add"}]', content_type="application/json-patch+json"
    )
    assert response.status_code == 200


def test_invalid_json_gets_400_naming_the_problem(
    client: FlaskClient, upstream: requests_mock.Mocker
) -> None:
    response = client.put("/api/v1/things/1", data=b'{"a": ', content_type="application/json")
    assert response.status_code == 400
    assert response.json is not None
    assert response.json["error"] == "invalid_json"
    assert upstream.call_count == 0


def test_body_over_the_limit_gets_413(client: FlaskClient, upstream: requests_mock.Mocker) -> None:
    body = b'{"a": "' + b"x" * 1_048_576 + b'"}'
    response = client.post("/api/v1/things", data=body, content_type="application/json")
    assert response.status_code == 413
    assert response.json is not None
    assert response.json["error"] == "payload_too_large"
    assert upstream.call_count == 0


def test_post_without_body_needs_no_content_type(
    client: FlaskClient, upstream: requests_mock.Mocker
) -> None:
    upstream.post(f"{BASE}/things/1/touch", status_code=204)
    response = client.post("/api/v1/things/1/touch")
    assert response.status_code == 204
    assert sent_request(upstream).body is None


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (requests.exceptions.ConnectTimeout, "upstream_timeout"),
        (requests.exceptions.ReadTimeout, "upstream_timeout"),
        (requests.exceptions.ConnectionError, "upstream_connection_error"),
    ],
)
def test_upstream_failures_become_502_naming_the_kind(
    client: FlaskClient, upstream: requests_mock.Mocker, raised: type[Exception], code: str
) -> None:
    upstream.get(f"{BASE}/x", exc=raised)
    response = client.get("/api/v1/x")
    assert response.status_code == 502
    assert response.json is not None
    assert response.json["error"] == code
    assert response.json["kind"] in ("timeout", "connection_error")
    assert UPSTREAM_KEY not in response.get_data(as_text=True)


def test_redirect_location_into_upstream_is_rewritten(
    client: FlaskClient, upstream: requests_mock.Mocker
) -> None:
    upstream.get(f"{BASE}/old", status_code=301, headers={"Location": f"{BASE}/new?x=1"})
    response = client.get("/api/v1/old")
    assert response.status_code == 301
    assert response.headers["location"] == "/api/v1/new?x=1"


def test_request_id_is_taken_from_the_client_or_generated(
    client: FlaskClient, upstream: requests_mock.Mocker
) -> None:
    upstream.get(f"{BASE}/x")
    given = client.get("/api/v1/x", headers={"x-request-id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    assert sent_request(upstream).headers["x-request-id"] == "abc-123"
    generated = client.get("/api/v1/x", headers={"x-request-id": "bad id\twith spaces"})
    assert len(generated.headers["x-request-id"]) == 32


def test_encoded_forms_of_a_bypassed_path_are_bypassed_too(upstream: requests_mock.Mocker) -> None:
    from tests.conftest import fake_redis_app

    app = fake_redis_app(cache_bypass_paths=("/users/me",))
    with app.app_context():
        _, key = app.extensions["proxy_app.key_registry"].create(owner="t")
    upstream.get(f"{BASE}/users/me", content=b"{}", headers={"cache-control": "max-age=60"})
    client = app.test_client()
    for path in ("/api/v1/users/me", "/api/v1/users/%6De", "/api/v1/%75sers/me"):
        response = client.get(path, headers={"x-api-key": key})
        assert response.headers["x-cache"] == "BYPASS", path
    assert upstream.call_count == 3


def test_answers_made_by_the_gateway_say_bypass_too(client: FlaskClient) -> None:
    refused = client.get("/api/v1/x", headers={"x-api-key": "nope"})
    assert (refused.status_code, refused.headers["x-cache"]) == (401, "BYPASS")
    assert client.get("/api/v1/%2e%2e/x").headers["x-cache"] == "BYPASS"


def test_a_corrupt_cache_entry_is_replaced_not_a_500(
    app: Flask, client: FlaskClient, upstream: requests_mock.Mocker
) -> None:
    from proxy_app.cache import policy
    from proxy_app.cache.store import Stored, encode
    from proxy_app.forwarding import forward_request_headers

    upstream.get(f"{BASE}/c", content=b'{"fresh": 1}', headers={"cache-control": "max-age=60"})
    key = policy.cache_key("/c", "", forward_request_headers([], request_id="r"))
    garbage = encode(Stored(b"\x00\x00\x00\x05{not json", 0.0, 9e12, 9e12, 9e12))
    app.extensions["proxy_app.redis"].cache.client.set(key, garbage)
    response = client.get("/api/v1/c")
    assert (response.status_code, response.headers["x-cache"]) == (200, "MISS")
    assert response.data == b'{"fresh": 1}'
    assert client.get("/api/v1/c").headers["x-cache"] == "HIT"
