"""The bench's pure helpers: reading nginx's request counter, and judging how long a gateway
kept answering after SIGTERM."""

from __future__ import annotations

import pytest

from bench.harness import parse_stub_status
from bench.scenarios import DRAIN_INTERVAL_S, _served_for

STUB_STATUS = """Active connections: 3
server accepts handled requests
 17 17 4242
Reading: 0 Writing: 1 Waiting: 2
"""


def test_stub_status_requests_figure() -> None:
    assert parse_stub_status(STUB_STATUS) == 4242


def test_stub_status_unexpected_page() -> None:
    with pytest.raises(ValueError, match="stub_status"):
        parse_stub_status("<html>not found</html>")


def test_served_until_the_first_failure() -> None:
    after = [(0.0, "200"), (0.1, "200"), (0.2, "error:ConnectionRefusedError"), (0.3, "200")]
    assert _served_for(after) == (0.2, False)


def test_served_throughout_when_none_failed() -> None:
    after = [(0.0, "200"), (0.1, "200")]
    served, none_failed = _served_for(after)
    assert served == pytest.approx(0.1 + DRAIN_INTERVAL_S)
    assert none_failed


def test_a_503_counts_as_not_served() -> None:
    assert _served_for([(0.0, "503")]) == (0.0, False)


def test_established_sockets_counts_both_ends_of_loopback_connections() -> None:
    import socket

    from bench.scenarios import established_sockets

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert established_sockets(port) == (0, 0)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        accepted = [server.accept()[0] for _ in clients]
        try:
            assert established_sockets(port) == (3, 3)
        finally:
            for sock in [*clients, *accepted]:
                sock.close()
