"""The real server (``python -m proxy_app`` under gunicorn + gevent) against a stub upstream
on 127.0.0.1 that records what it receives."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable

import pytest
import requests

from tests.support.app import ADMIN_TOKEN, UPSTREAM_KEY
from tests.support.gateway import Gateway
from tests.support.net import free_port
from tests.support.redis_server import RedisServer
from tests.support.stub_upstream import Reply, StubUpstream

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]


def upstream_env(stub: StubUpstream, **extra: str) -> dict[str, str]:
    return {
        "HTTP_CLIENT_BASE_URL": f"{stub.url}/v4",
        "HTTP_CLIENT_API_KEY": UPSTREAM_KEY,
        "HTTP_CLIENT_RETRIES": "0",
        **extra,
    }


def raw_request(gateway: Gateway, method: str, target: str) -> tuple[int, bytes]:
    """Send a request target exactly as written (no client-side normalisation)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in gateway.key_headers().items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_allowlisted_headers_go_upstream_and_secrets_and_hop_headers_do_not(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    gateway = start_gateway(upstream_env(stub))
    response = gateway.get(
        "/api/v1/things/1?b=2&a=1&b=3&empty=&sp=%20x",
        headers={
            "Accept": "application/json",
            "Accept-Language": "de-CH",
            "User-Agent": "client/1.0",
            "Traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "X-Request-Id": "trace-me-1",
            "Cookie": "session=abc",
            "Authorization": "Bearer user-token",
            "api_key": "caller-supplied-key",
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Host": "evil.example",
            "Forwarded": "for=203.0.113.9",
            "X-Custom": "dropped",
        },
    )
    assert response.status_code == 200
    received = stub.last()
    assert received.path == "/v4/things/1"
    assert received.query == "b=2&a=1&b=3&empty=&sp=%20x"
    assert received.header("accept") == "application/json"
    assert received.header("accept-language") == "de-CH"
    assert received.header("user-agent") == "client/1.0"
    assert (
        received.header("traceparent") == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    )
    assert received.header("x-request-id") == "trace-me-1"
    assert received.header("api_key") == UPSTREAM_KEY
    assert received.header("host") == f"127.0.0.1:{stub.port}"
    for dropped in (
        "cookie",
        "authorization",
        "x-api-key",
        "x-forwarded-for",
        "x-forwarded-host",
        "forwarded",
        "x-custom",
    ):
        assert dropped not in received.header_names(), dropped
    assert response.headers["x-request-id"] == "trace-me-1"


def test_post_body_bytes_reach_upstream_identical(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/v4/things", Reply(status=201, body=b'{"id": 7}'))
    gateway = start_gateway(upstream_env(stub))
    body = '{"name": "Zürich",\n "tags": ["a", "b"],  "n": 1.50e3}'.encode()
    response = gateway.request(
        "POST", "/api/v1/things", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 201
    assert response.content == b'{"id": 7}'
    assert stub.last().method == "POST"
    assert stub.last().body == body


def test_request_errors_are_json_and_never_reach_upstream(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    gateway = start_gateway(upstream_env(stub, PROXY_BODY_LIMIT="64"))
    cases = [
        (gateway.request("TRACE", "/api/v1/things"), 405, "method_not_allowed"),
        (
            gateway.request(
                "POST", "/api/v1/things", data=b"a=1", headers={"Content-Type": "text/plain"}
            ),
            415,
            "unsupported_media_type",
        ),
        (
            gateway.request(
                "POST",
                "/api/v1/things",
                data=b"{nope",
                headers={"Content-Type": "application/json"},
            ),
            400,
            "invalid_json",
        ),
        (
            gateway.request(
                "POST",
                "/api/v1/things",
                data=b'{"a": "' + b"x" * 100 + b'"}',
                headers={"Content-Type": "application/json"},
            ),
            413,
            "payload_too_large",
        ),
        (
            gateway.request(
                "POST",
                "/api/v1/things",
                data=iter([b'{"a": "', b"x" * 100, b'"}']),  # chunked: no content-length
                headers={"Content-Type": "application/json"},
            ),
            413,
            "payload_too_large",
        ),
    ]
    for response, status, code in cases:
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"] == code
    assert "GET" in cases[0][0].headers["allow"]
    assert stub.calls() == []


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1//evil.example/x",
        "/api/v1/../internal/metrics",
        "/api/v1/%2e%2e/internal/metrics",
        "/api/v1/%252e%252e/x",
        "/api/v1/x/..%5c..%5cadmin",
        "/api/v1/http://evil.example/",
        "/api/v1/x%0d%0aSet-Cookie:%20a=b",
    ],
)
def test_paths_that_could_leave_the_origin_get_400(
    start_gateway: StartGateway, stub: StubUpstream, target: str
) -> None:
    gateway = start_gateway(upstream_env(stub))
    status, body = raw_request(gateway, "GET", target)
    assert status == 400
    assert json.loads(body)["error"] == "invalid_path"
    assert stub.calls() == []


def test_closed_port_gives_502_connection_error(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"HTTP_CLIENT_BASE_URL": f"http://127.0.0.1:{free_port()}"})
    response = gateway.get("/api/v1/x")
    assert response.status_code == 502
    assert response.json()["kind"] == "connection_error"


def test_slow_upstream_gives_502_timeout(start_gateway: StartGateway, stub: StubUpstream) -> None:
    stub.reply("/slow", Reply(delay_s=2))
    gateway = start_gateway(
        {"HTTP_CLIENT_BASE_URL": stub.url, "HTTP_CLIENT_TIMEOUT": "300", "HTTP_CLIENT_RETRIES": "0"}
    )
    started = time.monotonic()
    response = gateway.get("/api/v1/slow")
    assert response.status_code == 502
    assert response.json()["kind"] == "timeout"
    assert time.monotonic() - started < 1.8


def test_get_is_retried_on_503_up_to_the_configured_count(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/flaky", Reply(status=503, body=b"busy"))
    stub.reply("/recovers", Reply(status=503), Reply(status=502), Reply(body=b'{"ok": 1}'))
    gateway = start_gateway({"HTTP_CLIENT_BASE_URL": stub.url, "HTTP_CLIENT_RETRIES": "2"})
    exhausted = gateway.get("/api/v1/flaky")
    assert exhausted.status_code == 503
    assert exhausted.content == b"busy"
    assert len(stub.calls("/flaky")) == 3
    recovered = gateway.get("/api/v1/recovers")
    assert recovered.status_code == 200
    assert len(stub.calls("/recovers")) == 3


def test_post_is_never_retried(start_gateway: StartGateway, stub: StubUpstream) -> None:
    stub.reply("/orders", Reply(status=503))
    gateway = start_gateway({"HTTP_CLIENT_BASE_URL": stub.url, "HTTP_CLIENT_RETRIES": "3"})
    response = gateway.request(
        "POST", "/api/v1/orders", data=b"{}", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 503
    assert len(stub.calls("/orders")) == 1


def test_redirect_is_passed_to_the_client_not_followed(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/old", Reply(status=302, headers=(("location", "https://elsewhere.example/x"),)))
    gateway = start_gateway({"HTTP_CLIENT_BASE_URL": stub.url})
    response = gateway.get("/api/v1/old", allow_redirects=False)
    assert response.status_code == 302
    assert response.headers["location"] == "https://elsewhere.example/x"
    assert len(stub.calls()) == 1


def test_invalid_settings_stop_start_up_with_exit_code_2_naming_the_variable(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway({"HTTP_CLIENT_TIMEOUT": "soon", "LOG_LEVEL": "chatty"}, wait=False)
    assert gateway.wait_exit() == 2
    output = gateway.output()
    assert "HTTP_CLIENT_TIMEOUT='soon': not an integer" in output
    assert "LOG_LEVEL='chatty'" in output
    assert "Traceback" not in output


def test_sigterm_drains_in_flight_requests_and_exits_0(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/slow", Reply(delay_s=1.5, body=b'{"done": true}'))
    gateway = start_gateway({"HTTP_CLIENT_BASE_URL": stub.url, "GRACEFUL_TIMEOUT": "10"})
    result: dict[str, requests.Response] = {}
    thread = threading.Thread(target=lambda: result.update(r=gateway.get("/api/v1/slow")))
    thread.start()
    deadline = time.monotonic() + 5
    while not stub.calls("/slow") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gateway.terminate() == 0
    thread.join(timeout=10)
    assert result["r"].status_code == 200
    assert result["r"].content == b'{"done": true}'


def test_logs_are_json_lines_with_request_ids_and_no_secrets(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    gateway = start_gateway(upstream_env(stub, LOG_LEVEL="debug"))
    wrong_key = "pk_abcdef123456_" + "k" * 43
    gateway.get("/api/v1/things?token=1", headers={"X-Request-Id": "log-1"})
    assert gateway.get("/api/v1/things", headers={"X-Api-Key": wrong_key}).status_code == 401
    gateway.get("/internal/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    gateway.get("/internal/metrics", headers={"Authorization": "Bearer wrong"})
    assert gateway.terminate() == 0
    records = gateway.log_records()  # fails if any line is not JSON
    output = gateway.output()
    assert gateway.api_key is not None
    for secret in (ADMIN_TOKEN, UPSTREAM_KEY, gateway.api_key, wrong_key):
        assert secret not in output
    request_lines = [r for r in records if r["msg"] == "request" and r.get("request_id") == "log-1"]
    assert len(request_lines) == 1
    line = request_lines[0]
    assert line["method"] == "GET"
    assert line["path"] == "/api/v1/things"
    assert line["status"] == 200
    assert line["upstream_status"] == 200
    assert line["key_id"] == gateway.api_key.split("_")[1]
    assert isinstance(line["duration_ms"], float)
    assert any(r["logger"] == "gunicorn.error" for r in records)


def test_metrics_are_merged_across_workers(start_gateway: StartGateway, stub: StubUpstream) -> None:
    gateway = start_gateway({"HTTP_CLIENT_BASE_URL": stub.url}, workers=2)
    for _ in range(40):
        # New connections spread the requests over both workers.
        requests.get(
            f"{gateway.url}/api/v1/x",
            timeout=5,
            headers=gateway.key_headers({"Connection": "close"}),
        )

    def proxied_total() -> float:
        text = gateway.get(
            "/internal/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ).text
        return sum(
            float(row.rsplit(" ", 1)[1])
            for row in text.splitlines()
            if row.startswith("proxy_http_requests_total{") and 'route="proxy"' in row
        )

    # Each worker writes its tallies at least once a second: the merged total catches up.
    deadline = time.monotonic() + 5
    total = proxied_total()
    while total < 40 and time.monotonic() < deadline:
        time.sleep(0.2)
        total = proxied_total()
    assert total == 40


def test_health_follows_redis_down_and_back_without_restart(
    start_gateway: StartGateway, stub: StubUpstream, redis_server: RedisServer
) -> None:
    gateway = start_gateway(
        {"HTTP_CLIENT_BASE_URL": stub.url, "GIT_SHA": "0123abc", "DEPLOY_ID": "run-42.1"}
    )
    assert gateway.get("/health").json() == {
        "status": "ok",
        "version": "0123abc",
        "deployment": "run-42.1",
        "redis": {"cache": "up"},
        "upstream": {"configured": True, "breaker": "off"},
    }
    redis_server.stop()
    try:
        started = time.monotonic()
        health = gateway.get("/health")
        assert time.monotonic() - started < 1.5
        assert health.status_code == 200
        assert health.json()["status"] == "degraded"
        assert gateway.get("/health/ready").status_code == 503
        assert gateway.get("/health/live").status_code == 200
    finally:
        redis_server.start()
    deadline = time.monotonic() + 5
    while gateway.get("/health/ready").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gateway.get("/health").json()["status"] == "ok"


def test_a_delete_with_a_body_is_never_retried(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/orders/1", Reply(status=503))
    gateway = start_gateway({"HTTP_CLIENT_BASE_URL": stub.url, "HTTP_CLIENT_RETRIES": "2"})
    with_body = gateway.request(
        "DELETE",
        "/api/v1/orders/1",
        data=b'{"reason": "x"}',
        headers={"Content-Type": "application/json"},
    )
    assert with_body.status_code == 503
    assert len(stub.calls("/orders/1")) == 1
    assert gateway.request("DELETE", "/api/v1/orders/1").status_code == 503
    assert len(stub.calls("/orders/1")) == 4  # without a body: retried twice
