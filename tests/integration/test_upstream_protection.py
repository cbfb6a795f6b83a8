"""Sparing the upstream, through the real server, a real redis-server and real upstream stubs:
a slow one, one that refuses connections, one that answers 429."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

import pytest
import requests

from tests.support.app import ADMIN_TOKEN
from tests.support.concurrency import in_parallel
from tests.support.gateway import Gateway
from tests.support.net import free_port, wait_until
from tests.support.stub_upstream import Reply, StubUpstream

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]
JSON = ("content-type", "application/json")
NO_STORE = Reply(headers=(JSON, ("cache-control", "no-store")), delay_s=1.0)
# Fresh for a second, then usable only when the upstream fails (CACHE_STALE_TTL=0).
STALE_ON_ERROR = Reply(
    body=b'{"v": "stored"}', headers=(JSON, ("cache-control", "max-age=1, stale-if-error=60"))
)


def gateway_for(start: StartGateway, base_url: str, **env: str) -> Gateway:
    return start({"HTTP_CLIENT_BASE_URL": base_url, "HTTP_CLIENT_RETRIES": "0", **env})


def metric(gateway: Gateway, name: str, labels: str = "") -> float:
    text = requests.get(
        f"{gateway.url}/internal/metrics",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    ).text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def timed_get(gateway: Gateway, path: str) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = gateway.get(path)
    return response, time.monotonic() - started


def occupy(gateway: Gateway, stub: StubUpstream, path: str) -> threading.Thread:
    """A request that holds an upstream slot (the stub answers ``path`` slowly) until it ends."""
    holder = threading.Thread(target=gateway.get, args=(f"/api/v1{path}",))
    holder.start()
    wait_until(lambda: len(stub.calls(path)) == 1, 10, "the slow request upstream")
    return holder


def test_requests_beyond_the_concurrency_get_503_upstream_busy_after_the_queue_timeout(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/slow", NO_STORE)
    gateway = gateway_for(
        start_gateway, stub.url, UPSTREAM_MAX_CONCURRENCY="2", UPSTREAM_QUEUE_TIMEOUT_MS="100"
    )
    # Each for a URL of its own: requests for one URL would wait for one load.
    answers = in_parallel(
        [lambda n=n: timed_get(gateway, f"/api/v1/slow?n={n}") for n in range(6)]  # type: ignore[misc]
    )
    ok = [(r, s) for r, s in answers if r.status_code == 200]
    busy = [(r, s) for r, s in answers if r.status_code == 503]
    assert len(ok) == 2
    assert len(busy) == 4
    for response, seconds in busy:
        assert response.json()["error"] == "upstream_busy"
        assert response.headers["retry-after"] == "1"
        assert seconds < 0.9  # the queue timeout, not the upstream's second
    assert len(stub.calls("/slow")) == 2
    assert metric(gateway, "proxy_upstream_rejections_total", '{reason="concurrency"}') == 4


def test_a_request_with_a_stale_entry_is_answered_stale_when_the_upstream_is_busy(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/slow", NO_STORE)
    stub.reply("/s", STALE_ON_ERROR)
    gateway = gateway_for(
        start_gateway,
        stub.url,
        UPSTREAM_MAX_CONCURRENCY="1",
        UPSTREAM_QUEUE_TIMEOUT_MS="50",
        CACHE_STALE_TTL="0",
    )
    assert gateway.get("/api/v1/s").headers["x-cache"] == "MISS"
    time.sleep(1.1)
    holder = occupy(gateway, stub, "/slow")
    stale = gateway.get("/api/v1/s")
    holder.join()
    assert stale.status_code == 200
    assert stale.headers["x-cache"] == "STALE"
    assert stale.content == b'{"v": "stored"}'
    assert len(stub.calls("/s")) == 1
    missing = gateway.get("/api/v1/never-stored")
    assert missing.status_code == 200  # the slot is free again


def test_a_background_refresh_is_skipped_not_queued_when_no_slot_is_free(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/slow", NO_STORE)
    stub.reply("/s", Reply(headers=(JSON, ("cache-control", "max-age=1"))))
    gateway = gateway_for(
        start_gateway, stub.url, UPSTREAM_MAX_CONCURRENCY="1", UPSTREAM_QUEUE_TIMEOUT_MS="5000"
    )
    gateway.get("/api/v1/s")
    time.sleep(1.1)  # stale now, within CACHE_STALE_TTL: served at once, refreshed behind
    holder = occupy(gateway, stub, "/slow")
    stale, seconds = timed_get(gateway, "/api/v1/s")
    time.sleep(0.2)  # the refresh would have been sent by now
    calls_meanwhile = len(stub.calls("/s"))
    holder.join()
    time.sleep(0.3)
    assert (stale.status_code, stale.headers["x-cache"]) == (200, "STALE")
    assert seconds < 0.5
    assert calls_meanwhile == 1
    assert len(stub.calls("/s")) == 1  # skipped, not sent once the slot came free
    assert metric(gateway, "proxy_upstream_rejections_total", '{reason="refresh_skipped"}') == 1


def test_an_upstream_429_is_served_from_a_stale_entry(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    limited = Reply(status=429, body=b'{"e": "slow down"}', headers=(JSON, ("retry-after", "30")))
    stub.reply("/s", STALE_ON_ERROR, limited)
    gateway = gateway_for(start_gateway, stub.url, CACHE_STALE_TTL="0")
    gateway.get("/api/v1/s")
    time.sleep(1.1)
    stale = gateway.get("/api/v1/s")
    assert stale.status_code == 200
    assert stale.headers["x-cache"] == "STALE"
    assert stale.content == b'{"v": "stored"}'
    assert len(stub.calls("/s")) == 2
    # Without a stored entry the client gets the upstream's own answer.
    stub.reply("/fresh", limited)
    answer = gateway.get("/api/v1/fresh")
    assert answer.status_code == 429
    assert answer.content == b'{"e": "slow down"}'


def test_after_an_upstream_429_with_retry_after_the_gateway_pauses_requests_to_it(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/limited", Reply(status=429, headers=(JSON, ("retry-after", "2"))))
    gateway = gateway_for(start_gateway, stub.url, UPSTREAM_RETRY_AFTER_MAX_SECONDS="5")
    assert gateway.get("/api/v1/limited").status_code == 429
    paused = gateway.get("/api/v1/other")
    assert paused.status_code == 503
    assert paused.json()["error"] == "upstream_busy"
    assert paused.json()["reason"] == "retry_after"
    assert paused.headers["retry-after"] in ("1", "2")
    assert stub.calls("/other") == []
    health = requests.get(f"{gateway.url}/health", timeout=5).json()
    assert health["upstream"]["retryAfterSeconds"] in (1, 2)
    time.sleep(2.1)
    assert gateway.get("/api/v1/other").status_code == 200
    assert len(stub.calls("/other")) == 1
    assert metric(gateway, "proxy_upstream_rejections_total", '{reason="retry_after"}') == 1


@pytest.mark.parametrize(("pause_s", "calls", "status"), [("5", 1, 503), ("0", 2, 200)])
def test_a_503_with_retry_after_is_not_retried_while_pauses_are_honoured(
    start_gateway: StartGateway, stub: StubUpstream, pause_s: str, calls: int, status: int
) -> None:
    unavailable = Reply(status=503, headers=(JSON, ("retry-after", "1")))
    stub.reply("/p", unavailable, Reply(headers=(JSON, ("cache-control", "no-store"))))
    gateway = gateway_for(
        start_gateway, stub.url, HTTP_CLIENT_RETRIES="2", UPSTREAM_RETRY_AFTER_MAX_SECONDS=pause_s
    )
    answer = gateway.get("/api/v1/p")
    assert answer.status_code == status
    assert len(stub.calls("/p")) == calls


def test_retry_after_pauses_nothing_by_default(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/limited", Reply(status=429, headers=(JSON, ("retry-after", "30"))))
    gateway = gateway_for(start_gateway, stub.url)
    assert gateway.get("/api/v1/limited").status_code == 429
    assert gateway.get("/api/v1/other").status_code == 200


def test_the_breaker_opens_on_a_refusing_upstream_and_fails_fast(
    start_gateway: StartGateway,
) -> None:
    refusing = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    gateway = gateway_for(
        start_gateway,
        refusing,
        UPSTREAM_BREAKER_FAILURES="2",
        UPSTREAM_BREAKER_COOLDOWN_SECONDS="1",
    )
    health = requests.get(f"{gateway.url}/health", timeout=5).json()
    assert health["upstream"]["breaker"] == "closed"
    errors = [gateway.get(f"/api/v1/n{number}").json()["error"] for number in range(2)]
    assert errors == ["upstream_connection_error"] * 2
    refused = gateway.get("/api/v1/n3")
    assert refused.status_code == 502
    assert refused.json()["error"] == "upstream_unavailable"
    assert refused.headers["retry-after"] == "1"
    health = requests.get(f"{gateway.url}/health", timeout=5).json()
    assert health["upstream"]["breaker"] == "open"
    time.sleep(1.1)
    # One trial goes, fails, and opens the breaker for another cool-down.
    assert gateway.get("/api/v1/n4").json()["error"] == "upstream_connection_error"
    assert gateway.get("/api/v1/n5").json()["error"] == "upstream_unavailable"
    assert metric(gateway, "proxy_upstream_breaker_state") == 2
    assert metric(gateway, "proxy_upstream_breaker_opened_total") == 2


def test_the_breaker_opens_on_timeouts_and_a_trial_closes_it_when_the_upstream_recovers(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/t", Reply(delay_s=0.6))
    stub.reply("/s", STALE_ON_ERROR)
    gateway = gateway_for(
        start_gateway,
        stub.url,
        HTTP_CLIENT_TIMEOUT="200",
        UPSTREAM_BREAKER_FAILURES="2",
        UPSTREAM_BREAKER_COOLDOWN_SECONDS="2",
        CACHE_STALE_TTL="0",
    )
    gateway.get("/api/v1/s")
    time.sleep(1.1)
    timeouts = [gateway.get("/api/v1/t").json()["error"] for _ in range(2)]
    assert timeouts == ["upstream_timeout"] * 2
    assert gateway.get("/api/v1/t").json()["error"] == "upstream_unavailable"
    stale = gateway.get("/api/v1/s")  # open breaker, but a stored answer may stand in
    assert (stale.status_code, stale.headers["x-cache"]) == (200, "STALE")
    assert len(stub.calls("/t")) == 2
    assert len(stub.calls("/s")) == 1
    stub.reply("/t", Reply())
    time.sleep(2.1)
    assert gateway.get("/api/v1/t").status_code == 200
    assert requests.get(f"{gateway.url}/health", timeout=5).json()["upstream"]["breaker"] == (
        "closed"
    )
    assert metric(gateway, "proxy_upstream_breaker_state") == 0


def test_the_upstream_rate_limit_holds_across_replicas(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    gateways = [gateway_for(start_gateway, stub.url, UPSTREAM_RATE_LIMIT="1") for _ in range(2)]
    answers = in_parallel(
        [lambda n=n: gateways[n % 2].get(f"/api/v1/r{n}") for n in range(6)]  # type: ignore[misc]
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] + [503] * 5
    busy = [a for a in answers if a.status_code == 503]
    assert {a.json()["reason"] for a in busy} == {"rate_limit"}
    assert {a.headers["retry-after"] for a in busy} == {"1"}
    assert len(stub.calls()) == 1
    time.sleep(1.1)
    assert gateways[1].get("/api/v1/later").status_code == 200


def test_the_upstream_rate_limit_fails_open_when_its_redis_is_down(
    start_gateway: StartGateway, stub: StubUpstream, redis_url: str
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    gateway = gateway_for(
        start_gateway,
        stub.url,
        UPSTREAM_RATE_LIMIT="1",
        CACHE_REDIS_URL=dead_redis,
        API_KEYS_REDIS_URL=redis_url,
    )
    answers = [gateway.get(f"/api/v1/r{n}") for n in range(3)]
    assert [(a.status_code, a.headers["x-cache"]) for a in answers] == [(200, "BYPASS")] * 3
    assert len(stub.calls()) == 3
    assert metric(gateway, "proxy_upstream_rate_limit_fail_open_total") == 3
