"""Shutdown that neither drops nor waits: idle keep-alive connections are closed at once,
requests in flight are answered, a drain keeps serving while the ingress catches up, and
SIGINT skips the drain."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.support.gateway import Gateway
from tests.support.net import wait_until
from tests.support.raw_http import RawConnection, RawResponse, request_bytes
from tests.support.stub_upstream import Reply, StubUpstream

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]

IDLE_CONNECTIONS = 40
IN_FLIGHT = 10
GRACEFUL_TIMEOUT_S = 30


@pytest.fixture
def idle_connections() -> Iterator[Callable[[Gateway, int], list[RawConnection]]]:
    """Connections that served one request each and now wait, kept alive."""
    opened: list[RawConnection] = []

    def open_idle(gateway: Gateway, count: int) -> list[RawConnection]:
        connections = []
        for _ in range(count):
            connection = RawConnection(gateway.port)
            opened.append(connection)
            connection.send(request_bytes("GET", "/health/live"))
            assert connection.read_response().status == 200
            connections.append(connection)
        return connections

    yield open_idle
    for connection in opened:
        connection.close()


IdleConnections = Callable[[Gateway, int], list[RawConnection]]


def _signal(gateway: Gateway, signum: int) -> float:
    assert gateway.process is not None
    gateway.process.send_signal(signum)
    return time.monotonic()


def test_sigterm_answers_requests_in_flight_closes_idle_connections_and_exits_at_once(
    start_gateway: StartGateway, stub: StubUpstream, idle_connections: IdleConnections
) -> None:
    stub.reply("/slow", Reply(delay_s=2.0, body=b'{"slow": true}'))
    gateway = start_gateway(
        {"HTTP_CLIENT_BASE_URL": stub.url, "GRACEFUL_TIMEOUT": str(GRACEFUL_TIMEOUT_S)},
        workers=2,
    )
    api_key = gateway.api_key
    assert api_key is not None
    idle = idle_connections(gateway, IDLE_CONNECTIONS)
    answers: list[RawResponse | Exception] = []

    def in_flight(number: int) -> None:
        connection = RawConnection(gateway.port, timeout_s=20)
        try:
            # One URL each: requests for the same URL would share one upstream call.
            target = f"/api/v1/slow?n={number}"
            connection.send(request_bytes("GET", target, {"x-api-key": api_key}))
            answers.append(connection.read_response())
        except Exception as exc:
            answers.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=in_flight, args=(n,)) for n in range(IN_FLIGHT)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(stub.calls("/slow")) == IN_FLIGHT, 10, "the requests to be in flight")
    signalled = time.monotonic()
    assert gateway.terminate(timeout_s=GRACEFUL_TIMEOUT_S) == 0
    # Far sooner than the graceful timeout: nothing waited for the idle connections.
    assert time.monotonic() - signalled < GRACEFUL_TIMEOUT_S / 2
    for thread in threads:
        thread.join(timeout=10)
    assert len(answers) == IN_FLIGHT
    for answer in answers:
        assert isinstance(answer, RawResponse), answer
        assert answer.status == 200
        assert answer.body == b'{"slow": true}'
        assert answer.header("connection") == "close"
    assert all(connection.closed_by_server() for connection in idle)
    assert "Traceback" not in gateway.output()


def test_a_drain_keeps_serving_with_readiness_503_then_stops(
    start_gateway: StartGateway, stub: StubUpstream, idle_connections: IdleConnections
) -> None:
    drain_s = 3
    gateway = start_gateway(
        {"HTTP_CLIENT_BASE_URL": stub.url, "SHUTDOWN_DRAIN_SECONDS": str(drain_s)}
    )
    kept = idle_connections(gateway, 1)[0]
    signalled = _signal(gateway, signal.SIGTERM)
    wait_until(
        lambda: "still serving while the ingress notices" in gateway.output(),
        5,
        "the worker to have the signal",
    )
    kept.send(request_bytes("GET", "/health/ready"))
    readiness = kept.read_response()
    assert readiness.status == 503
    assert json.loads(readiness.body)["status"] == "shutting_down"
    served = 0
    while time.monotonic() - signalled < drain_s - 1:
        # New connections are still accepted and served as usual.
        assert gateway.get("/api/v1/during-drain", timeout=5).status_code == 200
        kept.send(request_bytes("GET", "/health/live"))
        assert kept.read_response().status == 200
        served += 1
        time.sleep(0.1)
    assert served > 5
    assert gateway.wait_exit(timeout_s=GRACEFUL_TIMEOUT_S) == 0
    assert time.monotonic() - signalled >= drain_s
    assert kept.closed_by_server()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{gateway.url}/health/live", timeout=2)


def test_sigint_skips_the_drain(
    start_gateway: StartGateway, idle_connections: IdleConnections
) -> None:
    gateway = start_gateway({"SHUTDOWN_DRAIN_SECONDS": "120"}, with_key=False)
    idle = idle_connections(gateway, 3)
    signalled = _signal(gateway, signal.SIGINT)
    assert gateway.wait_exit(timeout_s=60) == 0
    assert time.monotonic() - signalled < 30
    assert all(connection.closed_by_server() for connection in idle)
