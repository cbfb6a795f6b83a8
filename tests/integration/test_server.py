"""The gateway's own HTTP/1.1 server (``proxy_app.worker`` with ``proxy_app.http_connection``),
over real sockets against the real service: keep-alive, pipelining, HTTP/1.0, request bodies,
the limits and refusals that keep requests from being smuggled, slow and vanishing clients."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.support.app import ADMIN_TOKEN
from tests.support.gateway import Gateway
from tests.support.raw_http import RawConnection, request_bytes
from tests.support.redis_server import RedisServer
from tests.support.stub_upstream import Reply, StubUpstream

pytestmark = pytest.mark.integration

BODY_LIMIT = 1024
CLIENT_REQUEST_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def upstream() -> Iterator[StubUpstream]:
    stub = StubUpstream()
    yield stub
    stub.close()


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, upstream: StubUpstream) -> Iterator[Gateway]:
    """One worker, so that every connection of a test shares it."""
    if redis_server.process is None:
        redis_server.start()
    server = Gateway(
        {
            "CACHE_REDIS_URL": redis_server.url,
            "ADMIN_API_TOKEN": ADMIN_TOKEN,
            "HTTP_CLIENT_BASE_URL": upstream.url,
            "PROXY_BODY_LIMIT": str(BODY_LIMIT),
            "CLIENT_REQUEST_TIMEOUT": str(CLIENT_REQUEST_TIMEOUT_S),
        },
        workers=1,
    ).start()
    server.api_key = server.create_key(ADMIN_TOKEN)["apiKey"]
    yield server
    server.stop()


@pytest.fixture
def connect(gateway: Gateway) -> Iterator[Callable[[], RawConnection]]:
    opened: list[RawConnection] = []

    def open_connection() -> RawConnection:
        connection = RawConnection(gateway.port)
        opened.append(connection)
        return connection

    yield open_connection
    for connection in opened:
        connection.close()


def _keyed(gateway: Gateway, extra: dict[str, str] | None = None) -> dict[str, str]:
    assert gateway.api_key is not None
    return {"x-api-key": gateway.api_key, **(extra or {})}


# --- connections ---------------------------------------------------------------------------


def test_keep_alive_serves_several_requests_and_connection_close_ends_it(
    connect: Callable[[], RawConnection],
) -> None:
    conn = connect()
    for _ in range(3):
        conn.send(request_bytes("GET", "/health/live"))
        answer = conn.read_response()
        assert answer.status == 200
        assert answer.header("connection") is None  # HTTP/1.1: persistent by default
        assert answer.header("date")
    conn.send(request_bytes("GET", "/health/live", {"Connection": "close"}))
    answer = conn.read_response()
    assert answer.status == 200
    assert answer.header("connection") == "close"
    assert conn.closed_by_server()


def test_pipelined_requests_are_answered_in_order(
    gateway: Gateway, connect: Callable[[], RawConnection], upstream: StubUpstream
) -> None:
    conn = connect()
    conn.send(
        request_bytes("GET", "/api/v1/first", _keyed(gateway))
        + request_bytes("GET", "/health/live")
        + request_bytes("GET", "/api/v1/second")  # no key
        + request_bytes("HEAD", "/health/live")
        + request_bytes("GET", "/api/v1/third?x=1", _keyed(gateway))
    )
    first = conn.read_response()
    live = conn.read_response()
    unkeyed = conn.read_response()
    head = conn.read_response(head_request=True)
    third = conn.read_response()
    assert (first.status, json.loads(first.body)["path"]) == (200, "/first")
    assert live.status == 200
    assert json.loads(live.body) == {"status": "ok"}
    assert unkeyed.status == 401
    assert head.status == 200
    assert head.body == b""
    assert head.header("content-length") == str(len(live.body))
    assert (third.status, json.loads(third.body)["query"]) == (200, "x=1")


def test_http_1_0_clients_get_close_or_keep_alive_as_they_ask(
    connect: Callable[[], RawConnection],
) -> None:
    plain = connect()
    plain.send(b"GET /health/live HTTP/1.0\r\n\r\n")
    answer = plain.read_response()
    assert answer.status == 200
    assert answer.body == b'{"status":"ok"}\n'
    assert plain.closed_by_server()

    kept = connect()
    for _ in range(2):
        kept.send(b"GET /health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        answer = kept.read_response()
        assert answer.status == 200
        assert answer.header("connection") == "keep-alive"


def test_head_answers_carry_the_length_but_no_body(
    connect: Callable[[], RawConnection],
) -> None:
    conn = connect()
    conn.send(request_bytes("HEAD", "/health"))
    head = conn.read_response(head_request=True)
    conn.send(request_bytes("GET", "/health"))
    get = conn.read_response()  # would fail to parse had the HEAD answer carried a body
    assert head.status == get.status == 200
    assert head.header("content-length") == str(len(get.body))


def test_header_names_with_underscores_are_dropped(
    gateway: Gateway, connect: Callable[[], RawConnection], upstream: StubUpstream
) -> None:
    """``x_api_key`` would otherwise reach the app as ``x-api-key`` (both are
    HTTP_X_API_KEY in WSGI)."""
    assert gateway.api_key is not None
    conn = connect()
    conn.send(request_bytes("GET", "/api/v1/underscored", {"x_api_key": gateway.api_key}))
    assert conn.read_response().status == 401
    assert not upstream.calls("/underscored")


# --- request bodies ------------------------------------------------------------------------


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def test_a_chunked_body_reaches_the_upstream_whole(
    gateway: Gateway, connect: Callable[[], RawConnection], upstream: StubUpstream
) -> None:
    conn = connect()
    body = b'{"name": "chunked", "n": [1, 2, 3]}'
    head = request_bytes(
        "POST",
        "/api/v1/chunked",
        _keyed(gateway, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}),
    )
    conn.send(head + _chunked(body[:10], body[10:]))
    assert conn.read_response().status == 200
    assert upstream.calls("/chunked")[-1].body == body
    conn.send(request_bytes("GET", "/health/live"))  # the connection is still in step
    assert conn.read_response().status == 200


def test_a_chunked_body_over_the_limit_gets_413_without_being_read_to_its_end(
    gateway: Gateway, connect: Callable[[], RawConnection], upstream: StubUpstream
) -> None:
    conn = connect()
    head = request_bytes(
        "POST",
        "/api/v1/too-big",
        _keyed(gateway, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}),
    )
    # More than the limit, and no last chunk: a server that read on would wait forever.
    conn.send(head + b"%x\r\n%b\r\n" % (BODY_LIMIT * 2, b" " * (BODY_LIMIT * 2)))
    answer = conn.read_response()
    assert answer.status == 413
    assert json.loads(answer.body)["error"] == "payload_too_large"
    assert conn.closed_by_server()
    assert not upstream.calls("/too-big")


def test_a_declared_length_over_the_limit_gets_413_before_the_body_is_sent(
    gateway: Gateway, connect: Callable[[], RawConnection], upstream: StubUpstream
) -> None:
    conn = connect()
    conn.send(
        request_bytes(
            "POST",
            "/api/v1/declared",
            _keyed(
                gateway,
                {"Content-Type": "application/json", "Content-Length": str(10 * BODY_LIMIT)},
            ),
        )
    )
    answer = conn.read_response()
    assert answer.status == 413
    assert answer.header("connection") == "close"
    assert not upstream.calls("/declared")


def test_expect_100_continue_is_answered_when_the_body_is_wanted(
    gateway: Gateway, connect: Callable[[], RawConnection], upstream: StubUpstream
) -> None:
    body = b'{"continued": true}'
    conn = connect()
    conn.send(
        request_bytes(
            "POST",
            "/api/v1/continued",
            _keyed(
                gateway,
                {
                    "Content-Type": "application/json",
                    "Content-Length": str(len(body)),
                    "Expect": "100-continue",
                },
            ),
        )
    )
    interim = conn.read_response()
    assert interim.status == 100
    conn.send(body)
    assert conn.read_response().status == 200
    assert upstream.calls("/continued")[-1].body == body


def test_expect_100_continue_gets_the_refusal_instead_when_the_key_is_missing(
    connect: Callable[[], RawConnection], upstream: StubUpstream
) -> None:
    conn = connect()
    conn.send(
        request_bytes(
            "POST",
            "/api/v1/unwanted",
            {"Content-Type": "application/json", "Content-Length": "50", "Expect": "100-continue"},
        )
    )
    answer = conn.read_response()
    assert answer.status == 401  # no 100 first: the body is never asked for
    assert answer.header("connection") == "close"
    assert conn.closed_by_server()


# --- limits and malformed requests ---------------------------------------------------------


def test_a_long_request_target_gets_414(connect: Callable[[], RawConnection]) -> None:
    conn = connect()
    conn.send(request_bytes("GET", "/api/v1/" + "a" * 5000))
    answer = conn.read_response()
    assert answer.status == 414
    assert json.loads(answer.body)["error"] == "uri_too_long"
    assert conn.closed_by_server()


@pytest.mark.parametrize(
    "headers",
    [
        {f"x-many-{n}": "1" for n in range(101)},
        {"x-long": "v" * 9000},
    ],
    ids=["too many fields", "a field too long"],
)
def test_oversized_headers_get_431(
    connect: Callable[[], RawConnection], headers: dict[str, str]
) -> None:
    conn = connect()
    conn.send(request_bytes("GET", "/health/live", headers))
    answer = conn.read_response()
    assert answer.status == 431
    assert json.loads(answer.body)["error"] == "request_header_fields_too_large"
    assert conn.closed_by_server()


SMUGGLED = b"GET /api/v1/smuggled HTTP/1.1\r\nHost: gateway.test\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "body"),
    [
        (b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        (b"Content-Length: 4\r\nContent-Length: 40\r\n", b"{}  " + SMUGGLED),
        (b"Content-Length: 4\r\nContent-Length: 4\r\n", b"{}  " + SMUGGLED),
        (b"Content-Length: +4\r\n", b"{}  " + SMUGGLED),
        (b"Content-Length: 4, 4\r\n", b"{}  " + SMUGGLED),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", b"0\r\n\r\n"),
        (b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n" + SMUGGLED),
        (b"X-Folded: a\r\n b\r\nContent-Length: 2\r\n", b"{}"),
        (b"Transfer-Encoding: chunked\r\n", b"4\r\n{}  \r\n0\n\n" + SMUGGLED),
    ],
    ids=[
        "content-length and transfer-encoding",
        "two different content-lengths",
        "two equal content-lengths",
        "signed content-length",
        "listed content-length",
        "two transfer-encodings",
        "chunked not last",
        "obs-fold",
        "bare LF in a chunked body",
    ],
)
def test_ambiguous_framing_is_refused_and_the_connection_closed(
    gateway: Gateway,
    connect: Callable[[], RawConnection],
    upstream: StubUpstream,
    head: bytes,
    body: bytes,
) -> None:
    assert gateway.api_key is not None
    before = len(upstream.calls())
    conn = connect()
    conn.send(
        b"POST /api/v1/framed HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json"
        b"\r\nx-api-key: " + gateway.api_key.encode() + b"\r\n" + head + b"\r\n" + body
    )
    answer = conn.read_response()
    assert answer.status in (400, 501)
    assert json.loads(answer.body)["error"]
    assert conn.closed_by_server()
    assert not upstream.calls("/smuggled")
    assert len(upstream.calls()) == before


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /health/live HTTP/1.1\nHost: gateway.test\n\n",
        b"G@T /health/live HTTP/1.1\r\nHost: gateway.test\r\n\r\n",
        b"GET /health/ live HTTP/1.1\r\nHost: gateway.test\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nHost : gateway.test\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nX-Nul: a\x00b\r\n\r\n",
        b"GET /health/live HTTP/2.0\r\nHost: gateway.test\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nUser-Agent: no-host\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ],
    ids=[
        "bare LF",
        "invalid method",
        "space in target",
        "space before colon",
        "NUL in a value",
        "HTTP/2.0 request line",
        "HTTP/1.1 without Host",
        "two Hosts",
        "TLS handshake",
    ],
)
def test_malformed_requests_get_an_error_and_the_connection_closed(
    connect: Callable[[], RawConnection], raw: bytes
) -> None:
    conn = connect()
    conn.send(raw)
    answer = conn.read_response()
    assert 400 <= answer.status < 600
    assert json.loads(answer.body)["error"]
    assert answer.header("connection") == "close"
    assert conn.closed_by_server()


# --- slow and vanishing clients ------------------------------------------------------------


def test_slow_clients_are_cut_after_a_bounded_time_without_holding_up_others(
    gateway: Gateway, connect: Callable[[], RawConnection]
) -> None:
    slow_head = connect()
    slow_body = connect()
    slow_head.send(b"GET /health/live HTTP/1.1\r\nHost: gateway.test\r\n")
    slow_body.send(
        request_bytes(
            "POST",
            "/api/v1/slow-body",
            _keyed(gateway, {"Content-Type": "application/json", "Content-Length": "100"}),
        )
        + b'{"a":'
    )
    cut: dict[str, float] = {}
    started = time.monotonic()

    def trickle(conn: RawConnection, name: str, piece: bytes) -> None:
        try:
            while time.monotonic() - started < 20:
                conn.send(piece)  # a byte now and then, never the end
                time.sleep(0.2)
        except OSError:
            pass
        cut[name] = time.monotonic() - started

    threads = [
        threading.Thread(target=trickle, args=(slow_head, "head", b"X")),
        threading.Thread(target=trickle, args=(slow_body, "body", b" ")),
    ]
    for thread in threads:
        thread.start()
    answered_meanwhile = 0
    while any(thread.is_alive() for thread in threads) and time.monotonic() - started < 30:
        assert requests.get(f"{gateway.url}/health/live", timeout=2).status_code == 200
        answered_meanwhile += 1
        time.sleep(0.2)
    for thread in threads:
        thread.join(timeout=5)
    assert set(cut) == {"head", "body"}, "a trickling client was never cut"
    assert max(cut.values()) < 20
    assert answered_meanwhile >= 5
    assert slow_head.read_response().status == 408
    assert slow_body.read_response().status == 408


def test_a_client_that_vanishes_mid_answer_costs_only_its_connection(
    gateway: Gateway, upstream: StubUpstream
) -> None:
    upstream.reply(
        "/large",
        Reply(body=b"x" * (4 * 1024 * 1024), headers=(("cache-control", "no-store"),)),
    )
    assert gateway.api_key is not None
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        sock.sendall(request_bytes("GET", "/api/v1/large", _keyed(gateway)))
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # reset, with most of the answer unread
    answer = gateway.get("/api/v1/after-vanishing")
    assert answer.status_code == 200
    assert "Traceback" not in gateway.output()


def test_the_gateway_root_with_a_trailing_slash_is_proxied_not_redirected(
    gateway: Gateway, connect: Callable[[], RawConnection], upstream: StubUpstream
) -> None:
    conn = connect()
    conn.send(request_bytes("GET", "/api/v1/", _keyed(gateway)))
    answer = conn.read_response()
    assert answer.status == 200
    assert json.loads(answer.body)["path"] == "/"
    conn.send(request_bytes("GET", "/api/v1/"))  # no key: refused as usual, not redirected
    assert conn.read_response().status == 401
