"""A real HTTP server on 127.0.0.1 standing in for the upstream: it records every request it
receives and answers with scripted replies."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    delay_s: float = 0.0


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


class StubUpstream:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies: dict[str, list[Reply]] = {}
        self.received: list[Recorded] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                path, _, query = self.path.partition("?")
                recorded = Recorded(self.command, path, query, tuple(self.headers.items()), body)
                reply = stub._record(recorded)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                self.send_response(reply.status)
                for name, value in reply.headers:
                    self.send_header(name, value)
                if not any(name.lower() == "content-length" for name, _ in reply.headers):
                    self.send_header("content-length", str(len(reply.body)))
                self.end_headers()
                if self.command != "HEAD" and reply.status not in (204, 304):
                    self.wfile.write(reply.body)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reply(self, path: str, *replies: Reply) -> None:
        """Answer ``path`` with these replies in order; the last one repeats."""
        with self._lock:
            self._replies[path] = list(replies)

    def calls(self, path: str | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self.received if path is None or r.path == path]

    def last(self) -> Recorded:
        with self._lock:
            return self.received[-1]

    def _record(self, recorded: Recorded) -> Reply:
        with self._lock:
            self.received.append(recorded)
            queue = self._replies.get(recorded.path)
            if queue:
                return queue.pop(0) if len(queue) > 1 else queue[0]
        echo = {"method": recorded.method, "path": recorded.path, "query": recorded.query}
        return Reply(body=json.dumps(echo).encode())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
