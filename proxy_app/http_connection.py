"""One client connection of the gateway's own HTTP/1.1 server: requests parsed with httptools
(llhttp, Node's parser), handed to the WSGI app one at a time, answers written with one send.

gunicorn stays the process manager (``proxy_app.worker``); this is what its stock gevent
worker did per connection, in less work per request: no Python-level header parsing, the
status line, headers and an in-memory body in one ``sendall``, and the WSGI environ built from
a per-connection template. What the parser leaves to the server is here: the request-line and
header limits, the body handed to the app lazily (so a refused request never has its body
read), response framing, the keep-alive, head and body timeouts, and the fair share of the
worker for clients whose requests never wait.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import socket
import sys
import termios
import time
from collections.abc import Callable, Iterable, Iterator
from email.utils import formatdate
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

import httptools
import orjson

from proxy_app.errors import error_document
from proxy_app.forwarding import PROXIED_METHODS

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

log = logging.getLogger("proxy_app.server")

# gunicorn's defaults, kept so that clients see the limits they saw before: longest request
# target (414 beyond), most header fields and longest field (431 beyond).
LIMIT_REQUEST_LINE = 4094
LIMIT_REQUEST_FIELDS = 100
LIMIT_REQUEST_FIELD_SIZE = 8190
# Seconds a client has, from the first byte of a request, to send all of it (line, headers,
# body) unless the server is told otherwise: a client that trickles bytes (slowloris) then
# holds a connection for a bounded time only.
REQUEST_TIMEOUT_S = 30.0
# A client that takes no bytes of its answer for this long is cut off.
SEND_TIMEOUT_S = 60.0
# At shutdown, a connection accepted but not yet sent anything gets this long to send its
# request before it is closed unanswered.
LAST_CALL_S = 0.1
# Bytes asked of the kernel per read.
RECV_SIZE = 65536
# Environ names of the header names seen, by raw name: clients repeat the same few.
_ENVIRON_NAMES_MOST = 512

# The app reads this environ entry to know the server is shutting down (readiness turns 503).
SERVER_STATE_ENVIRON = "proxy_app.server_state"

_NO_BODY_STATUSES = frozenset({204, 304})
_STATUS_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}
# Framing is the server's business: these from the app are replaced by the server's own.
_FRAMING_HEADERS = frozenset({"transfer-encoding", "connection", "keep-alive"})


class ServerState:
    """What the worker tells its connections and the app: whether it is shutting down (the app
    answers readiness probes 503 from then on) and whether it has stopped taking requests
    (connections answer what is in progress with ``Connection: close``)."""

    __slots__ = ("closing", "shutting_down")

    def __init__(self) -> None:
        self.shutting_down = False
        self.closing = False


class FairShare:
    """Under gevent, a request that never waited for I/O (a 401 for a missing key, a health
    check, a refused path) never lets the worker's other connections run: a client pipelining
    a stream of them would starve every other client of the worker. Such a request yields once
    after its answer; one that waited for Redis or the upstream has yielded already and pays
    nothing. Whether it waited is read off the event loop's iteration count."""

    __slots__ = ("_loop", "_sleep")

    def __init__(self) -> None:
        import gevent

        self._loop = gevent.get_hub().loop
        self._sleep = gevent.sleep

    def mark(self) -> int:
        return int(self._loop.iteration)

    def settle(self, mark: int) -> None:
        if self._loop.iteration == mark:
            self._sleep(0)


class ResponseAborted(Exception):
    """Raised by an app's body iterable to have the connection cut (the answer cannot be
    completed); the app has logged why, so the server does not again."""


class RequestRefused(Exception):
    """A request the server answers itself (malformed, too large, too slow) before or instead
    of the app; the connection is closed after the answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Request:
    """A request as the parser delivered it: line and headers complete, body arriving."""

    __slots__ = (
        "body",
        "body_size",
        "complete",
        "deadline",
        "expect_continue",
        "headers",
        "keep_alive",
        "method",
        "url",
        "version",
    )

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # when all of it must have arrived (monotonic clock)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.expect_continue = False
        self.body: collections.deque[bytes] = collections.deque()
        self.body_size = 0
        self.complete = False


class RequestBody:
    """``wsgi.input``: the request body as the client sends it, read from the socket only when
    the app asks (a request refused before its body is read costs no more than its head).
    Chunked bodies come decoded; the stream ends where the body ends."""

    __slots__ = ("_connection", "_continued", "_request")

    def __init__(self, connection: Connection, request: _Request) -> None:
        self._connection = connection
        self._request = request
        self._continued = False

    def read(self, size: int | None = -1) -> bytes:
        request = self._request
        if size is None or size < 0:
            while not request.complete:
                self._more()
            data = b"".join(request.body)
            request.body.clear()
            return data
        if size == 0:
            return b""
        while not request.body and not request.complete:
            self._more()
        if not request.body:
            return b""
        chunk = request.body.popleft()
        if len(chunk) > size:
            request.body.appendleft(chunk[size:])
            chunk = chunk[:size]
        return chunk

    def readline(self, size: int | None = -1) -> bytes:
        request = self._request
        line = bytearray()
        while size is None or size < 0 or len(line) < size:
            while not request.body and not request.complete:
                self._more()
            if not request.body:
                break
            chunk = request.body.popleft()
            newline = chunk.find(b"\n")
            end = len(chunk) if newline < 0 else newline + 1
            if size is not None and size >= 0:
                end = min(end, size - len(line))
            line += chunk[:end]
            if end < len(chunk):
                request.body.appendleft(chunk[end:])
            if newline >= 0 and end == newline + 1:
                break
        return bytes(line)

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def _more(self) -> None:
        request = self._request
        if request.expect_continue and not self._continued:
            self._continued = True
            # The client waits for this before it sends the body; its time starts now.
            request.deadline = time.monotonic() + self._connection.request_timeout_s
            self._connection.send_continue()
        self._connection.receive_body(request.deadline - time.monotonic())


class Connection:
    """Serves the requests of one client connection in order until either side closes it.

    Also the parser's protocol: httptools calls the ``on_*`` methods as it parses."""

    def __init__(
        self,
        sock: socket.socket,
        address: Any,
        app: WSGIApplication,
        environ_template: dict[str, Any],
        *,
        keepalive_s: float,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        fair_share: FairShare | None = None,
        state: ServerState | None = None,
    ) -> None:
        self.sock = sock
        self.app = app
        self.keepalive_s = keepalive_s
        self.request_timeout_s = request_timeout_s
        self.fair_share = fair_share
        self._state = state or ServerState()
        self._served = 0
        host, port = (address[0], address[1]) if isinstance(address, tuple) else ("", 0)
        self._template = {**environ_template, "REMOTE_ADDR": host, "REMOTE_PORT": str(port)}
        self._parser = httptools.HttpRequestParser(self)
        self._parsing: _Request | None = None
        self._ready: collections.deque[_Request] = collections.deque()
        self._header_count = 0
        self._parse_error: RequestRefused | None = None
        self.upgraded = False  # the parser stopped at an Upgrade/CONNECT: no more requests
        self._eof = False
        # Whether the connection waits for a request with nothing of it received yet: such a
        # connection may be closed at once when the worker stops.
        self.idle = True
        self._closing = False  # the request stream can no longer be followed: close after this

    @property
    def closing(self) -> bool:
        return self._closing or self._state.closing

    def close_if_idle(self) -> bool:
        """Shut the connection when it waits for a request of which nothing has arrived (the
        worker is stopping); whether it did."""
        if not self.idle:
            return False
        try:
            # Asked of the kernel without reading: the connection's own greenlet reads it.
            pending = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return True  # closed already
        if int.from_bytes(pending, sys.byteorder):
            return False  # a request is arriving: it will be answered, then closed
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the connection's pending read
        return True

    # --- the parser's callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = _Request(time.monotonic() + self.request_timeout_s)
        self._header_count = 0

    def on_url(self, url: bytes) -> None:
        request = self._parsing
        assert request is not None
        request.url += url
        if len(request.url) > LIMIT_REQUEST_LINE:
            raise RequestRefused(
                414,
                "uri_too_long",
                f"The request target is longer than {LIMIT_REQUEST_LINE} bytes.",
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._parsing
        assert request is not None
        self._header_count += 1
        if self._header_count > LIMIT_REQUEST_FIELDS:
            raise RequestRefused(
                431,
                "request_header_fields_too_large",
                f"The request has more than {LIMIT_REQUEST_FIELDS} header fields.",
            )
        if len(name) + len(value) > LIMIT_REQUEST_FIELD_SIZE:
            raise RequestRefused(
                431,
                "request_header_fields_too_large",
                f"A request header field is longer than {LIMIT_REQUEST_FIELD_SIZE} bytes.",
            )
        request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self._parsing
        assert request is not None
        parser = self._parser
        request.version = parser.get_http_version()
        if request.version not in ("1.1", "1.0"):
            raise RequestRefused(
                505, "http_version_not_supported", "Only HTTP/1.0 and HTTP/1.1 are served."
            )
        request.method = parser.get_method()
        request.keep_alive = parser.should_keep_alive()
        hosts = 0
        for name, value in request.headers:
            lowered = name.lower()
            if lowered == b"host":
                hosts += 1
            elif lowered == b"transfer-encoding" and value.strip().lower() != b"chunked":
                # llhttp takes codings before the final chunked; none is decoded here.
                raise RequestRefused(
                    501,
                    "unsupported_transfer_coding",
                    "Only the chunked transfer coding is supported.",
                )
            elif lowered == b"expect":
                if value.strip().lower() != b"100-continue":
                    raise RequestRefused(
                        417, "expectation_failed", "Only Expect: 100-continue is served."
                    )
                request.expect_continue = request.version == "1.1"
        if hosts > 1 or (hosts == 0 and request.version == "1.1"):
            # RFC 9112 section 3.2: exactly one Host in HTTP/1.1; two could be read differently
            # by the gateway and whatever sits in front of it.
            raise RequestRefused(400, "bad_request", "An HTTP/1.1 request needs exactly one Host.")
        self._ready.append(request)

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        assert request is not None
        request.body.append(body)
        request.body_size += len(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        assert request is not None
        request.complete = True
        self._parsing = None

    # --- serving --------------------------------------------------------------------------

    def serve(self) -> None:
        """Answer requests until the client closes, keep-alive ends or the worker stops."""
        sock = self.sock
        try:
            while True:
                request = self._next_request()
                if request is None:
                    return
                self.idle = False
                keep_alive = self._handle(request)
                self._served += 1
                if not keep_alive or self.closing:
                    return
                self.idle = not self._ready and self._parsing is None
        except RequestRefused as refused:
            self._refuse(refused)
        except OSError:
            pass  # the client went away or the socket was shut: nothing to answer
        finally:
            self.idle = False
            with contextlib.suppress(OSError):
                sock.close()

    def _next_request(self) -> _Request | None:
        """The next request whose line and headers are complete, or None when the connection
        ends (client closed, keep-alive expired, worker stopping while idle)."""
        while not self._ready:
            if self._parse_error is not None:
                raise self._parse_error
            if self._eof or self.upgraded:
                return None
            if self._parsing is None:
                timeout = self.keepalive_s  # nothing of the next request has arrived yet
                if self.closing:
                    if self._served:
                        return None
                    # Accepted just before the worker stopped accepting: its request may
                    # still be on the way.
                    timeout = LAST_CALL_S
            else:
                timeout = self._parsing.deadline - time.monotonic()
                if timeout <= 0:
                    raise RequestRefused(
                        408, "request_timeout", "The request head was not received in time."
                    )
            try:
                self._receive(timeout)
            except TimeoutError:
                if self._parsing is None:
                    return None  # an idle keep-alive connection expired
                raise RequestRefused(
                    408, "request_timeout", "The request head was not received in time."
                ) from None
        return self._ready.popleft()

    def _receive(self, timeout: float) -> None:
        """Read once from the client and parse what came; parse errors are kept for the
        request they belong to."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(RECV_SIZE)
        if not data:
            self._eof = True
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade or CONNECT request: the app answers it as a plain request (there is
            # no upgrade here) and the connection closes after it.
            self.upgraded = True
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, RequestRefused):
                self._parse_error = cause
            else:
                self._parse_error = RequestRefused(400, "bad_request", "Malformed request.")
        except httptools.HttpParserInvalidMethodError:
            self._parse_error = RequestRefused(
                400, "bad_request", "The request method is not valid."
            )
        except httptools.HttpParserError as exc:
            self._parse_error = RequestRefused(400, "bad_request", f"Malformed request: {exc}.")

    def receive_body(self, timeout: float) -> None:
        """More of the current request's body (for ``RequestBody``)."""
        if self._parse_error is not None:
            self._closing = True
            from werkzeug.exceptions import BadRequest

            raise BadRequest(self._parse_error.message)
        if self._eof or self.upgraded or timeout <= 0:
            from werkzeug.exceptions import ClientDisconnected, RequestTimeout

            self._closing = True
            if timeout <= 0:
                raise RequestTimeout("The request body was not received in time.")
            raise ClientDisconnected()
        try:
            self._receive(timeout)
        except TimeoutError:
            from werkzeug.exceptions import RequestTimeout

            self._closing = True
            raise RequestTimeout("The request body was not received in time.") from None

    def send_continue(self) -> None:
        self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _handle(self, request: _Request) -> bool:
        """Run the app for one request and send its answer; whether the connection may carry
        another request."""
        fair_share = self.fair_share
        mark = fair_share.mark() if fair_share is not None else 0
        environ = self._environ(request)
        response = _Response(self, request)
        try:
            result = self.app(environ, response.start)
            try:
                response.send(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except OSError:
            raise
        except ResponseAborted:
            if response.sent_head:
                raise OSError("response aborted") from None
            raise RequestRefused(
                502, "bad_gateway", "The gateway could not complete this answer."
            ) from None
        except Exception:
            # The app's own errors become JSON answers inside it; this is what escaped it.
            log.exception("the app failed to answer")
            if response.sent_head:
                raise OSError("response aborted") from None
            raise RequestRefused(
                500, "internal_error", "The gateway failed to answer this request."
            ) from None
        if fair_share is not None:
            fair_share.settle(mark)
        if not request.complete:
            # The app answered without reading the whole body: what is left of it cannot be
            # told from the next request.
            return False
        return response.keep_alive and not self.closing

    def _environ(self, request: _Request) -> dict[str, Any]:
        environ = self._template.copy()
        url = request.url.decode("latin-1")
        environ["REQUEST_METHOD"] = _METHODS.get(request.method) or request.method.decode("ascii")
        environ["RAW_URI"] = url
        if url.startswith("/"):
            path, _, query = url.partition("?")
        else:  # absolute form (http://host/path) or an authority/asterisk form
            path, query = _split_other_target(request.url)
        path, _, _fragment = path.partition("#")
        environ["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1") if "%" in path else path
        environ["QUERY_STRING"] = query
        environ["SERVER_PROTOCOL"] = "HTTP/1.0" if request.version == "1.0" else "HTTP/1.1"
        environ["wsgi.input"] = RequestBody(self, request)
        names = _ENVIRON_NAMES
        for raw_name, raw_value in request.headers:
            key = names.get(raw_name)
            if key is None:
                key = _environ_name(raw_name)
            if not key:
                continue  # a name with "_": it would pass for one spelled with "-"
            value = raw_value.decode("latin-1")
            if key in environ and key not in _SINGLE_VALUED:
                environ[key] += "," + value
            else:
                environ[key] = value
        if "HTTP_TRANSFER_ENCODING" in environ:
            environ.pop("CONTENT_LENGTH", None)
        return environ

    def _refuse(self, refused: RequestRefused) -> None:
        """Answer a request the server refuses itself, then the connection closes."""
        log.info("request refused", extra={"status": refused.status, "reason": refused.message})
        body = orjson.dumps(error_document(refused.code, refused.message))
        reason = _STATUS_REASONS.get(refused.status, "Bad Request")
        head = (
            f"HTTP/1.1 {refused.status} {reason}\r\n"
            f"date: {current_http_date()}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        try:
            self.sock.settimeout(SEND_TIMEOUT_S)
            self.sock.sendall(head.encode("latin-1") + body)
        except OSError:
            pass


class _Response:
    """The WSGI ``start_response`` and the writing of one answer: status line, headers and
    the first body chunk in one send; the framing (content-length, chunked, or close) chosen
    by the server."""

    __slots__ = (
        "_chunked",
        "_connection",
        "_expected",
        "_headers",
        "_no_body",
        "_request",
        "_sent_body",
        "_sock",
        "_status",
        "keep_alive",
        "sent_head",
    )

    def __init__(self, connection: Connection, request: _Request) -> None:
        self._connection = connection
        self._sock = connection.sock
        self._request = request
        self._status = ""
        self._headers: list[tuple[str, str]] = []
        self.sent_head = False
        self._chunked = False
        self._no_body = False
        self._expected: int | None = None  # the content-length the app declared
        self._sent_body = 0
        self.keep_alive = request.keep_alive

    def start(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None and self.sent_head:
            raise exc_info[1].with_traceback(exc_info[2])
        self._status = status
        self._headers = headers
        return self._send_chunk  # the legacy WSGI ``write`` callable

    def send(self, result: Iterable[bytes]) -> None:
        self._sock.settimeout(SEND_TIMEOUT_S)
        fair_share = self._connection.fair_share
        mark = None
        for chunk in result:
            if mark is not None and fair_share is not None:
                # A fast upstream and a fast client may never make the worker wait: the other
                # connections get a turn between the pieces of a streamed body all the same.
                fair_share.settle(mark)
            if chunk:
                self._send_chunk(chunk)
            if fair_share is not None:
                mark = fair_share.mark()
        if not self.sent_head:
            self._sock.sendall(self._head(0, complete=True))
        elif self._chunked:
            self._sock.sendall(b"0\r\n\r\n")
        if self._expected is not None and self._sent_body < self._expected and not self._no_body:
            raise OSError("response shorter than its content-length; connection cut")

    def _send_chunk(self, chunk: bytes) -> None:
        if not self.sent_head:
            head = self._head(len(chunk), complete=False)
            if self._no_body:
                self._sock.sendall(head)
                return
            self._count(chunk)
            self._sock.sendall(head + (_chunk(chunk) if self._chunked else chunk))
            return
        if self._no_body:
            return
        self._count(chunk)
        self._sock.sendall(_chunk(chunk) if self._chunked else chunk)

    def _count(self, chunk: bytes) -> None:
        self._sent_body += len(chunk)
        if self._expected is not None and self._sent_body > self._expected:
            raise OSError("response longer than its content-length; connection cut")

    def _head(self, first_chunk: int, *, complete: bool) -> bytes:
        if not self._status:
            raise RuntimeError("the app sent a body before start_response")
        self.sent_head = True
        status_code = int(self._status[:3])
        request = self._request
        self._no_body = (
            request.method == b"HEAD" or status_code < 200 or status_code in _NO_BODY_STATUSES
        )
        lines = [f"HTTP/1.1 {self._status}"]
        has_date = False
        for name, value in self._headers:
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise ValueError("a response header holds a line break")
            lowered = name.lower()
            if lowered in _FRAMING_HEADERS:
                if lowered == "connection" and "close" in value.lower():
                    self.keep_alive = False
                continue
            if lowered == "content-length":
                self._expected = int(value)
            elif lowered == "date":
                has_date = True
            lines.append(f"{name}: {value}")
        if not has_date:
            lines.append(f"date: {current_http_date()}")
        if self._expected is None and not self._no_body:
            if complete:
                self._expected = first_chunk
                lines.append(f"content-length: {first_chunk}")
            elif request.version == "1.1":
                self._chunked = True
                lines.append("transfer-encoding: chunked")
            else:
                self.keep_alive = False  # an HTTP/1.0 body of unknown length ends at close
        connection = self._connection
        if connection.closing or connection.upgraded or not request.complete:
            # Unread body bytes cannot be told from the next request: the connection ends.
            self.keep_alive = False
        if not self.keep_alive:
            lines.append("connection: close")
        elif request.version == "1.0":
            lines.append("connection: keep-alive")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


_date_cache: tuple[int, str] = (0, "")


def current_http_date() -> str:
    """The Date header value, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


# The method names clients send most, decoded once.
_METHODS = {method.encode(): method for method in PROXIED_METHODS}
# Header names that may occur once (the parser or the server refuses repeats of the latter two);
# a repeated one keeps its last value instead of a list.
_SINGLE_VALUED = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH", "HTTP_HOST"})
_ENVIRON_NAMES: dict[bytes, str] = {}


def _environ_name(raw_name: bytes) -> str:
    """The WSGI environ key of a header name ("" for one holding "_"), remembered while few."""
    name = raw_name.decode("latin-1")
    if "_" in name:
        key = ""
    else:
        upper = name.upper().replace("-", "_")
        key = upper if upper in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + upper
    if len(_ENVIRON_NAMES) < _ENVIRON_NAMES_MOST:
        _ENVIRON_NAMES[raw_name] = key
    return key


def _split_other_target(url: bytes) -> tuple[str, str]:
    """Path and query of a request target that is not origin-form."""
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return "", ""
    path = (parsed.path or b"").decode("latin-1")
    query = (parsed.query or b"").decode("latin-1")
    return path, query
