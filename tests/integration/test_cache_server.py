"""Response caching through the real server, a real redis-server and the stub upstream."""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import formatdate

import pytest
import requests

from tests.support.concurrency import in_parallel
from tests.support.gateway import Gateway
from tests.support.redis_server import RedisServer
from tests.support.stub_upstream import Reply, StubUpstream

pytestmark = pytest.mark.integration

StartGateway = Callable[..., Gateway]
JSON = ("content-type", "application/json")


def cacheable(body: bytes = b'{"v": 1}', *extra: tuple[str, str], max_age: int = 60) -> Reply:
    return Reply(body=body, headers=(JSON, ("cache-control", f"max-age={max_age}"), *extra))


def gateway_for(start: StartGateway, stub: StubUpstream, **env: str) -> Gateway:
    return start({"HTTP_CLIENT_BASE_URL": stub.url, "HTTP_CLIENT_RETRIES": "0", **env})


def test_miss_then_hit_calls_upstream_once_and_serves_identical_bytes(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    body = b'{"items": [1, 2, 3], "name": "Z\xc3\xbcrich"}'
    stub.reply("/things", cacheable(body, ("etag", '"t1"')))
    gateway = gateway_for(start_gateway, stub)
    first = gateway.get("/api/v1/things?page=1")
    second = gateway.get("/api/v1/things?page=1")
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "HIT"
    assert first.content == second.content == body
    for name in ("content-type", "cache-control", "etag", "content-length"):
        assert first.headers[name] == second.headers[name]
    assert int(second.headers["age"]) >= 0
    assert len(stub.calls("/things")) == 1


@pytest.mark.parametrize(
    ("name", "reply", "request_headers"),
    [
        ("no-store", Reply(headers=(JSON, ("cache-control", "no-store"))), {}),
        ("private", Reply(headers=(JSON, ("cache-control", "private, max-age=60"))), {}),
        (
            "set-cookie",
            Reply(headers=(JSON, ("set-cookie", "s=1"), ("cache-control", "max-age=60"))),
            {},
        ),
        ("404", Reply(status=404, headers=(JSON, ("cache-control", "max-age=60"))), {}),
        ("204", Reply(status=204, body=b"", headers=(("cache-control", "max-age=60"),)), {}),
        ("vary-star", Reply(headers=(JSON, ("vary", "*"), ("cache-control", "max-age=60"))), {}),
        ("authorization", cacheable(), {"Authorization": "Bearer someone"}),
    ],
)
def test_uncacheable_responses_and_requests_bypass(
    start_gateway: StartGateway,
    stub: StubUpstream,
    name: str,
    reply: Reply,
    request_headers: dict[str, str],
) -> None:
    stub.reply("/x", reply)
    gateway = gateway_for(start_gateway, stub)
    answers = [gateway.get("/api/v1/x", headers=request_headers) for _ in range(3)]
    assert [a.headers["x-cache"] for a in answers] == ["BYPASS"] * 3, name
    assert "set-cookie" not in answers[0].headers
    assert len(stub.calls("/x")) == 3
    assert answers[0].status_code == reply.status


def test_bypass_paths_and_the_default_ttl(start_gateway: StartGateway, stub: StubUpstream) -> None:
    stub.reply("/auth/token", cacheable())
    stub.reply("/plain", Reply(headers=(JSON,)))  # no freshness information
    gateway = gateway_for(start_gateway, stub, CACHE_BYPASS_PATHS="/api/v1/auth")
    assert [gateway.get("/api/v1/auth/token").headers["x-cache"] for _ in range(2)] == [
        "BYPASS",
        "BYPASS",
    ]
    assert [gateway.get("/api/v1/plain").headers["x-cache"] for _ in range(2)] == ["MISS", "HIT"]


def test_default_ttl_zero_caches_only_what_upstream_allows(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/plain", Reply(headers=(JSON,)))
    stub.reply("/fresh", cacheable())
    gateway = gateway_for(start_gateway, stub, CACHE_TTL_DEFAULT="0")
    assert [gateway.get("/api/v1/plain").headers["x-cache"] for _ in range(2)] == [
        "BYPASS",
        "BYPASS",
    ]
    assert [gateway.get("/api/v1/fresh").headers["x-cache"] for _ in range(2)] == ["MISS", "HIT"]


def test_representation_headers_make_separate_variants(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/doc", cacheable())
    gateway = gateway_for(start_gateway, stub)
    json_first = gateway.get("/api/v1/doc", headers={"Accept": "application/json"})
    xml_first = gateway.get("/api/v1/doc", headers={"Accept": "application/xml"})
    json_again = gateway.get("/api/v1/doc", headers={"Accept": "application/json"})
    assert [json_first.headers["x-cache"], xml_first.headers["x-cache"]] == ["MISS", "MISS"]
    assert json_again.headers["x-cache"] == "HIT"
    assert len(stub.calls("/doc")) == 2


def test_vary_on_a_forwarded_header_is_respected(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/ua", cacheable(b"{}", ("vary", "User-Agent")))
    gateway = gateway_for(start_gateway, stub)
    assert gateway.get("/api/v1/ua", headers={"User-Agent": "a"}).headers["x-cache"] == "MISS"
    assert gateway.get("/api/v1/ua", headers={"User-Agent": "a"}).headers["x-cache"] == "HIT"
    assert gateway.get("/api/v1/ua", headers={"User-Agent": "b"}).headers["x-cache"] == "MISS"
    assert len(stub.calls("/ua")) == 2


def test_stale_is_served_at_once_while_a_slow_refresh_runs(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply(
        "/news",
        Reply(body=b'{"v": 1}', headers=(JSON, ("cache-control", "max-age=1"))),
        Reply(body=b'{"v": 2}', headers=(JSON, ("cache-control", "max-age=60")), delay_s=1.5),
    )
    gateway = gateway_for(start_gateway, stub, CACHE_STALE_TTL="30")
    assert gateway.get("/api/v1/news").headers["x-cache"] == "MISS"
    time.sleep(2.1)  # past max-age (Date has whole seconds)
    started = time.monotonic()
    stale = gateway.get("/api/v1/news")
    assert time.monotonic() - started < 0.5
    assert stale.headers["x-cache"] == "STALE"
    assert stale.content == b'{"v": 1}'
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        fresh = gateway.get("/api/v1/news")
        if fresh.content == b'{"v": 2}':
            break
        time.sleep(0.2)
    assert fresh.headers["x-cache"] == "HIT"
    assert fresh.content == b'{"v": 2}'
    assert len(stub.calls("/news")) == 2


def test_stale_if_error_serves_the_stale_copy_when_upstream_fails(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply(
        "/rates",
        Reply(
            body=b'{"rate": 1}', headers=(JSON, ("cache-control", "max-age=1, stale-if-error=60"))
        ),
        Reply(status=503, body=b"down"),
    )
    gateway = gateway_for(start_gateway, stub, CACHE_STALE_TTL="0")
    assert gateway.get("/api/v1/rates").headers["x-cache"] == "MISS"
    time.sleep(2.1)
    answer = gateway.get("/api/v1/rates")
    assert answer.status_code == 200
    assert answer.headers["x-cache"] == "STALE"
    assert answer.content == b'{"rate": 1}'
    assert len(stub.calls("/rates")) == 2


def test_stale_if_error_also_covers_timeouts(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply(
        "/slowly",
        Reply(body=b'{"ok": 1}', headers=(JSON, ("cache-control", "max-age=1, stale-if-error=60"))),
        Reply(delay_s=2),
    )
    gateway = gateway_for(start_gateway, stub, CACHE_STALE_TTL="0", HTTP_CLIENT_TIMEOUT="300")
    gateway.get("/api/v1/slowly")
    time.sleep(2.1)
    answer = gateway.get("/api/v1/slowly")
    assert (answer.status_code, answer.headers["x-cache"]) == (200, "STALE")


def test_expired_entry_is_revalidated_with_its_etag(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply(
        "/big",
        Reply(
            body=b'{"large": true}',
            headers=(JSON, ("cache-control", "max-age=1, must-revalidate"), ("etag", '"e1"')),
        ),
        Reply(status=304, body=b"", headers=(("cache-control", "max-age=60"), ("etag", '"e1"'))),
    )
    gateway = gateway_for(start_gateway, stub)
    gateway.get("/api/v1/big")
    time.sleep(2.1)
    revalidated = gateway.get("/api/v1/big")
    assert revalidated.headers["x-cache"] == "REVALIDATED"
    assert revalidated.content == b'{"large": true}'
    assert revalidated.headers["cache-control"] == "max-age=60"
    assert stub.calls("/big")[1].header("if-none-match") == '"e1"'
    assert gateway.get("/api/v1/big").headers["x-cache"] == "HIT"


def test_client_conditional_request_gets_304_from_the_cache(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    last_modified = formatdate(time.time() - 3600, usegmt=True)
    stub.reply("/c", cacheable(b'{"c": 1}', ("etag", '"c1"'), ("last-modified", last_modified)))
    gateway = gateway_for(start_gateway, stub)
    gateway.get("/api/v1/c")
    by_etag = gateway.get("/api/v1/c", headers={"If-None-Match": 'W/"c1"'})
    by_date = gateway.get("/api/v1/c", headers={"If-Modified-Since": formatdate(usegmt=True)})
    changed = gateway.get("/api/v1/c", headers={"If-None-Match": '"other"'})
    assert (by_etag.status_code, by_etag.content, by_etag.headers["etag"]) == (304, b"", '"c1"')
    assert by_date.status_code == 304
    assert (changed.status_code, changed.content) == (200, b'{"c": 1}')
    assert len(stub.calls("/c")) == 1
    assert stub.calls("/c")[0].header("if-none-match") is None


def test_successful_write_invalidates_the_cached_variants(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/items/1", cacheable())
    gateway = gateway_for(start_gateway, stub)
    for accept in ("application/json", "text/plain"):
        gateway.get("/api/v1/items/1", headers={"Accept": accept})
    assert (
        gateway.get("/api/v1/items/1", headers={"Accept": "text/plain"}).headers["x-cache"] == "HIT"
    )
    put = gateway.request(
        "PUT", "/api/v1/items/1", data=b'{"v": 2}', headers={"Content-Type": "application/json"}
    )
    assert put.status_code == 200
    for accept in ("application/json", "text/plain"):
        again = gateway.get("/api/v1/items/1", headers={"Accept": accept})
        assert again.headers["x-cache"] == "MISS"


def test_head_is_answered_from_a_cached_get(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/h", cacheable(b'{"h": 1}'))
    gateway = gateway_for(start_gateway, stub)
    gateway.get("/api/v1/h")
    head = gateway.request("HEAD", "/api/v1/h")
    assert head.headers["x-cache"] == "HIT"
    assert head.headers["content-length"] == "8"
    assert len(stub.calls("/h")) == 1


def test_cache_debug_adds_a_key_hash_not_the_key(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply("/secret-path", cacheable())
    gateway = gateway_for(start_gateway, stub, CACHE_DEBUG="true")
    answer = gateway.get("/api/v1/secret-path?token=abc")
    key_hash = answer.headers["x-cache-key-hash"]
    assert len(key_hash) == 16
    assert "secret" not in key_hash
    plain = gateway_for(start_gateway, stub)
    assert "x-cache-key-hash" not in plain.get("/api/v1/secret-path").headers


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_requests_for_a_cold_key_reach_upstream_once(
    start_gateway: StartGateway, stub: StubUpstream, workers: int
) -> None:
    stub.reply(
        "/cold",
        Reply(body=b'{"cold": true}', headers=(JSON, ("cache-control", "max-age=60")), delay_s=0.5),
    )
    gateway = gateway_for(start_gateway, stub, WEB_CONCURRENCY=str(workers))

    def fetch() -> requests.Response:
        # A connection each, so the requests spread over the workers.
        return requests.get(
            f"{gateway.url}/api/v1/cold",
            timeout=15,
            headers=gateway.key_headers({"Connection": "close"}),
        )

    answers = in_parallel([fetch] * 50)
    assert len(answers) == 50
    assert {a.status_code for a in answers} == {200}
    assert {a.content for a in answers} == {b'{"cold": true}'}
    assert len(stub.calls("/cold")) == 1
    outcomes = sorted(a.headers["x-cache"] for a in answers)
    assert outcomes.count("MISS") == 1


def test_cache_redis_outage_means_pass_through_and_caching_resumes_after(
    start_gateway: StartGateway,
    stub: StubUpstream,
    redis_server: RedisServer,
    second_redis_server: RedisServer,
) -> None:
    """With API keys in their own Redis, a cache outage costs only caching."""
    stub.reply("/o", cacheable(b'{"o": 1}'))
    second_redis_server.client().flushall()
    gateway = gateway_for(
        start_gateway, stub, REDIS_TIMEOUT_MS="100", API_KEYS_REDIS_URL=second_redis_server.url
    )
    assert gateway.get("/api/v1/o").headers["x-cache"] == "MISS"
    redis_server.stop()
    try:
        slowest = 0.0
        for _ in range(20):
            started = time.monotonic()
            answer = gateway.get("/api/v1/o")
            slowest = max(slowest, time.monotonic() - started)
            assert (answer.status_code, answer.headers["x-cache"]) == (200, "BYPASS")
            assert answer.content == b'{"o": 1}'
        assert slowest < 0.5
        health = gateway.get("/health").json()
        assert health["status"] == "degraded"
        assert health["redis"] == {"cache": "down", "keys": "up"}
    finally:
        redis_server.start()
    deadline = time.monotonic() + 5
    outcome = ""
    while time.monotonic() < deadline and outcome != "HIT":
        outcome = gateway.get("/api/v1/o").headers["x-cache"]
        time.sleep(0.1)
    assert outcome == "HIT"  # stored again after Redis came back, without a restart
    outage_logs = [r for r in gateway.log_records() if r["msg"] == "redis outage started"]
    assert len(outage_logs) == 1
    assert any(r["msg"] == "redis outage ended" for r in gateway.log_records())


def test_a_keyed_cache_hit_costs_one_redis_round_trip(
    start_gateway: StartGateway, stub: StubUpstream, redis_server: RedisServer
) -> None:
    stub.reply("/one", cacheable())
    gateway = gateway_for(start_gateway, stub)
    assert gateway.get("/api/v1/one").headers["x-cache"] == "MISS"
    session = requests.Session()
    session.headers.update(gateway.key_headers())
    assert session.get(f"{gateway.url}/api/v1/one", timeout=5).headers["x-cache"] == "HIT"
    redis = redis_server.client()
    redis.config_resetstat()
    for _ in range(20):
        assert session.get(f"{gateway.url}/api/v1/one", timeout=5).headers["x-cache"] == "HIT"
    stats = {
        name.removeprefix("cmdstat_"): int(values["calls"])
        for name, values in redis.info("commandstats").items()
    }
    stats.pop("config|resetstat", None)
    stats.pop("info", None)
    # One script call per request; the rest ran inside it (the key record, the clock, the
    # rate-limit state and the cache entry).
    assert stats == {"evalsha": 20, "hmget": 20, "time": 20, "get": 40, "set": 20}


def test_a_304_that_forbids_storing_ends_the_cached_copy(
    start_gateway: StartGateway, stub: StubUpstream
) -> None:
    stub.reply(
        "/turned-private",
        Reply(
            body=b'{"p": 1}',
            headers=(JSON, ("cache-control", "max-age=1, must-revalidate"), ("etag", '"p1"')),
        ),
        Reply(status=304, body=b"", headers=(("cache-control", "no-store"), ("etag", '"p1"'))),
    )
    gateway = gateway_for(start_gateway, stub)
    gateway.get("/api/v1/turned-private")
    time.sleep(2.1)
    answers = [gateway.get("/api/v1/turned-private") for _ in range(2)]
    assert [(a.status_code, a.headers["x-cache"]) for a in answers] == [(200, "BYPASS")] * 2
    assert answers[0].content == b'{"p": 1}'
    assert len(stub.calls("/turned-private")) == 3
