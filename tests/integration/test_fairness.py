"""One client's stream of requests that need no I/O (401s for a missing key, health checks)
must not starve the other clients of the same worker (gevent switches only where a greenlet
waits)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

from tests.support.gateway import Gateway

pytestmark = pytest.mark.integration

PIPELINED = 3000  # requests one client sends in a single write


def _read_responses(sock: socket.socket, count: int, done: list[float]) -> None:
    """Read until ``count`` HTTP responses came back (counting their status lines)."""
    marker = b"HTTP/1.1 "
    seen, tail = 0, b""
    while seen < count:
        data = sock.recv(65536)
        if not data:
            return
        chunk = tail + data
        seen += chunk.count(marker)
        tail = chunk[-(len(marker) - 1) :]  # a status line split between two reads
    done.append(time.monotonic())


def test_a_pipelining_client_does_not_starve_another(
    start_gateway: Callable[..., Gateway],
) -> None:
    gateway = start_gateway(workers=1, with_key=False)  # one worker: both clients share it
    flood = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
    other = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
    try:
        request = b"GET /api/v1/things HTTP/1.1\r\nHost: gw\r\n\r\n"  # no key: 401, no I/O
        flood_done: list[float] = []
        reader = threading.Thread(target=_read_responses, args=(flood, PIPELINED, flood_done))
        reader.start()
        started = time.monotonic()
        flood.sendall(request * PIPELINED)
        time.sleep(0.02)  # the worker is busy with the stream
        other.sendall(b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
        answer = other.recv(65536)
        other_done = time.monotonic()
        reader.join(timeout=60)
        assert answer.startswith(b"HTTP/1.1 200")
        assert flood_done, "the pipelined responses did not all come back"
        # Served in turn, the other client waits for a few of the stream's requests, not for
        # the rest of the stream.
        assert other_done - started < (flood_done[0] - started) / 2
    finally:
        flood.close()
        other.close()
