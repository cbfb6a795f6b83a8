"""The upstream client against a real HTTP server on 127.0.0.1 (the stub upstream)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import certifi
import pytest
import urllib3
import urllib3.exceptions

from proxy_app.metrics import Metrics
from proxy_app.upstream import (
    READ_AHEAD_BYTES,
    UpstreamClient,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamNotConfigured,
    UpstreamProtocolError,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
    UpstreamTlsError,
    retry_policy,
)
from tests.support.net import free_port
from tests.support.stub_upstream import Reply, StubUpstream, generated_digest

UPSTREAM_KEY = "upstream-secret"


@pytest.fixture
def upstream(stub: StubUpstream) -> Iterator[UpstreamClient]:
    client = UpstreamClient(f"{stub.url}/v4", timeout_ms=2000, retries=2, api_key=UPSTREAM_KEY)
    yield client
    client.close()


def digest(pieces: Iterator[bytes]) -> str:
    hashed = hashlib.sha256()
    for piece in pieces:
        hashed.update(piece)
    return hashed.hexdigest()


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "DELETE"])
@pytest.mark.parametrize("status", [502, 503, 504])
def test_idempotent_methods_are_retried_on_gateway_statuses(method: str, status: int) -> None:
    assert retry_policy(2).is_retry(method, status)


@pytest.mark.parametrize("method", ["POST", "PATCH", "PUT"])
def test_methods_with_a_body_are_never_retried_on_a_status(method: str) -> None:
    assert not retry_policy(2).is_retry(method, 503)


@pytest.mark.parametrize("status", [500, 501, 404, 429])
def test_other_statuses_are_not_retried(status: int) -> None:
    assert not retry_policy(2).is_retry("GET", status)


def test_retry_policy_counts_and_bounds() -> None:
    policy = retry_policy(3)
    assert policy.total == 3
    assert policy.connect == 3
    assert policy.read == 3
    assert not policy.redirect
    assert policy.respect_retry_after_header is False
    assert retry_policy(0).total == 0


def test_base_path_is_kept_and_api_key_injected(
    stub: StubUpstream, upstream: UpstreamClient
) -> None:
    stub.reply("/v4/things/1", Reply(body=b'{"id":1}', headers=(("ETag", '"x"'),)))
    response = upstream.request("GET", "/things/1", query="a=1&a=2", headers={"accept": "*/*"})
    sent = stub.last()
    assert (sent.path, sent.query) == ("/v4/things/1", "a=1&a=2")
    assert sent.header("api_key") == UPSTREAM_KEY
    assert response.status == 200
    assert response.body == b'{"id":1}'
    assert response.header("etag") == '"x"'


def test_only_the_chosen_headers_are_sent(stub: StubUpstream, upstream: UpstreamClient) -> None:
    upstream.request("GET", "/x", headers={"accept": "*/*", "x-request-id": "r1"})
    assert stub.last().header_names() == {"host", "accept", "x-request-id", "api_key"}
    assert stub.last().header("host") == f"127.0.0.1:{stub.port}"


def test_a_body_is_framed_with_its_length(stub: StubUpstream, upstream: UpstreamClient) -> None:
    upstream.request("POST", "/x", headers={"content-type": "application/json"}, body=b"{}")
    sent = stub.last()
    assert sent.header_names() == {"host", "content-type", "content-length", "api_key"}
    assert (sent.header("content-length"), sent.body) == ("2", b"{}")


def test_no_api_key_header_when_none_is_configured(stub: StubUpstream) -> None:
    client = UpstreamClient(stub.url, timeout_ms=2000, retries=0)
    client.request("GET", "/x")
    assert "api_key" not in stub.last().header_names()


def test_credentials_in_the_base_url_become_basic_auth(stub: StubUpstream) -> None:
    client = UpstreamClient(
        f"http://svc:s3cret@127.0.0.1:{stub.port}/v4", timeout_ms=2000, retries=0
    )
    client.request("GET", "/x")
    client.request("GET", "/x")
    assert [r.header("authorization") for r in stub.calls("/v4/x")] == [
        "Basic c3ZjOnMzY3JldA=="
    ] * 2


def test_no_authorization_is_sent_without_credentials_in_the_base_url(
    stub: StubUpstream, upstream: UpstreamClient
) -> None:
    upstream.request("GET", "/x")
    assert "authorization" not in stub.last().header_names()


@pytest.mark.parametrize("length", [10, 2000])
def test_urls_are_requoted_as_requests_would(
    stub: StubUpstream, upstream: UpstreamClient, length: int
) -> None:
    query = "q=a b|c&pad=" + "x" * length
    for _ in range(2):
        upstream.request("GET", "/x", query=query)
    assert [r.query for r in stub.calls("/v4/x")] == [f"q=a%20b%7Cc&pad={'x' * length}"] * 2


def test_valid_escapes_are_kept_and_a_stray_percent_is_escaped(
    stub: StubUpstream, upstream: UpstreamClient
) -> None:
    upstream.request("GET", "/x", query="a=%2F%20")
    upstream.request("GET", "/x", query="a=100%&b=%2F")
    assert [r.query for r in stub.calls("/v4/x")] == ["a=%2F%20", "a=100%25&b=%252F"]


def test_redirects_are_returned_not_followed(stub: StubUpstream, upstream: UpstreamClient) -> None:
    stub.reply("/v4/old", Reply(status=302, headers=(("Location", "https://evil.example/"),)))
    response = upstream.request("GET", "/old")
    assert response.status == 302
    assert len(stub.received) == 1


def test_cookies_from_one_response_never_reach_another_request(
    stub: StubUpstream, upstream: UpstreamClient
) -> None:
    stub.reply("/v4/login", Reply(headers=(("Set-Cookie", "session=abc; Path=/"),)))
    upstream.request("GET", "/login")
    upstream.request("GET", "/other")
    assert "cookie" not in stub.last().header_names()


def test_body_bytes_are_returned_undecoded(stub: StubUpstream) -> None:
    client = UpstreamClient(stub.url, timeout_ms=2000, retries=0)
    gzipped = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xabV\xca\xcc\x03\x00"
    stub.reply("/z", Reply(body=gzipped, headers=(("Content-Encoding", "gzip"),)))
    response = client.request("GET", "/z")
    assert response.body == gzipped
    assert response.header("content-encoding") == "gzip"


def test_gateway_statuses_are_retried_for_get(stub: StubUpstream, upstream: UpstreamClient) -> None:
    stub.reply("/v4/flaky", Reply(status=503), Reply(body=b"ok"))
    response = upstream.request("GET", "/flaky")
    assert (response.status, response.body) == (200, b"ok")
    assert len(stub.calls("/v4/flaky")) == 2


def test_a_request_with_a_body_is_sent_once(stub: StubUpstream, upstream: UpstreamClient) -> None:
    stub.reply("/v4/w", Reply(status=503), Reply(body=b"ok"))
    response = upstream.request("POST", "/w", headers={"content-type": "a/b"}, body=b"{}")
    assert response.status == 503
    assert len(stub.calls("/v4/w")) == 1


def test_a_short_body_is_read_with_the_headers(
    stub: StubUpstream, upstream: UpstreamClient
) -> None:
    stub.reply("/v4/small", Reply(generated_bytes=READ_AHEAD_BYTES))
    response = upstream.open("GET", "/small")
    assert response.complete
    assert len(response.body) == READ_AHEAD_BYTES


def test_a_long_body_is_read_only_as_it_is_taken(
    stub: StubUpstream, upstream: UpstreamClient
) -> None:
    size = 8 * 1024 * 1024 + 1
    stub.reply("/v4/big", Reply(generated_bytes=size))
    response = upstream.open("GET", "/big")
    assert not response.complete
    assert (response.body, response.content_length) == (b"", size)
    assert digest(response.chunks()) == generated_digest(size)
    assert response.complete


@pytest.mark.parametrize("chunked", [False, True])
def test_buffering_stops_past_the_bound_and_the_rest_follows(
    stub: StubUpstream, upstream: UpstreamClient, chunked: bool
) -> None:
    size = 300_000
    stub.reply("/v4/b", Reply(generated_bytes=size, chunked=chunked))
    small_enough = upstream.open("GET", "/b")
    assert small_enough.buffer(size)
    assert len(small_enough.body) == size
    too_long = upstream.open("GET", "/b")
    assert not too_long.buffer(size - 1)
    assert len(too_long.body) == (size if chunked else 0)  # a declared length is believed
    assert digest(too_long.chunks()) == generated_digest(size)


def test_closing_a_half_read_body_closes_its_connection(
    stub: StubUpstream, upstream: UpstreamClient
) -> None:
    stub.reply("/v4/big", Reply(generated_bytes=64 * 1024 * 1024))
    response = upstream.open("GET", "/big")
    next(response.chunks())
    assert stub.open_connections == 1
    response.close()
    assert stub.wait_open_connections(0)
    assert upstream.request("GET", "/next").status == 200  # a new connection, not the old one


def test_a_body_read_to_its_end_gives_the_connection_back(
    stub: StubUpstream, upstream: UpstreamClient
) -> None:
    stub.reply("/v4/big", Reply(generated_bytes=1024 * 1024))
    for _ in range(3):
        response = upstream.open("GET", "/big")
        for _piece in response.chunks():
            pass
        response.close()
    assert stub.open_connections == 1


def test_an_answer_longer_than_the_limit_is_refused_by_its_length(stub: StubUpstream) -> None:
    metrics = Metrics()
    client = UpstreamClient(
        stub.url, timeout_ms=2000, retries=0, response_limit_bytes=100_000, metrics=metrics
    )
    stub.reply("/big", Reply(generated_bytes=100_001))
    with pytest.raises(UpstreamResponseTooLarge) as caught:
        client.open("GET", "/big")
    assert caught.value.kind == "response_too_large"
    assert metrics.upstream_errors.labels("response_too_large")._value.get() == 1
    stub.reply("/fits", Reply(generated_bytes=100_000))
    assert len(client.request("GET", "/fits").body) == 100_000


def test_a_chunked_answer_outgrowing_the_limit_fails_part_way(stub: StubUpstream) -> None:
    metrics = Metrics()
    client = UpstreamClient(
        stub.url, timeout_ms=2000, retries=0, response_limit_bytes=200_000, metrics=metrics
    )
    stub.reply("/big", Reply(generated_bytes=1_000_000, chunked=True))
    response = client.open("GET", "/big")
    received: list[int] = []

    def read_all() -> None:
        for piece in response.chunks():
            received.append(len(piece))

    with pytest.raises(UpstreamResponseTooLarge):
        read_all()
    assert sum(received) <= 200_000
    assert metrics.upstream_errors.labels("response_too_large")._value.get() == 1
    assert stub.wait_open_connections(0)


def test_a_body_cut_short_fails_part_way(stub: StubUpstream, upstream: UpstreamClient) -> None:
    stub.reply("/v4/cut", Reply(generated_bytes=1_000_000, stop_after_bytes=300_000))
    response = upstream.open("GET", "/cut")
    with pytest.raises(UpstreamProtocolError):
        for _piece in response.chunks():
            pass


def test_a_slow_upstream_is_a_timeout(stub: StubUpstream) -> None:
    client = UpstreamClient(stub.url, timeout_ms=200, retries=0)
    stub.reply("/slow", Reply(delay_s=1.0))
    with pytest.raises(UpstreamTimeout) as caught:
        client.request("GET", "/slow")
    assert caught.value.kind == "timeout"


def test_a_refused_connection_is_a_connection_error() -> None:
    client = UpstreamClient(f"http://127.0.0.1:{free_port()}", timeout_ms=500, retries=1)
    with pytest.raises(UpstreamConnectionError) as caught:
        client.request("GET", "/x")
    assert caught.value.kind == "connection_error"


def test_a_failed_tls_handshake_is_a_tls_error(stub: StubUpstream) -> None:
    client = UpstreamClient(f"https://127.0.0.1:{stub.port}", timeout_ms=2000, retries=0)
    with pytest.raises(UpstreamTlsError) as caught:
        client.request("GET", "/x")
    assert caught.value.kind == "tls_error"


def test_certificates_are_verified_against_certifis_bundle() -> None:
    client = UpstreamClient("https://up.example/v4", timeout_ms=500, retries=0)
    pool = client._pool
    assert isinstance(pool, urllib3.HTTPSConnectionPool)
    assert (pool.cert_reqs, pool.ca_certs) == ("CERT_REQUIRED", certifi.where())


def test_garbage_instead_of_http_is_a_protocol_error(stub: StubUpstream) -> None:
    client = UpstreamClient(stub.url, timeout_ms=2000, retries=0)
    stub.reply("/junk", Reply(raw=b"SSH-2.0-OpenSSH\r\n\r\n"))
    with pytest.raises(UpstreamProtocolError) as caught:
        client.request("GET", "/junk")
    assert caught.value.kind == "protocol_error"


@pytest.mark.parametrize(
    ("raised", "expected", "kind"),
    [
        (urllib3.exceptions.ConnectTimeoutError("connect"), UpstreamTimeout, "timeout"),
        (urllib3.exceptions.ReadTimeoutError(None, "/x", "read"), UpstreamTimeout, "timeout"),  # type: ignore[arg-type]
        (urllib3.exceptions.SSLError("bad cert"), UpstreamTlsError, "tls_error"),
        (
            urllib3.exceptions.NewConnectionError(None, "refused"),  # type: ignore[arg-type]
            UpstreamConnectionError,
            "connection_error",
        ),
        (
            urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError()),
            UpstreamConnectionError,
            "connection_error",
        ),
        (urllib3.exceptions.ProtocolError("broken"), UpstreamProtocolError, "protocol_error"),
    ],
)
def test_library_errors_become_our_family(
    stub: StubUpstream,
    upstream: UpstreamClient,
    monkeypatch: pytest.MonkeyPatch,
    raised: Exception,
    expected: type[UpstreamError],
    kind: str,
) -> None:
    def fail(*_args: object, **_kwargs: object) -> None:
        raise urllib3.exceptions.MaxRetryError(None, "/v4/x", raised)  # type: ignore[arg-type]

    monkeypatch.setattr(upstream._pool, "urlopen", fail)
    with pytest.raises(expected) as caught:
        upstream.request("GET", "/x")
    assert isinstance(caught.value, UpstreamError)
    assert caught.value.kind == kind
    assert caught.value.method == "GET"
    assert caught.value.url == f"{stub.url}/v4/x"
    assert UPSTREAM_KEY not in str(caught.value)


def test_timeouts_are_both_timeouts_and_upstream_errors() -> None:
    assert issubclass(UpstreamTimeout, TimeoutError)
    assert issubclass(UpstreamTimeout, UpstreamError)
    assert issubclass(UpstreamConnectionError, ConnectionError)


def test_unconfigured_upstream_is_its_own_error() -> None:
    client = UpstreamClient(None, timeout_ms=500, retries=0)
    with pytest.raises(UpstreamNotConfigured):
        client.request("GET", "/x")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UpstreamError, "upstream_error"),
        (UpstreamNotConfigured, "upstream_not_configured"),
        (UpstreamTimeout, "upstream_timeout"),
        (UpstreamTlsError, "upstream_tls_error"),
        (UpstreamResponseTooLarge, "upstream_response_too_large"),
    ],
)
def test_each_upstream_error_names_its_code_once(error: type[UpstreamError], code: str) -> None:
    assert error("failed", method="GET", url="/x").code == code
