from __future__ import annotations

import pytest

from proxy_app.forwarding import (
    body_type_allowed,
    client_header_items,
    filter_response_headers,
    forward_request_headers,
    forwarded_request_headers,
    gateway_location,
    hidden_response_headers,
    judge_target,
    path_problem,
    split_raw_uri,
    target_refusal,
    upstream_path,
)
from proxy_app.upstream import join_url


@pytest.mark.parametrize(
    ("base", "path", "query", "expected"),
    [
        ("https://host/v4", "/x", "", "https://host/v4/x"),
        ("https://host/v4/", "/x/y", "", "https://host/v4/x/y"),
        ("https://host", "/x", "a=1&a=2", "https://host/x?a=1&a=2"),
        ("https://host/v4", "/", "", "https://host/v4/"),
        ("https://host/v4", "x", "", "https://host/v4/x"),
        ("http://host:8080/base/path", "/a%2Fb", "q=%20", "http://host:8080/base/path/a%2Fb?q=%20"),
    ],
)
def test_join_url_keeps_the_base_path(base: str, path: str, query: str, expected: str) -> None:
    assert join_url(base, path, query) == expected


@pytest.mark.parametrize(
    ("raw_uri", "expected"),
    [
        ("/api/v1/things?a=1&b=2&a=3", ("/api/v1/things", "a=1&b=2&a=3")),
        ("/api/v1/things", ("/api/v1/things", "")),
        ("http://gateway.example/api/v1/x?y=1", ("/api/v1/x", "y=1")),
    ],
)
def test_split_raw_uri_keeps_the_query_unchanged(raw_uri: str, expected: tuple[str, str]) -> None:
    assert split_raw_uri(raw_uri) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1//evil.example/x",
        "/api/v1/%2F%2Fevil.example/x",
        "/api/v1/%2f/evil.example",
        "/api/v1/../internal/metrics",
        "/api/v1/things/../../admin",
        "/api/v1/%2e%2e/admin",
        "/api/v1/%2E%2E/admin",
        "/api/v1/.%2e/admin",
        "/api/v1/things/%252e%252e/admin",
        "/api/v1/things/%25252e%25252e/admin",
        "/api/v1/./things",
        "/api/v1/things/..",
        "/api/v1/..%2fadmin",
        "/api/v1/..%5cadmin",
        "/api/v1/things\\..\\admin",
        "/api/v1/%5c%5cevil.example",
        "/api/v1/http://evil.example/x",
        "/api/v1/https:%2F%2Fevil.example",
        "/api/v1/HTTP:\\\\evil.example",
        "/api/v1/things%00.json",
        "/api/v1/things%0d%0aX-Injected:%20yes",
        "/api/v1/things\x7f",
        "/api/v1/caf\u00e9",
        "/api/v1/%25%32%65%25%32%65/admin",
    ],
)
def test_paths_that_could_leave_the_upstream_origin_are_refused(path: str) -> None:
    assert target_refusal(path, "") is not None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/v1/things/1", "/things/1"),
        ("/api/v1", "/"),
        ("/api/v1/", "/"),
        ("/api/v1/files/a%2Fb", "/files/a%2Fb"),
        ("/api/v1/search/caf%C3%A9", "/search/caf%C3%A9"),
        ("/api/v1/a//b", "/a//b"),
        ("/api/v1/v1.2/things", "/v1.2/things"),
        ("/api/v1/...", "/..."),
        ("/api/v1/urn:isbn:123", "/urn:isbn:123"),
        ("/api/v1/%7Euser", "/~user"),
        ("/api/v1/users/%6De", "/users/me"),
        ("/api/v1/a%2fb%3f", "/a%2Fb%3F"),
    ],
)
def test_safe_paths_pass_through_still_encoded(path: str, expected: str) -> None:
    assert target_refusal(path, "") is None
    assert upstream_path(path) == expected


@pytest.mark.parametrize("query", ["a=1\r\nX: y", "a=1#frag", "q=caf\u00e9"])
def test_queries_with_raw_control_or_fragment_characters_are_refused(query: str) -> None:
    assert target_refusal("/api/v1/things", query) is not None


def test_path_problem_names_the_reason() -> None:
    assert path_problem("/%2e%2e/x") == "dot segments"
    assert path_problem("//host") == "a network-path reference (//host)"
    assert path_problem("/ok/path") is None


def test_only_allowlisted_request_headers_are_forwarded() -> None:
    incoming = [
        ("Accept", "application/json"),
        ("Accept-Language", "de-CH"),
        ("Content-Type", "application/json"),
        ("User-Agent", "client/1.0"),
        ("Traceparent", "00-abc-def-01"),
        ("Cookie", "session=1"),
        ("Authorization", "Bearer user-token"),
        ("Host", "gateway.example"),
        ("X-Api-Key", "pk_secret"),
        ("api_key", "caller-supplied"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Host", "evil.example"),
        ("Forwarded", "for=10.0.0.1"),
        ("Connection", "keep-alive, X-Custom"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic x"),
        ("X-Request-Id", "client-chosen"),
    ]
    forwarded = forward_request_headers(incoming, "req-123")
    assert forwarded == {
        "accept": "application/json",
        "accept-language": "de-CH",
        "content-type": "application/json",
        "user-agent": "client/1.0",
        "traceparent": "00-abc-def-01",
        "accept-encoding": "identity",
        "x-request-id": "req-123",
    }


def test_client_accept_encoding_is_forwarded_when_given() -> None:
    forwarded = forward_request_headers([("Accept-Encoding", "gzip")], "r")
    assert forwarded["accept-encoding"] == "gzip"


def test_hop_by_hop_secret_and_upstream_control_headers_are_dropped() -> None:
    upstream = [
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
        ("Cache-Control", "max-age=60"),
        ("ETag", '"v1"'),
        ("Vary", "Accept"),
        ("Set-Cookie", "track=1"),
        ("Connection", "close"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Server", "upstream/1.2"),
        ("X-Powered-By", "php"),
        ("WWW-Authenticate", "ApiKey"),
        ("X-RateLimit-Remaining", "5"),
        ("Content-Length", "10"),
        ("RateLimit", "limit=10"),
        ("RateLimit-Policy", "10;w=60"),
        ("Proxy-Authenticate", "Basic"),
        ("Upgrade", "h2c"),
        ("TE", "trailers"),
        ("Trailer", "Expires"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Cache", "HIT from upstream"),
        ("X-Request-Id", "upstream-id"),
        ("Age", "30"),
        ("Access-Control-Allow-Origin", "*"),
    ]
    passed = filter_response_headers(upstream, "https://up.example/v4")
    assert passed == [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
        ("cache-control", "max-age=60"),
        ("etag", '"v1"'),
        ("vary", "Accept"),
    ]


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("https://up.example/v4/things/2", "/api/v1/things/2"),
        ("https://up.example/v4", "/api/v1/"),
        ("https://up.example/v4?page=2", "/api/v1?page=2"),
        ("/v4/things/2", "/api/v1/things/2"),
        ("https://elsewhere.example/x", "https://elsewhere.example/x"),
        ("https://up.example/v40/x", "https://up.example/v40/x"),
        ("//up.example/v4/x", "//up.example/v4/x"),
        ("things/2", "things/2"),
    ],
)
def test_locations_into_the_upstream_become_gateway_paths(location: str, expected: str) -> None:
    assert gateway_location(location, "https://up.example/v4") == expected


def test_origin_relative_location_with_a_base_url_without_path() -> None:
    assert gateway_location("/things/2", "https://up.example") == "/api/v1/things/2"


@pytest.mark.parametrize("padding", [0, 600])  # remembered, and too long to be remembered
def test_judge_target_gives_the_same_answer_every_time(padding: int) -> None:
    pad = "a" * padding
    for _ in range(2):
        safe = judge_target(f"/api/v1/users/%6De/{pad}?q=%7e&x=%2f")
        assert (safe.path, safe.query, safe.refusal) == (f"/users/me/{pad}", "q=~&x=%2F", None)
        refused = judge_target(f"/api/v1/%2e%2e/admin/{pad}?q=1")
        assert refused.path is None
        assert refused.query == "q=1"
        assert refused.refusal == "The path was refused: dot segments."
        outside = judge_target(f"/elsewhere/{pad}")
        assert outside.refusal == "The path is not under /api/v1."


def test_custom_end_to_end_response_headers_pass() -> None:
    upstream = [
        ("X-Total-Count", "42"),
        ("X-Next-Page", "3"),
        ("Server-Timing", "db;dur=53"),
        ("Content-MD5", "Q2hlY2sgSW50ZWdyaXR5IQ=="),
        ("X-Anything", "value"),
    ]
    passed = filter_response_headers(upstream, "https://up.example/v4")
    assert passed == [(name.lower(), value) for name, value in upstream]


def test_headers_named_in_connection_are_dropped() -> None:
    upstream = [
        ("Connection", "X-Hop-One, x-hop-two"),
        ("X-Hop-One", "1"),
        ("X-Hop-Two", "2"),
        ("X-Kept", "3"),
    ]
    assert filter_response_headers(upstream, "https://up.example/v4") == [("x-kept", "3")]


def test_operator_hidden_response_headers_are_dropped_whatever_their_case() -> None:
    hidden = hidden_response_headers(["x-internal-trace", "x-backend"])
    upstream = [("X-Internal-Trace", "t"), ("X-BACKEND", "b1"), ("X-Total-Count", "1")]
    passed = filter_response_headers(upstream, "https://up.example/v4", hidden)
    assert passed == [("x-total-count", "1")]


def test_added_request_headers_are_forwarded_besides_the_allowlist() -> None:
    allowed = forwarded_request_headers(["Idempotency-Key", "x-tenant"])
    incoming = [("Idempotency-Key", "k-1"), ("X-Tenant", "acme"), ("Cookie", "s=1")]
    forwarded = forward_request_headers(incoming, "r", allowed)
    assert forwarded["idempotency-key"] == "k-1"
    assert forwarded["x-tenant"] == "acme"
    assert "cookie" not in forwarded
    assert "x-tenant" not in forward_request_headers(incoming, "r")


@pytest.mark.parametrize(
    ("mimetype", "allowed", "expected"),
    [
        ("application/json", ("application/json",), True),
        ("application/merge-patch+json", ("application/*+json",), True),
        ("application/json", ("application/*+json",), False),
        ("text/csv", ("text/*",), True),
        ("application/csv", ("text/*",), False),
        ("application/octet-stream", ("*/*",), True),
        ("", ("*/*",), True),
        ("", ("application/json", "text/*"), False),
        ("text/plain", ("application/json",), False),
    ],
)
def test_body_types_match_exact_wildcard_and_suffix_ranges(
    mimetype: str, allowed: tuple[str, ...], expected: bool
) -> None:
    assert body_type_allowed(mimetype, allowed) is expected


def test_client_headers_are_read_off_the_environ_with_lower_case_names() -> None:
    environ = {
        "HTTP_ACCEPT": "application/json",
        "HTTP_X_TENANT_ID": "t-1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "",  # no body: not a header
        "PATH_INFO": "/api/v1/x",
        "wsgi.url_scheme": "http",
    }
    assert sorted(client_header_items(environ)) == [
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("x-tenant-id", "t-1"),
    ]
