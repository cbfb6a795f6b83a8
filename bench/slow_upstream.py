"""A slow upstream for the stampede scenario: a threaded HTTP server on 127.0.0.1 that answers
every GET after a fixed delay with the benchmark's JSON document and ``Cache-Control:
max-age=60``, and counts the requests it got per path. ``GET /__counts`` answers at once with
those counts as JSON (``{"/cacheable/x": 1}``) and is not counted.

``python -m bench.slow_upstream --port PORT [--delay SECONDS]``; stopped by SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench.harness import COUNTS_PATH
from bench.payload import PAYLOAD


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a stampede connects all at once


def serve(port: int, delay_s: float) -> None:
    body = PAYLOAD.encode()
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _reply(self, payload: bytes, cache_control: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", cache_control)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            if path == COUNTS_PATH:
                with lock:
                    snapshot = dict(counts)
                self._reply(json.dumps(snapshot).encode(), "no-store")
                return
            with lock:
                counts[path] += 1
            time.sleep(delay_s)
            self._reply(body, "max-age=60")

    with _Server(("127.0.0.1", port), Handler) as server:
        server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.3, help="seconds before each answer")
    args = parser.parse_args()
    serve(args.port, args.delay)


if __name__ == "__main__":
    main()
