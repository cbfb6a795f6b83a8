"""Bodies of any size through the real server (``python -m proxy_app`` under gunicorn + gevent):
streamed byte-exact in bounded memory, stored only up to the store limit, cut when they outgrow
PROXY_RESPONSE_LIMIT, and let go of when the client leaves."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from proxy_app.cache.policy import MAX_STORED_BODY_BYTES
from tests.support.app import ADMIN_TOKEN, UPSTREAM_KEY
from tests.support.gateway import Gateway
from tests.support.stub_upstream import Reply, StubUpstream, generated_digest

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]
MIB = 1024 * 1024
NO_STORE = (("content-type", "application/octet-stream"), ("cache-control", "no-store"))


def upstream_env(stub: StubUpstream, **extra: str) -> dict[str, str]:
    return {
        "HTTP_CLIENT_BASE_URL": f"{stub.url}/v4",
        "HTTP_CLIENT_API_KEY": UPSTREAM_KEY,
        "HTTP_CLIENT_RETRIES": "0",
        **extra,
    }


def open_get(
    gateway: Gateway, path: str, **headers: str
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    connection.request("GET", path, headers=gateway.key_headers(headers))
    return connection, connection.getresponse()


def read_digest(response: http.client.HTTPResponse) -> tuple[str, int]:
    """The body's sha256 and length, read a piece at a time (never held whole)."""
    digest = hashlib.sha256()
    size = 0
    while piece := response.read(MIB):
        digest.update(piece)
        size += len(piece)
    return digest.hexdigest(), size


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def gateway_pids(gateway: Gateway) -> list[int]:
    """The gunicorn master and its workers."""
    assert gateway.process is not None
    master = gateway.process.pid
    pids = [master]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == master:
            pids.append(int(entry))
    return pids


def test_a_large_no_store_body_streams_byte_exact_in_bounded_memory(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    size = 128 * MIB
    stub.reply("/v4/warm", Reply(generated_bytes=4 * MIB, headers=NO_STORE))
    stub.reply("/v4/huge", Reply(generated_bytes=size, headers=NO_STORE))
    gateway = start_gateway(upstream_env(stub))
    connection, warm = open_get(gateway, "/api/v1/warm")  # the streaming path, once
    assert read_digest(warm) == (generated_digest(4 * MIB), 4 * MIB)
    connection.close()
    pids = gateway_pids(gateway)
    assert len(pids) == 2
    before = {pid: _status_kib(pid, "VmRSS") for pid in pids}

    connection, response = open_get(gateway, "/api/v1/huge")
    try:
        assert response.status == 200
        assert response.getheader("content-length") == str(size)
        assert response.getheader("x-cache") == "BYPASS"
        assert read_digest(response) == (generated_digest(size), size)
    finally:
        connection.close()

    # The high-water mark covers every moment of the transfer, not just its end.
    growth_kib = sum(max(0, _status_kib(pid, "VmHWM") - before[pid]) for pid in pids)
    assert growth_kib * 1024 < size / 8, f"the gateway grew by {growth_kib} KiB"


def test_a_cacheable_body_is_stored_up_to_the_store_limit_and_passed_on_beyond_it(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    cacheable = (("cache-control", "max-age=60"),)
    stub.reply("/v4/fits", Reply(generated_bytes=MAX_STORED_BODY_BYTES, headers=cacheable))
    stub.reply("/v4/over", Reply(generated_bytes=MAX_STORED_BODY_BYTES + 1, headers=cacheable))
    gateway = start_gateway(upstream_env(stub))

    outcomes = []
    for path, size in (("/api/v1/fits", MAX_STORED_BODY_BYTES),) * 2 + (
        ("/api/v1/over", MAX_STORED_BODY_BYTES + 1),
    ) * 2:
        connection, response = open_get(gateway, path)
        try:
            assert read_digest(response) == (generated_digest(size), size)
            outcomes.append(response.getheader("x-cache"))
        finally:
            connection.close()

    assert outcomes == ["MISS", "HIT", "BYPASS", "BYPASS"]
    assert (len(stub.calls("/v4/fits")), len(stub.calls("/v4/over"))) == (1, 2)


def test_an_answer_over_the_response_limit_by_its_length_gets_a_502(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/v4/big", Reply(generated_bytes=2 * MIB + 1, headers=NO_STORE))
    stub.reply("/v4/fits", Reply(generated_bytes=2 * MIB, headers=NO_STORE))
    gateway = start_gateway(upstream_env(stub, PROXY_RESPONSE_LIMIT=str(2 * MIB)))

    refused = gateway.get("/api/v1/big")
    assert refused.status_code == 502
    assert refused.json()["error"] == "upstream_response_too_large"
    assert refused.json()["message"]
    assert UPSTREAM_KEY not in refused.text
    assert len(gateway.get("/api/v1/fits").content) == 2 * MIB
    assert 'proxy_upstream_errors_total{kind="response_too_large"} 1.0' in metrics(gateway)


def test_a_chunked_answer_outgrowing_the_response_limit_is_cut_short(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/v4/feed", Reply(generated_bytes=8 * MIB, chunked=True, headers=NO_STORE))
    gateway = start_gateway(upstream_env(stub, PROXY_RESPONSE_LIMIT=str(2 * MIB)))

    connection, response = open_get(gateway, "/api/v1/feed", **{"x-request-id": "cut-1"})
    try:
        assert response.status == 200  # on its way before its size was known
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            read_digest(response)
    finally:
        connection.close()

    assert gateway.get("/health/live").status_code == 200
    assert 'proxy_upstream_errors_total{kind="response_too_large"} 1.0' in metrics(gateway)
    warnings = [r for r in gateway.log_records() if r["level"] == "warning"]
    assert any(
        "PROXY_RESPONSE_LIMIT" in r["msg"] and r.get("request_id") == "cut-1" for r in warnings
    )
    assert not [r for r in gateway.log_records() if r["level"] == "error"]  # said once, above


def test_a_client_leaving_mid_body_releases_the_upstream_connection(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/v4/huge", Reply(generated_bytes=512 * MIB, headers=NO_STORE))
    stub.reply("/v4/small", Reply(body=b'{"ok": 1}'))
    gateway = start_gateway(upstream_env(stub))

    connection, response = open_get(gateway, "/api/v1/huge")
    assert len(response.read(MIB)) == MIB
    assert stub.open_connections == 1
    assert connection.sock is not None
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()

    assert stub.wait_open_connections(0), "the upstream connection was kept open"
    answer = gateway.get("/api/v1/small")
    assert (answer.status_code, answer.content) == (200, b'{"ok": 1}')


def test_cache_hits_keep_answering_while_a_large_body_streams(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    size = 1024 * MIB
    stub.reply("/v4/huge", Reply(generated_bytes=size, headers=NO_STORE))
    stub.reply("/v4/hit", Reply(body=b'{"hit": 1}', headers=(("cache-control", "max-age=600"),)))
    gateway = start_gateway(upstream_env(stub), workers=1)  # one worker: both share it
    session = requests.Session()
    session.headers.update(gateway.key_headers())
    assert session.get(f"{gateway.url}/api/v1/hit", timeout=10).headers["x-cache"] == "MISS"

    connection, response = open_get(gateway, "/api/v1/huge")
    streamed = [len(response.read(MIB))]
    hits: list[str] = []

    def ask_for_hits() -> None:
        for _ in range(20):
            hits.append(session.get(f"{gateway.url}/api/v1/hit", timeout=30).headers["x-cache"])

    asker = threading.Thread(target=ask_for_hits)
    asker.start()
    try:
        while asker.is_alive():  # the stream is read as fast as it comes meanwhile
            piece = response.read(MIB)
            if not piece:
                break
            streamed.append(len(piece))
        asker.join(timeout=60)
        assert hits == ["HIT"] * 20
        # Taking turns, the hits are answered within the first part of the stream; a send loop
        # that never yields answers them only when the upstream happens to make it wait (here
        # most of the way through, or never).
        assert sum(streamed) < size / 2, f"the hits waited for {sum(streamed) // MIB} MiB"
    finally:
        connection.close()


def metrics(gateway: Gateway) -> str:
    return requests.get(
        f"{gateway.url}/internal/metrics",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    ).text
