"""The server's request handling without a worker: the WSGI environ a parsed request becomes,
the body stream, and the fair-share yield."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from proxy_app.http_connection import Connection, FairShare


def test_only_a_request_that_never_waited_yields() -> None:
    fair_share = FairShare()
    yields: list[float] = []
    fair_share._sleep = yields.append

    never_waited = fair_share.mark()
    fair_share.settle(never_waited)
    assert yields == [0]

    waited = fair_share.mark()
    gevent.sleep(0.001)  # what waiting for Redis or the upstream does: the event loop turns
    fair_share.settle(waited)
    assert yields == [0]  # no second yield


@pytest.fixture
def connection() -> Iterator[Connection]:
    ours, theirs = socket.socketpair()
    template = {"wsgi.url_scheme": "http", "SCRIPT_NAME": ""}
    yield Connection(ours, ("192.0.2.7", 40000), _no_app, template, keepalive_s=5)
    ours.close()
    theirs.close()


def _no_app(environ: Any, start_response: Any) -> list[bytes]:
    raise AssertionError("not called here")


def _environ(connection: Connection, raw: bytes) -> dict[str, Any]:
    connection._feed(raw)
    assert connection._parse_error is None
    return connection._environ(connection._ready.popleft())


def test_the_environ_carries_the_raw_target_and_the_decoded_path(connection: Connection) -> None:
    environ = _environ(
        connection, b"GET /api/v1/a%20b/%2F?x=1&x=2 HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    )
    assert environ["REQUEST_METHOD"] == "GET"
    assert environ["RAW_URI"] == "/api/v1/a%20b/%2F?x=1&x=2"
    assert environ["PATH_INFO"] == "/api/v1/a b//"
    assert environ["QUERY_STRING"] == "x=1&x=2"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert environ["REMOTE_ADDR"] == "192.0.2.7"
    assert environ["HTTP_HOST"] == "gw.test"


def test_an_absolute_form_target_keeps_its_raw_form(connection: Connection) -> None:
    environ = _environ(connection, b"GET http://gw.test/api/v1/x?q=1 HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert environ["RAW_URI"] == "http://gw.test/api/v1/x?q=1"
    assert environ["PATH_INFO"] == "/api/v1/x"
    assert environ["QUERY_STRING"] == "q=1"


def test_headers_map_to_wsgi_names_repeats_joined_and_underscores_dropped(
    connection: Connection,
) -> None:
    environ = _environ(
        connection,
        b"POST /x HTTP/1.1\r\nHost: gw\r\nAccept: a/b\r\naccept: c/d\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\nX_Api_Key: sneaky\r\n\r\n{}",
    )
    assert environ["HTTP_ACCEPT"] == "a/b,c/d"
    assert environ["CONTENT_TYPE"] == "application/json"
    assert environ["CONTENT_LENGTH"] == "2"
    assert "HTTP_X_API_KEY" not in environ
    assert environ["wsgi.input"].read() == b"{}"


def test_a_chunked_body_is_read_decoded_and_ends_with_the_request(connection: Connection) -> None:
    environ = _environ(
        connection,
        b"POST /x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4\r\nde\nf\r\n0\r\n\r\n",
    )
    body = environ["wsgi.input"]
    assert "CONTENT_LENGTH" not in environ
    assert body.read(2) == b"ab"
    assert body.readline() == b"cde\n"
    assert body.read() == b"f"
    assert body.read(10) == b""
