from __future__ import annotations

import pytest
import requests
import requests_mock
import urllib3.exceptions

from proxy_app.upstream import (
    UpstreamClient,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamNotConfigured,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTlsError,
    retry_policy,
)

BASE = "https://up.example/v4"


@pytest.fixture
def upstream() -> UpstreamClient:
    return UpstreamClient(BASE, timeout_ms=500, retries=2, api_key="upstream-secret")


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


def test_base_path_is_kept_and_api_key_injected(upstream: UpstreamClient) -> None:
    with requests_mock.Mocker() as mock:
        mock.get(f"{BASE}/things/1?a=1&a=2", content=b'{"id":1}', headers={"ETag": '"x"'})
        response = upstream.request("GET", "/things/1", query="a=1&a=2", headers={"accept": "*/*"})
    sent = mock.last_request
    assert sent.url == f"{BASE}/things/1?a=1&a=2"
    assert sent.headers["api_key"] == "upstream-secret"
    assert "User-Agent" not in sent.headers
    assert response.status == 200
    assert response.body == b'{"id":1}'
    assert response.header("etag") == '"x"'


def test_no_api_key_header_when_none_is_configured() -> None:
    client = UpstreamClient(BASE, timeout_ms=500, retries=0)
    with requests_mock.Mocker() as mock:
        mock.get(f"{BASE}/x", content=b"")
        client.request("GET", "/x")
    assert "api_key" not in mock.last_request.headers


def test_credentials_in_the_base_url_become_basic_auth() -> None:
    client = UpstreamClient("https://svc:s3cret@up.example/v4", timeout_ms=500, retries=0)
    with requests_mock.Mocker() as mock:
        mock.get("https://svc:s3cret@up.example/v4/x", content=b"")
        client.request("GET", "/x")
        client.request("GET", "/x")  # the URL's preparation is remembered; the auth is not lost
    assert [r.headers["Authorization"] for r in mock.request_history] == [
        "Basic c3ZjOnMzY3JldA=="
    ] * 2


def test_no_authorization_is_sent_without_credentials_in_the_base_url(
    upstream: UpstreamClient,
) -> None:
    with requests_mock.Mocker() as mock:
        mock.get(f"{BASE}/x", content=b"")
        upstream.request("GET", "/x")
    assert "Authorization" not in mock.last_request.headers


@pytest.mark.parametrize("length", [10, 2000])  # remembered, and too long to be remembered
def test_urls_are_requoted_as_requests_would(upstream: UpstreamClient, length: int) -> None:
    query = "q=a b|c&pad=" + "x" * length
    with requests_mock.Mocker() as mock:
        mock.get(f"{BASE}/x", content=b"")
        for _ in range(2):
            upstream.request("GET", "/x", query=query)
    assert [r.url for r in mock.request_history] == [f"{BASE}/x?q=a%20b%7Cc&pad={'x' * length}"] * 2


def test_redirects_are_returned_not_followed(upstream: UpstreamClient) -> None:
    with requests_mock.Mocker() as mock:
        mock.get(f"{BASE}/old", status_code=302, headers={"Location": "https://evil.example/"})
        response = upstream.request("GET", "/old")
    assert response.status == 302
    assert mock.call_count == 1


def test_cookies_from_one_response_never_reach_another_request(upstream: UpstreamClient) -> None:
    with requests_mock.Mocker() as mock:
        mock.get(f"{BASE}/login", headers={"Set-Cookie": "session=abc; Path=/"})
        mock.get(f"{BASE}/other")
        upstream.request("GET", "/login")
        upstream.request("GET", "/other")
    assert "Cookie" not in mock.last_request.headers


def test_body_bytes_are_returned_undecoded() -> None:
    client = UpstreamClient(BASE, timeout_ms=500, retries=0)
    gzipped = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xabV\xca\xcc\x03\x00"
    with requests_mock.Mocker() as mock:
        mock.get(f"{BASE}/z", content=gzipped, headers={"Content-Encoding": "gzip"})
        response = client.request("GET", "/z")
    assert response.body == gzipped
    assert response.header("content-encoding") == "gzip"


@pytest.mark.parametrize(
    ("raised", "expected", "kind"),
    [
        (requests.exceptions.ConnectTimeout, UpstreamTimeout, "timeout"),
        (requests.exceptions.ReadTimeout, UpstreamTimeout, "timeout"),
        (requests.exceptions.SSLError, UpstreamTlsError, "tls_error"),
        (requests.exceptions.ConnectionError, UpstreamConnectionError, "connection_error"),
        (requests.exceptions.ChunkedEncodingError, UpstreamProtocolError, "protocol_error"),
        (urllib3.exceptions.ProtocolError, UpstreamProtocolError, "protocol_error"),
    ],
)
def test_library_errors_become_our_family(
    upstream: UpstreamClient, raised: type[Exception], expected: type[UpstreamError], kind: str
) -> None:
    with requests_mock.Mocker() as mock:
        mock.get(f"{BASE}/x", exc=raised)
        with pytest.raises(expected) as caught:
            upstream.request("GET", "/x")
    assert isinstance(caught.value, UpstreamError)
    assert caught.value.kind == kind
    assert caught.value.method == "GET"
    assert caught.value.url == f"{BASE}/x"
    assert "upstream-secret" not in str(caught.value)


def test_timeouts_are_both_timeouts_and_upstream_errors() -> None:
    assert issubclass(UpstreamTimeout, TimeoutError)
    assert issubclass(UpstreamTimeout, UpstreamError)
    assert issubclass(UpstreamConnectionError, ConnectionError)


def test_unconfigured_upstream_is_its_own_error() -> None:
    client = UpstreamClient(None, timeout_ms=500, retries=0)
    with pytest.raises(UpstreamNotConfigured):
        client.request("GET", "/x")
