"""The shared pipelined Redis connection, against a real redis-server."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import redis

from proxy_app import redis_pipeline
from proxy_app.redis import RedisService, RedisUnavailable
from proxy_app.redis_pipeline import PipelinedConnection, PipelineError, PipelineTimeout
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis

# Keeps Redis busy for a few hundred milliseconds.
SPIN = "local n = 0 for i = 1, 30000000 do n = n + i end return 'done'"


@pytest.fixture
def connection(redis_url: str) -> Iterator[PipelinedConnection]:
    pipelined = PipelinedConnection(redis_url, timeout_s=2)
    yield pipelined
    pipelined.close()


def test_concurrent_commands_each_get_their_own_reply(connection: PipelinedConnection) -> None:
    failures: list[str] = []

    def worker(n: int) -> None:
        for i in range(50):
            connection.execute("SET", f"k{n}:{i}", f"v{n}:{i}")
            got = connection.execute("GET", f"k{n}:{i}")
            if got != f"v{n}:{i}".encode():
                failures.append(f"{n}:{i} got {got!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert failures == []


def test_a_late_reply_does_not_shift_the_replies_after_it(
    connection: PipelinedConnection, redis_url: str
) -> None:
    slow = PipelinedConnection(redis_url, timeout_s=2)
    try:
        slow.execute("SET", "late", "1")
        slow.timeout_s = 0.05
        with pytest.raises(PipelineTimeout):
            slow.execute("EVAL", SPIN, 0)
        # Wait until Redis has finished the script (a plain client blocks meanwhile).
        with redis.Redis.from_url(redis_url, socket_timeout=10) as plain:
            assert plain.ping()
        # The script's late reply went to the abandoned caller, not to this one.
        slow.timeout_s = 2
        assert slow.execute("GET", "late") == b"1"
    finally:
        slow.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux only")
def test_a_peer_that_stops_acknowledging_is_cut_off_by_the_kernel(
    connection: PipelinedConnection,
) -> None:
    """A Redis gone without closing its end never acknowledges the commands written to it: the
    kernel drops such a connection after UNACKNOWLEDGED_LIMIT_MS, so the next command opens a
    new one instead of timing out on the dead socket again and again."""
    assert connection.execute("PING") == b"PONG"
    link = connection._link
    assert link is not None
    limit = link.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    assert limit == redis_pipeline.UNACKNOWLEDGED_LIMIT_MS
    assert 0 < redis_pipeline.UNACKNOWLEDGED_LIMIT_MS <= 2000


def test_the_database_in_the_url_is_selected(redis_server: RedisServer) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/3"
    pipelined = PipelinedConnection(url, timeout_s=2)
    try:
        pipelined.execute("SET", "in-db-3", "yes")
        with (
            redis.Redis(port=redis_server.port, db=3) as db3,
            redis.Redis(port=redis_server.port, db=0) as db0,
        ):
            assert db3.get("in-db-3") == b"yes"
            assert db0.get("in-db-3") is None
    finally:
        pipelined.close()


def test_a_restarted_redis_fails_pending_work_then_reconnects(
    connection: PipelinedConnection, redis_server: RedisServer
) -> None:
    import time

    assert connection.execute("PING") == b"PONG"
    outcome: list[BaseException | bytes] = []

    def pending() -> None:
        try:
            outcome.append(connection.execute("EVAL", SPIN, 0))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=pending)
    thread.start()
    time.sleep(0.05)  # the script is running
    redis_server.stop()  # SIGKILL: its reply never comes
    thread.join(timeout=10)
    # The command failed when the connection went, not when its time ran out.
    assert len(outcome) == 1
    assert isinstance(outcome[0], PipelineError)
    assert not isinstance(outcome[0], PipelineTimeout)
    redis_server.start()
    assert connection.execute("PING") == b"PONG"  # a new socket to the new server


def test_an_idle_connection_notices_a_restart_before_the_next_command(
    connection: PipelinedConnection, redis_server: RedisServer
) -> None:
    assert connection.execute("PING") == b"PONG"
    redis_server.stop()
    redis_server.start()
    assert connection.execute("PING") == b"PONG"


def test_scripts_are_loaded_when_redis_does_not_know_them(redis_url: str) -> None:
    service = RedisService(redis_url, timeout_ms=1000)
    try:
        script = service.script(__file__, "echo_key.lua")
        service.client.script_flush()
        assert service.run_script(script, ["k"], ["v"]) == b"vk"
        assert service.run_script(script, ["k2"], ["w"]) == b"wk2"
    finally:
        service.close()


def test_service_reports_unavailable_when_nothing_listens() -> None:
    from tests.support.net import free_port

    service = RedisService(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=100)
    try:
        with pytest.raises(RedisUnavailable):
            service.get("x")
        with pytest.raises(RedisUnavailable):  # short-circuited now, without a connect
            service.get("x")
    finally:
        service.close()


def test_replies_of_a_broken_socket_never_reach_later_commands(redis_url: str) -> None:
    pipelined = PipelinedConnection(redis_url, timeout_s=2)
    try:
        pipelined.execute("SET", "a", "A")
        pipelined.execute("SET", "b", "B")
        pipelined.timeout_s = 0.05
        with pytest.raises(PipelineTimeout):
            pipelined.execute("EVAL", SPIN, 0)  # still pending when the socket breaks
        link = pipelined._link
        assert link is not None
        link.sock.shutdown(socket.SHUT_WR)
        with pytest.raises(PipelineError):
            pipelined.execute("GET", "a")
        with redis.Redis.from_url(redis_url, socket_timeout=10) as plain:
            assert plain.ping()  # the script has finished
        pipelined.timeout_s = 2
        assert [pipelined.execute("GET", k) for k in ("b", "a", "b")] == [b"B", b"A", b"B"]
    finally:
        pipelined.close()


def test_a_non_redis_peer_fails_commands_instead_of_wedging_the_connection() -> None:
    import socketserver
    import threading

    class Garbage(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(1024)
            self.request.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    server = socketserver.TCPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pipelined = PipelinedConnection(f"redis://127.0.0.1:{server.server_address[1]}/0", 1)
    try:
        for _ in range(3):  # each attempt fails fast and the next one tries afresh
            with pytest.raises(PipelineError):
                pipelined.execute("PING")
    finally:
        pipelined.close()
        server.shutdown()
        server.server_close()


def test_a_hanging_connect_holds_nobody_longer_than_the_timeout(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    pipelined = PipelinedConnection(redis_url, timeout_s=0.2)

    def hanging_connect() -> socket.socket:
        time.sleep(0.2)
        raise PipelineError("connecting to Redis failed: timed out")

    monkeypatch.setattr(pipelined, "_open_socket", hanging_connect)
    took: list[float] = []

    def attempt() -> None:
        started = time.monotonic()
        with pytest.raises(PipelineError):
            pipelined.execute("PING")
        took.append(time.monotonic() - started)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(took) == 8
    # Queued one behind another, the last would wait 8 x 0.2 s.
    assert max(took) < 1.2


def test_a_silent_server_fails_each_command_after_its_timeout() -> None:
    import socketserver
    import time

    class Silent(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while self.request.recv(1024):
                pass  # reads every command, answers none

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Silent)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pipelined = PipelinedConnection(f"redis://127.0.0.1:{server.server_address[1]}/0", 0.1)
    try:
        for _ in range(2):  # the first on a new socket, the second behind the first's late reply
            started = time.monotonic()
            with pytest.raises(PipelineTimeout):
                pipelined.execute("PING")
            took = time.monotonic() - started
            assert 0.1 <= took < 2  # its own time limit, not the socket's nor forever
    finally:
        pipelined.close()
        server.shutdown()
        server.server_close()
