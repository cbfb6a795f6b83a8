"""A real HTTP server on 127.0.0.1 standing in for the upstream: it records every request it
receives and answers with scripted replies, large generated bodies included, and counts the
connections it holds open. The tests run it in their own process; the bench runs it as one of
its own (``python -m tests.support.stub_upstream``, see ``main``)."""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Generated bodies are sent in pieces of this size.
PIECE_BYTES = 64 * 1024
_PATTERN = bytes(range(256)) * (PIECE_BYTES // 256)


def generated_body(size: int) -> Iterator[bytes]:
    """A body of ``size`` bytes made up as it is sent (never held whole): every piece starts
    with its own number, so a lost, repeated or reordered piece changes the bytes."""
    sent = 0
    number = 0
    while sent < size:
        piece = (number.to_bytes(8, "big") + _PATTERN[8:])[: size - sent]
        yield piece
        sent += len(piece)
        number += 1


def generated_digest(size: int) -> str:
    digest = hashlib.sha256()
    for piece in generated_body(size):
        digest.update(piece)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    delay_s: float = 0.0
    generated_bytes: int = 0  # instead of ``body``: a generated body this long
    chunked: bool = False  # sent with chunked framing, no content-length
    stop_after_bytes: int | None = None  # the connection is closed after this much body
    raw: bytes | None = None  # sent as the whole answer, HTTP or not, then the connection closed


@dataclasses.dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_names(self) -> set[str]:
        return {key.lower() for key, _ in self.headers}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a stampede connects all at once

    def handle_error(self, request: object, client_address: object) -> None:
        """A client (the gateway) that drops its connection is what many tests do on purpose:
        not worth a traceback on stderr. Anything else is still printed."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class StubUpstream:
    """``port`` 0: a free one. ``default``: the reply to a path without scripted ones (else an
    echo of the request). ``counts_path``: a path answered at once, unrecorded, with how many
    requests each path got, as JSON (``{"/x": 1}``)."""

    def __init__(
        self, port: int = 0, *, default: Reply | None = None, counts_path: str | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._replies: dict[str, list[Reply]] = {}
        self._default = default
        self._counts_path = counts_path
        self.received: list[Recorded] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                stub._connected(+1)

            def finish(self) -> None:
                with contextlib.suppress(OSError):  # the peer has gone
                    super().finish()
                stub._connected(-1)

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                path, _, query = self.path.partition("?")
                if path == stub._counts_path:
                    counts = json.dumps(stub.counts()).encode()
                    self._answer(Reply(body=counts, headers=(("cache-control", "no-store"),)))
                    return
                recorded = Recorded(self.command, path, query, tuple(self.headers.items()), body)
                reply = stub._record(recorded)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                try:
                    self._answer(reply)
                except OSError:  # the client went away part-way
                    self.close_connection = True

            def _answer(self, reply: Reply) -> None:
                if reply.raw is not None:
                    self.wfile.write(reply.raw)
                    self.close_connection = True
                    return
                self.send_response(reply.status)
                for name, value in reply.headers:
                    self.send_header(name, value)
                size = reply.generated_bytes or len(reply.body)
                if reply.chunked:
                    self.send_header("transfer-encoding", "chunked")
                elif not any(name.lower() == "content-length" for name, _ in reply.headers):
                    self.send_header("content-length", str(size))
                self.end_headers()
                if self.command == "HEAD" or reply.status in (204, 304):
                    return
                pieces = generated_body(size) if reply.generated_bytes else iter([reply.body])
                sent = 0
                for piece in pieces:
                    if reply.stop_after_bytes is not None:
                        piece = piece[: max(0, reply.stop_after_bytes - sent)]
                    if piece:
                        framed = b"%x\r\n%s\r\n" % (len(piece), piece) if reply.chunked else piece
                        self.wfile.write(framed)
                        sent += len(piece)
                    if reply.stop_after_bytes is not None and sent >= reply.stop_after_bytes:
                        self.close_connection = True
                        return
                if reply.chunked:
                    self.wfile.write(b"0\r\n\r\n")

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle

        self._connections = 0
        self._connections_changed = threading.Condition(self._lock)
        self._server = _Server(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._connections

    def wait_open_connections(self, count: int, timeout_s: float = 10) -> bool:
        """Wait until exactly ``count`` connections are open; False if that never happened."""
        with self._connections_changed:
            return self._connections_changed.wait_for(lambda: self._connections == count, timeout_s)

    def _connected(self, change: int) -> None:
        with self._connections_changed:
            self._connections += change
            self._connections_changed.notify_all()

    def reply(self, path: str, *replies: Reply) -> None:
        """Answer ``path`` with these replies in order; the last one repeats."""
        with self._lock:
            self._replies[path] = list(replies)

    def calls(self, path: str | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self.received if path is None or r.path == path]

    def counts(self) -> dict[str, int]:
        """Requests received per path."""
        with self._lock:
            return dict(collections.Counter(r.path for r in self.received))

    def last(self) -> Recorded:
        with self._lock:
            return self.received[-1]

    def _record(self, recorded: Recorded) -> Reply:
        with self._lock:
            self.received.append(recorded)
            queue = self._replies.get(recorded.path)
            if queue:
                return queue.pop(0) if len(queue) > 1 else queue[0]
        if self._default is not None:
            return self._default
        echo = {"method": recorded.method, "path": recorded.path, "query": recorded.query}
        return Reply(body=json.dumps(echo).encode())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    """A stub upstream process answering every path alike: ``--port``, ``--delay`` seconds
    before each answer, ``--body-file`` (its bytes, as JSON), ``--cache-control`` and
    ``--counts-path``; it runs until it is terminated."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--cache-control", default="no-store")
    parser.add_argument("--counts-path")
    args = parser.parse_args()
    with open(args.body_file, "rb") as handle:
        body = handle.read()
    headers = (("content-type", "application/json"), ("cache-control", args.cache_control))
    StubUpstream(
        args.port,
        default=Reply(body=body, headers=headers, delay_s=args.delay),
        counts_path=args.counts_path,
    )
    threading.Event().wait()


if __name__ == "__main__":
    main()
