"""Request handling of /api/v1 through the Flask test client, with fakeredis and the stub
upstream (a real HTTP server on 127.0.0.1): fast checks of what the client and the upstream see.
The same behaviours run against the real service in integration/."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from email.utils import formatdate

import pytest
from flask import Flask
from flask.testing import FlaskClient

from proxy_app.cache.policy import MAX_STORED_BODY_BYTES
from proxy_app.http_connection import ResponseAborted
from proxy_app.upstream import UpstreamResponseTooLarge
from tests.support.app import UPSTREAM_KEY, fake_redis_app
from tests.support.net import free_port
from tests.support.stub_upstream import Recorded, Reply, StubUpstream, generated_digest


def sent_request(upstream: StubUpstream) -> Recorded:
    """What the stub upstream received last."""
    assert upstream.received, "the upstream was not called"
    return upstream.last()


@pytest.fixture
def upstream(stub: StubUpstream) -> StubUpstream:
    return stub


@pytest.fixture
def app(stub: StubUpstream) -> Flask:
    return fake_redis_app(upstream_base_url=f"{stub.url}/v4")


def keyed_client(app: Flask) -> FlaskClient:
    with app.app_context():
        _, key = app.extensions["proxy_app.key_registry"].create(owner="t")
    client = app.test_client()
    client.environ_base["HTTP_X_API_KEY"] = key
    return client


def digest(pieces: Iterable[bytes]) -> str:
    hashed = hashlib.sha256()
    for piece in pieces:
        hashed.update(piece)
    return hashed.hexdigest()


def test_get_is_forwarded_with_path_query_and_upstream_key(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    upstream.reply(
        "/v4/things/1", Reply(body=b'{"id": 1}', headers=(("Content-Type", "application/json"),))
    )
    response = client.get("/api/v1/things/1?b=2&a=1&b=3")
    assert response.status_code == 200
    assert response.data == b'{"id": 1}'
    assert response.headers["content-type"] == "application/json"
    sent = sent_request(upstream)
    assert (sent.path, sent.query) == ("/v4/things/1", "b=2&a=1&b=3")
    assert sent.header("api_key") == UPSTREAM_KEY
    assert "x-api-key" not in sent.header_names()


def test_upstream_error_status_and_body_are_passed_through(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    upstream.reply("/v4/missing", Reply(status=404, body=b'{"detail": "nope"}'))
    response = client.get("/api/v1/missing")
    assert response.status_code == 404
    assert response.data == b'{"detail": "nope"}'


def test_response_without_content_type_gets_none_invented(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    upstream.reply("/v4/raw", Reply(body=b"bytes", headers=()))
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
    client: FlaskClient, upstream: StubUpstream
) -> None:
    upstream.reply("/v4/things", Reply(status=204, headers=(("Allow", "GET, POST"),)))
    response = client.options("/api/v1/things")
    assert response.status_code == 204
    assert response.headers["allow"] == "GET, POST"
    assert [r.method for r in upstream.received] == ["OPTIONS"]


def test_head_keeps_the_upstream_content_length(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    upstream.reply("/v4/big", Reply(headers=(("Content-Length", "12345"),)))
    response = client.head("/api/v1/big")
    assert response.status_code == 200
    assert response.headers["content-length"] == "12345"
    assert response.data == b""


def test_smuggled_path_is_refused_without_calling_upstream(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    response = client.get("/api/v1/%2e%2e/internal/metrics")
    assert response.status_code == 400
    assert response.json is not None
    assert response.json["error"] == "invalid_path"
    assert not upstream.received


def test_post_json_bytes_are_forwarded_unchanged(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    upstream.reply("/v4/things", Reply(status=201, body=b'{"id": 2}'))
    body = b'{ "name" : "caf\xc3\xa9",  "n": 1.50 }'
    response = client.post(
        "/api/v1/things", data=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 201
    assert sent_request(upstream).body == body


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_non_json_bodies_get_415(
    client: FlaskClient, upstream: StubUpstream, content_type: str
) -> None:
    response = client.post("/api/v1/things", data=b"a=1", headers={"content-type": content_type})
    assert response.status_code == 415
    assert response.json is not None
    assert response.json["error"] == "unsupported_media_type"
    assert response.json["contentType"] == (content_type or None)
    assert not upstream.received


def test_vendor_json_types_are_accepted(client: FlaskClient, upstream: StubUpstream) -> None:
    upstream.reply("/v4/things/1", Reply(body=b"{}"))
    response = client.patch(
        "/api/v1/things/1", data=b'[{"op":"add"}]', content_type="application/json-patch+json"
    )
    assert response.status_code == 200


def test_invalid_json_gets_400_naming_the_problem(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    response = client.put("/api/v1/things/1", data=b'{"a": ', content_type="application/json")
    assert response.status_code == 400
    assert response.json is not None
    assert response.json["error"] == "invalid_json"
    assert not upstream.received


def test_body_over_the_limit_gets_413(client: FlaskClient, upstream: StubUpstream) -> None:
    body = b'{"a": "' + b"x" * 1_048_576 + b'"}'
    response = client.post("/api/v1/things", data=body, content_type="application/json")
    assert response.status_code == 413
    assert response.json is not None
    assert response.json["error"] == "payload_too_large"
    assert not upstream.received


def test_post_without_body_needs_no_content_type(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    upstream.reply("/v4/things/1/touch", Reply(status=204))
    response = client.post("/api/v1/things/1/touch")
    assert response.status_code == 204
    sent = sent_request(upstream)
    assert (sent.body, sent.header("content-length")) == (b"", "0")
    assert "content-type" not in sent.header_names()


def test_a_slow_upstream_becomes_a_502_naming_the_timeout(upstream: StubUpstream) -> None:
    client = keyed_client(
        fake_redis_app(upstream_base_url=f"{upstream.url}/v4", upstream_timeout_ms=200)
    )
    upstream.reply("/v4/x", Reply(delay_s=1.0))
    response = client.get("/api/v1/x")
    assert response.status_code == 502
    assert response.json is not None
    assert (response.json["error"], response.json["kind"]) == ("upstream_timeout", "timeout")
    assert UPSTREAM_KEY not in response.get_data(as_text=True)


def test_an_unreachable_upstream_becomes_a_502_naming_the_connection_error() -> None:
    client = keyed_client(fake_redis_app(upstream_base_url=f"http://127.0.0.1:{free_port()}"))
    response = client.get("/api/v1/x")
    assert response.status_code == 502
    assert response.json is not None
    assert response.json["error"] == "upstream_connection_error"
    assert response.json["kind"] == "connection_error"
    assert UPSTREAM_KEY not in response.get_data(as_text=True)


def test_redirect_location_into_upstream_is_rewritten(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    location = f"{upstream.url}/v4/new?x=1"
    upstream.reply("/v4/old", Reply(status=301, headers=(("Location", location),)))
    response = client.get("/api/v1/old")
    assert response.status_code == 301
    assert response.headers["location"] == "/api/v1/new?x=1"


def test_request_id_is_taken_from_the_client_or_generated(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    given = client.get("/api/v1/x", headers={"x-request-id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    assert sent_request(upstream).header("x-request-id") == "abc-123"
    generated = client.get("/api/v1/x", headers={"x-request-id": "bad id\twith spaces"})
    assert len(generated.headers["x-request-id"]) == 32


def test_encoded_forms_of_a_bypassed_path_are_bypassed_too(upstream: StubUpstream) -> None:
    app = fake_redis_app(upstream_base_url=f"{upstream.url}/v4", cache_bypass_paths=("/users/me",))
    client = keyed_client(app)
    upstream.reply("/v4/users/me", Reply(body=b"{}", headers=(("cache-control", "max-age=60"),)))
    for path in ("/api/v1/users/me", "/api/v1/users/%6De", "/api/v1/%75sers/me"):
        response = client.get(path)
        assert response.headers["x-cache"] == "BYPASS", path
    assert len(upstream.received) == 3


def test_answers_made_by_the_gateway_say_bypass_too(client: FlaskClient) -> None:
    refused = client.get("/api/v1/x", headers={"x-api-key": "nope"})
    assert (refused.status_code, refused.headers["x-cache"]) == (401, "BYPASS")
    assert client.get("/api/v1/%2e%2e/x").headers["x-cache"] == "BYPASS"


def test_a_corrupt_cache_entry_is_replaced_not_a_500(
    app: Flask, client: FlaskClient, upstream: StubUpstream
) -> None:
    from proxy_app.cache import policy
    from proxy_app.cache.store import Stored, encode
    from proxy_app.forwarding import forward_request_headers

    upstream.reply("/v4/c", Reply(body=b'{"fresh": 1}', headers=(("cache-control", "max-age=60"),)))
    key = policy.cache_key("/c", "", forward_request_headers([], request_id="r"))
    garbage = encode(Stored(b"\x00\x00\x00\x05{not json", 0.0, 9e12, 9e12, 9e12))
    app.extensions["proxy_app.redis"].cache.client.set(key, garbage)
    response = client.get("/api/v1/c")
    assert (response.status_code, response.headers["x-cache"]) == (200, "MISS")
    assert response.data == b'{"fresh": 1}'
    assert client.get("/api/v1/c").headers["x-cache"] == "HIT"


# --- bodies of any size -----------------------------------------------------------------------


def test_a_no_store_body_is_streamed_with_its_length(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    size = 3 * 1024 * 1024 + 17
    upstream.reply(
        "/v4/file", Reply(generated_bytes=size, headers=(("cache-control", "no-store"),))
    )
    response = client.get("/api/v1/file", buffered=False)
    assert response.is_streamed
    assert (response.status_code, response.headers["x-cache"]) == (200, "BYPASS")
    assert response.headers["content-length"] == str(size)
    assert digest(response.iter_encoded()) == generated_digest(size)
    response.close()


def test_a_chunked_body_is_streamed_without_a_length(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    size = 1024 * 1024
    upstream.reply("/v4/feed", Reply(generated_bytes=size, chunked=True))
    response = client.post("/api/v1/feed", buffered=False)
    assert response.is_streamed
    assert "content-length" not in response.headers
    assert digest(response.iter_encoded()) == generated_digest(size)
    response.close()


def test_a_cacheable_body_at_the_store_limit_is_stored(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    upstream.reply(
        "/v4/fits",
        Reply(
            generated_bytes=MAX_STORED_BODY_BYTES,
            chunked=True,
            headers=(("cache-control", "max-age=60"),),
        ),
    )
    first = client.get("/api/v1/fits")
    second = client.get("/api/v1/fits")
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert digest([second.data]) == generated_digest(MAX_STORED_BODY_BYTES)
    assert len(upstream.received) == 1


@pytest.mark.parametrize("chunked", [False, True])
def test_a_cacheable_body_over_the_store_limit_is_passed_on_whole_and_not_stored(
    client: FlaskClient, upstream: StubUpstream, chunked: bool
) -> None:
    size = MAX_STORED_BODY_BYTES + 1
    upstream.reply(
        "/v4/over",
        Reply(generated_bytes=size, chunked=chunked, headers=(("cache-control", "max-age=60"),)),
    )
    for _ in range(2):
        response = client.get("/api/v1/over", buffered=False)
        assert response.headers["x-cache"] == "BYPASS"
        assert digest(response.iter_encoded()) == generated_digest(size)
        response.close()
    assert len(upstream.received) == 2


def test_a_conditional_request_for_an_unstored_body_gets_304_without_it(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    upstream.reply(
        "/v4/doc",
        Reply(
            generated_bytes=1024 * 1024, headers=(("cache-control", "no-store"), ("etag", '"v1"'))
        ),
    )
    response = client.get("/api/v1/doc", headers={"if-none-match": '"v1"'})
    assert (response.status_code, response.data) == (304, b"")
    assert response.headers["etag"] == '"v1"'


def test_an_answer_over_the_response_limit_by_its_length_is_a_502(upstream: StubUpstream) -> None:
    client = keyed_client(
        fake_redis_app(upstream_base_url=f"{upstream.url}/v4", proxy_response_limit_bytes=100_000)
    )
    upstream.reply("/v4/big", Reply(generated_bytes=100_001))
    response = client.get("/api/v1/big")
    assert response.status_code == 502
    assert response.json is not None
    assert response.json["error"] == "upstream_response_too_large"
    assert response.json["message"]
    upstream.reply("/v4/fits", Reply(generated_bytes=100_000))
    assert len(client.get("/api/v1/fits").data) == 100_000


def test_a_chunked_answer_outgrowing_the_response_limit_is_cut(upstream: StubUpstream) -> None:
    client = keyed_client(
        fake_redis_app(upstream_base_url=f"{upstream.url}/v4", proxy_response_limit_bytes=200_000)
    )
    upstream.reply(
        "/v4/big",
        Reply(generated_bytes=1_000_000, chunked=True, headers=(("cache-control", "no-store"),)),
    )
    response = client.get("/api/v1/big", buffered=False)
    assert response.status_code == 200  # sent before the size was known
    received: list[int] = []

    def read_all() -> None:
        for piece in response.response:
            received.append(len(piece))

    # The server cuts the connection on this; the upstream failure was logged already.
    with pytest.raises(ResponseAborted) as aborted:
        read_all()
    assert isinstance(aborted.value.__cause__, UpstreamResponseTooLarge)
    response.close()
    assert sum(received) <= 200_000
    assert upstream.wait_open_connections(0)


def test_closing_a_streamed_answer_part_way_closes_the_upstream_connection(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    upstream.reply(
        "/v4/big",
        Reply(generated_bytes=64 * 1024 * 1024, headers=(("cache-control", "no-store"),)),
    )
    response = client.get("/api/v1/big", buffered=False)
    next(iter(response.response))
    assert upstream.open_connections == 1
    response.close()  # what the server does when its client goes away
    assert upstream.wait_open_connections(0)
    assert client.get("/api/v1/next").status_code == 200


def test_an_error_body_too_long_to_share_is_streamed_to_its_own_client(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    size = MAX_STORED_BODY_BYTES + 1
    upstream.reply("/v4/broken", Reply(status=500, generated_bytes=size))
    response = client.get("/api/v1/broken", buffered=False)
    assert (response.status_code, response.headers["x-cache"]) == (500, "BYPASS")
    assert digest(response.iter_encoded()) == generated_digest(size)
    response.close()


def test_custom_upstream_headers_reach_the_client_on_miss_and_hit(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    upstream.reply(
        "/v4/listing",
        Reply(
            headers=(
                ("Content-Type", "application/json"),
                ("Cache-Control", "max-age=60"),
                ("X-Total-Count", "42"),
                ("Server-Timing", "db;dur=5"),
                ("Server", "upstream/1.0"),
            )
        ),
    )
    first = client.get("/api/v1/listing")
    second = client.get("/api/v1/listing")
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    for response in (first, second):
        assert response.headers["x-total-count"] == "42"
        assert response.headers["server-timing"] == "db;dur=5"
        assert "server" not in response.headers
    assert len(upstream.calls("/v4/listing")) == 1


def test_upstream_copies_of_the_gateways_own_headers_never_override_them(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    upstream.reply(
        "/v4/own",
        Reply(
            headers=(
                ("Content-Type", "application/json"),
                ("X-Cache", "HIT"),
                ("X-Request-Id", "from-upstream"),
                ("X-RateLimit-Remaining", "999"),
                ("Age", "1000"),
                ("Cache-Control", "no-store"),
            )
        ),
    )
    response = client.get("/api/v1/own", headers={"X-Request-Id": "mine-1"})
    assert response.headers.getlist("x-cache") == ["BYPASS"]
    assert response.headers.getlist("x-request-id") == ["mine-1"]
    assert len(response.headers.getlist("x-ratelimit-remaining")) == 1
    assert response.headers["x-ratelimit-remaining"] != "999"
    # Not stored, so the gateway adds no age of its own: the upstream's passes, once.
    assert response.headers.getlist("age") == ["1000"]


def test_operator_hidden_response_headers_never_reach_the_client(upstream: StubUpstream) -> None:
    app = fake_redis_app(
        upstream_base_url=f"{upstream.url}/v4",
        proxy_hide_response_headers=("x-backend",),
    )
    client = keyed_client(app)
    upstream.reply(
        "/v4/hidden",
        Reply(headers=(("Content-Type", "application/json"), ("X-Backend", "db-7"))),
    )
    response = client.get("/api/v1/hidden")
    assert response.status_code == 200
    assert "x-backend" not in response.headers


def test_added_request_headers_go_upstream_and_keep_tenants_apart_in_the_cache(
    upstream: StubUpstream,
) -> None:
    app = fake_redis_app(
        upstream_base_url=f"{upstream.url}/v4",
        proxy_forward_request_headers=("x-tenant", "idempotency-key"),
    )
    client = keyed_client(app)
    # No Vary from the upstream: the gateway keys on the tenant all the same.
    upstream.reply(
        "/v4/orders",
        Reply(body=b'{"tenant": "a"}', headers=(("Cache-Control", "max-age=60"),)),
        Reply(body=b'{"tenant": "b"}', headers=(("Cache-Control", "max-age=60"),)),
    )
    first_a = client.get("/api/v1/orders", headers={"X-Tenant": "a"})
    first_b = client.get("/api/v1/orders", headers={"X-Tenant": "b"})
    again_a = client.get("/api/v1/orders", headers={"X-Tenant": "a"})
    again_b = client.get("/api/v1/orders", headers={"X-Tenant": "b"})
    assert [r.data for r in (first_a, first_b, again_a, again_b)] == [
        b'{"tenant": "a"}',
        b'{"tenant": "b"}',
        b'{"tenant": "a"}',
        b'{"tenant": "b"}',
    ]
    assert [r.headers["x-cache"] for r in (first_a, first_b, again_a, again_b)] == [
        "MISS",
        "MISS",
        "HIT",
        "HIT",
    ]
    calls = upstream.calls("/v4/orders")
    assert [call.header("x-tenant") for call in calls] == ["a", "b"]
    upstream.reply("/v4/payments", Reply(status=201))
    client.post("/api/v1/payments", json={}, headers={"Idempotency-Key": "k-1"})
    assert sent_request(upstream).header("idempotency-key") == "k-1"


def test_allowed_non_json_bodies_pass_byte_for_byte(upstream: StubUpstream) -> None:
    app = fake_redis_app(
        upstream_base_url=f"{upstream.url}/v4",
        proxy_body_types=("application/json", "text/*", "application/octet-stream"),
    )
    client = keyed_client(app)
    upstream.reply("/v4/upload", Reply(status=201))
    body = b"\x00\xffnot json at all\r\n"
    response = client.put(
        "/api/v1/upload", data=body, headers={"content-type": "application/octet-stream"}
    )
    assert response.status_code == 201
    assert sent_request(upstream).body == body
    assert sent_request(upstream).header("content-type") == "application/octet-stream"
    csv = client.post("/api/v1/upload", data=b"a,b\n1,2\n", content_type="text/csv")
    assert csv.status_code == 201
    invalid_json = client.post("/api/v1/upload", data=b"{", content_type="application/json")
    assert invalid_json.status_code == 400
    assert invalid_json.json is not None
    assert invalid_json.json["error"] == "invalid_json"


def test_a_refused_body_type_gets_415_naming_the_allowed_types(
    client: FlaskClient, upstream: StubUpstream
) -> None:
    response = client.post("/api/v1/things", data=b"x", content_type="text/plain")
    assert response.status_code == 415
    assert response.json is not None
    assert response.json["allowed"] == ["application/json", "application/*+json"]
    assert "application/json" in response.json["message"]
    assert not upstream.received


def vary_reply(*extra: tuple[str, str], vary: str = "Foo, Bar, Baz") -> Reply:
    return Reply(headers=(("cache-control", "max-age=600"), ("vary", vary), *extra))


@pytest.mark.parametrize("forwarded", [("foo", "bar", "baz"), ()])
def test_a_vary_on_several_headers_selects_on_all_of_them_in_any_order(
    upstream: StubUpstream, forwarded: tuple[str, ...]
) -> None:
    """RFC 9111 section 4.1: every header Vary names must match, whether or not the gateway
    forwards it, and the order of the names or of the request's headers does not matter."""
    app = fake_redis_app(upstream_base_url=upstream.url, proxy_forward_request_headers=forwarded)
    client = keyed_client(app)
    upstream.reply("/v", vary_reply(vary="Foo, Bar, Baz"))
    upstream.reply("/w", vary_reply(vary="Baz,Foo , Bar"))
    for path in ("/api/v1/v", "/api/v1/w"):
        first = client.get(path, headers={"Foo": "1", "Bar": "abc4", "Baz": "789"})
        other = client.get(path, headers={"Foo": "1", "Bar": "abc", "Baz": "789"})
        reordered = client.get(path, headers=[("Baz", "789"), ("Bar", "abc"), ("Foo", "1")])
        omitted = client.get(path, headers={"Foo": "1", "Baz": "789"})
        outcomes = [r.headers["x-cache"] for r in (first, other, reordered, omitted)]
        assert outcomes == ["MISS", "MISS", "HIT", "MISS"], (path, forwarded)


def test_a_stale_response_varying_on_a_forwarded_custom_header_is_revalidated_with_it(
    upstream: StubUpstream,
) -> None:
    """RFC 9111 sections 4.1 and 4.3.1: the conditional request carries the selecting header
    and the stored validator; the 304 makes the stored body usable again."""
    app = fake_redis_app(
        upstream_base_url=upstream.url,
        proxy_forward_request_headers=("abc",),
        cache_ttl_default_s=0,
    )
    client = keyed_client(app)
    upstream.reply(
        "/v",
        Reply(
            body=b"stored",
            headers=(("cache-control", "max-age=0"), ("etag", '"e1"'), ("vary", "Abc")),
        ),
        Reply(status=304, body=b"", headers=(("cache-control", "max-age=600"), ("etag", '"e1"'))),
    )
    client.get("/api/v1/v", headers={"Abc": "123"})
    second = client.get("/api/v1/v", headers={"Abc": "123"})
    sent = sent_request(upstream)
    assert (sent.header("abc"), sent.header("if-none-match")) == ("123", '"e1"')
    assert (second.status_code, second.data) == (200, b"stored")
    assert second.headers["x-cache"] == "REVALIDATED"
    conditional = client.get("/api/v1/v", headers={"Abc": "123", "If-None-Match": '"e1"'})
    assert (conditional.status_code, conditional.headers["x-cache"]) == (304, "HIT")


def test_the_upstreams_age_is_passed_on_and_counts_against_freshness(
    upstream: StubUpstream,
) -> None:
    """RFC 9111 sections 4.2.3 and 5.1: a response aged 30 s by the upstream arrives with that
    age, which is taken off its freshness lifetime."""
    app = fake_redis_app(upstream_base_url=upstream.url, cache_ttl_default_s=0)
    client = keyed_client(app)
    upstream.reply("/young", Reply(headers=(("cache-control", "max-age=60"), ("age", "30"))))
    upstream.reply("/old", Reply(headers=(("cache-control", "max-age=20"), ("age", "30"))))
    upstream.reply("/private", Reply(headers=(("cache-control", "no-store"), ("age", "7"))))
    upstream.reply("/own", Reply(headers=(("cache-control", "max-age=60"),)))
    miss, hit = client.get("/api/v1/young"), client.get("/api/v1/young")
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
    assert 30 <= int(miss.headers["age"]) <= 31
    assert 30 <= int(hit.headers["age"]) <= 31
    old = [client.get("/api/v1/old") for _ in range(2)]
    assert [int(answer.headers["age"]) for answer in old] == [30, 30]
    assert len(upstream.calls("/old")) == 2  # already stale on arrival: never served from cache
    assert client.get("/api/v1/private").headers["age"] == "7"
    assert "age" not in client.get("/api/v1/own").headers  # a fresh answer of the origin's own


def test_a_stored_response_keeps_its_date_and_a_304_updates_the_fields_it_carries(
    upstream: StubUpstream,
) -> None:
    """RFC 9110 section 6.6.1 (a Date added once, when received) and RFC 9111 section 4.3.4 (a
    304 replaces the stored header fields it carries; the others and the body stay)."""
    app = fake_redis_app(upstream_base_url=upstream.url, cache_ttl_default_s=0)
    client = keyed_client(app)
    upstream.reply("/undated", Reply(headers=(("cache-control", "max-age=600"),)))
    miss = client.get("/api/v1/undated")
    time.sleep(1.1)
    hit = client.get("/api/v1/undated")
    assert hit.headers["x-cache"] == "HIT"
    assert hit.headers["date"] == miss.headers["date"]

    old_date, new_date = formatdate(time.time() - 5, usegmt=True), formatdate(usegmt=True)
    upstream.reply(
        "/updated",
        Reply(
            body=b"body",
            headers=(
                ("cache-control", "max-age=0"),
                ("etag", '"e1"'),
                ("date", old_date),
                ("test-header", "A"),
                ("content-type", "text/plain"),
                ("x-kept", "k"),
            ),
        ),
        Reply(
            status=304,
            body=b"",
            headers=(
                ("cache-control", "max-age=600"),
                ("etag", '"e1"'),
                ("date", new_date),
                ("test-header", "B"),
                ("content-type", "text/plain;charset=utf-8"),
            ),
        ),
    )
    client.get("/api/v1/updated")
    revalidated = client.get("/api/v1/updated")
    stored = client.get("/api/v1/updated")
    assert [r.headers["x-cache"] for r in (revalidated, stored)] == ["REVALIDATED", "HIT"]
    for answer in (revalidated, stored):
        assert answer.data == b"body"
        assert answer.headers["test-header"] == "B"
        assert answer.headers["content-type"] == "text/plain;charset=utf-8"
        assert answer.headers["date"] == new_date
        assert answer.headers["x-kept"] == "k"
        assert answer.headers["cache-control"] == "max-age=600"


def test_the_gateways_own_cache_control_field_rules_and_stays_in_the_gateway(
    upstream: StubUpstream,
) -> None:
    """RFC 9213: Gateway-Cache-Control targets this cache alone; CDN-Cache-Control passes on."""
    app = fake_redis_app(upstream_base_url=upstream.url, cache_ttl_default_s=0)
    client = keyed_client(app)
    upstream.reply(
        "/t",
        Reply(
            headers=(
                ("cache-control", "no-store"),
                ("cdn-cache-control", "no-store"),
                ("gateway-cache-control", "max-age=600"),
            )
        ),
    )
    answers = [client.get("/api/v1/t") for _ in range(2)]
    assert [a.headers["x-cache"] for a in answers] == ["MISS", "HIT"]
    for answer in answers:
        assert "gateway-cache-control" not in answer.headers
        assert answer.headers["cdn-cache-control"] == "no-store"
        assert answer.headers["cache-control"] == "no-store"


def test_interim_responses_from_the_upstream_are_skipped(upstream: StubUpstream) -> None:
    """RFC 9110 section 15.2: 102 Processing and 103 Early Hints come before the final answer,
    which is the one passed on (and stored)."""
    upstream.reply(
        "/slow",
        Reply(
            raw=b"HTTP/1.1 102 Processing\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nCache-Control: max-age=60\r\n"
            b"X-Final: yes\r\n\r\ndone"
        ),
    )
    client = keyed_client(fake_redis_app(upstream_base_url=upstream.url))
    first, second = client.get("/api/v1/slow"), client.get("/api/v1/slow")
    assert (first.status_code, first.data, first.headers["x-final"]) == (200, b"done", "yes")
    assert "link" not in first.headers
    assert (second.headers["x-cache"], second.data) == ("HIT", b"done")
