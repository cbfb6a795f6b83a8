"""Headers across the real service: upstream response headers passed end to end, operator-added
request headers, request body types, and CORS."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests

from tests.integration.test_proxy_server import upstream_env
from tests.support.gateway import Gateway
from tests.support.stub_upstream import Reply, StubUpstream

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]


def test_end_to_end_upstream_headers_pass_and_hidden_ones_do_not(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    gateway = start_gateway(upstream_env(stub, PROXY_HIDE_RESPONSE_HEADERS="X-Backend"))
    stub.reply(
        "/v4/items",
        Reply(
            body=b'{"items": []}',
            headers=(
                ("Content-Type", "application/json"),
                ("Cache-Control", "max-age=6000"),
                ("X-Total-Count", "42"),
                ("X-Next-Page", "/v4/items?page=2"),
                ("Server-Timing", "db;dur=53"),
                ("Content-MD5", "Q2hlY2sgSW50ZWdyaXR5IQ=="),
                ("Connection", "X-Hop"),
                ("X-Hop", "1"),
                ("X-Backend", "db-7"),
                ("Server", "upstream/1.0"),
                ("X-Powered-By", "php"),
                ("WWW-Authenticate", "ApiKey"),
                ("X-RateLimit-Remaining", "999"),
                ("RateLimit", "limit=10, remaining=9"),
                ("X-Cache", "HIT"),
                ("X-Request-Id", "upstream-id"),
                ("Age", "5000"),
            ),
        ),
    )
    first = gateway.get("/api/v1/items", headers={"X-Request-Id": "client-id-1"})
    second = gateway.get("/api/v1/items", headers={"X-Request-Id": "client-id-2"})
    assert first.status_code == second.status_code == 200
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    for response, request_id in ((first, "client-id-1"), (second, "client-id-2")):
        raw = response.raw.headers
        assert response.headers["x-total-count"] == "42"
        assert response.headers["x-next-page"] == "/v4/items?page=2"
        assert response.headers["server-timing"] == "db;dur=53"
        assert response.headers["content-md5"] == "Q2hlY2sgSW50ZWdyaXR5IQ=="
        for absent in ("x-hop", "x-backend", "x-powered-by", "www-authenticate"):
            assert absent not in response.headers
        assert raw.getlist("ratelimit") == [response.headers["ratelimit"]]
        assert "limit=10" not in response.headers["ratelimit"]
        assert raw.getlist("server") != ["upstream/1.0"]
        assert raw.getlist("x-cache") == [response.headers["x-cache"]]
        assert raw.getlist("x-request-id") == [request_id]
        assert len(raw.getlist("x-ratelimit-remaining")) == 1
        assert response.headers["x-ratelimit-remaining"] != "999"
        assert int(response.headers["content-length"]) == len(response.content)
    # The cache's own age, once, which counts the age the upstream reported (RFC 9111 5.1).
    for response in (first, second):
        assert response.raw.headers.getlist("age") == [response.headers["age"]]
        assert int(response.headers["age"]) >= 5000
    assert len(stub.calls("/v4/items")) == 1


def test_added_request_headers_are_forwarded_and_split_the_cache_per_value(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    gateway = start_gateway(
        upstream_env(
            stub,
            PROXY_FORWARD_REQUEST_HEADERS="x-tenant,Prefer",
            PROXY_BODY_TYPES="application/json,text/*",
        )
    )
    stub.reply(
        "/v4/report",
        Reply(body=b'{"for": "one"}', headers=(("Cache-Control", "max-age=60"),)),
        Reply(body=b'{"for": "two"}', headers=(("Cache-Control", "max-age=60"),)),
    )
    one = gateway.get("/api/v1/report", headers={"X-Tenant": "one", "Prefer": "minimal"})
    two = gateway.get("/api/v1/report", headers={"X-Tenant": "two", "Prefer": "minimal"})
    one_again = gateway.get("/api/v1/report", headers={"X-Tenant": "one", "Prefer": "minimal"})
    assert (one.content, two.content, one_again.content) == (
        b'{"for": "one"}',
        b'{"for": "two"}',
        b'{"for": "one"}',
    )
    assert one_again.headers["x-cache"] == "HIT"
    sent = stub.calls("/v4/report")
    assert [(c.header("x-tenant"), c.header("prefer")) for c in sent] == [
        ("one", "minimal"),
        ("two", "minimal"),
    ]

    stub.reply("/v4/notes", Reply(status=201))
    note = b"line one\r\nline two \xe2\x9c\x93\n"
    created = gateway.request(
        "POST", "/api/v1/notes", data=note, headers={"Content-Type": "text/markdown"}
    )
    assert created.status_code == 201
    assert stub.last().body == note
    refused = gateway.request(
        "POST", "/api/v1/notes", data=b"<a/>", headers={"Content-Type": "application/xml"}
    )
    assert refused.status_code == 415
    assert refused.json()["allowed"] == ["application/json", "text/*"]
    assert len(stub.calls("/v4/notes")) == 1


def test_a_forbidden_added_request_header_stops_start_up_naming_it(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    gateway = start_gateway(
        upstream_env(stub, PROXY_FORWARD_REQUEST_HEADERS="x-tenant,Authorization"), wait=False
    )
    assert gateway.wait_exit() == 2
    assert "PROXY_FORWARD_REQUEST_HEADERS=" in gateway.output()


def test_cors_preflight_and_answers_for_allowed_origins_only(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    app_origin, other_origin = "https://app.example.com", "http://localhost:5173"
    gateway = start_gateway(
        upstream_env(
            stub,
            CORS_ALLOWED_ORIGINS=f"{app_origin},{other_origin}",
            PROXY_FORWARD_REQUEST_HEADERS="x-tenant",
        )
    )
    preflight = requests.options(
        gateway.url + "/api/v1/things",
        headers={
            "Origin": app_origin,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "x-api-key, content-type, x-tenant",
        },
        timeout=10,
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == app_origin
    assert "PUT" in preflight.headers["access-control-allow-methods"]
    assert "x-tenant" in preflight.headers["access-control-allow-headers"]
    refused = requests.options(
        gateway.url + "/api/v1/things",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        timeout=10,
    )
    assert refused.status_code == 403
    assert "access-control-allow-origin" not in refused.headers
    assert not stub.received

    stub.reply("/v4/things", Reply(headers=(("Cache-Control", "max-age=60"),)))
    first = gateway.get("/api/v1/things", headers={"Origin": app_origin})
    second = gateway.get("/api/v1/things", headers={"Origin": other_origin})
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.raw.headers.getlist("access-control-allow-origin") == [app_origin]
    assert second.raw.headers.getlist("access-control-allow-origin") == [other_origin]
    assert "x-cache" in second.headers["access-control-expose-headers"]
    unauthorized = requests.get(
        gateway.url + "/api/v1/things", headers={"Origin": app_origin}, timeout=10
    )
    assert unauthorized.status_code == 401
    assert unauthorized.headers["access-control-allow-origin"] == app_origin
    health = requests.get(gateway.url + "/health", headers={"Origin": app_origin}, timeout=10)
    assert "access-control-allow-origin" not in health.headers
