"""Redis behind Sentinel: the gateway follows a failover by itself, with no restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from proxy_app.redis_pipeline import PipelinedConnection, PipelineError
from tests.support.app import ADMIN_TOKEN
from tests.support.gateway import Gateway
from tests.support.redis_server import RedisServer
from tests.support.sentinel_group import DOWN_AFTER_MS, MASTER_NAME, SentinelGroup
from tests.support.stub_upstream import Reply, StubUpstream

pytestmark = pytest.mark.integration

RATE_LIMIT = 600


@pytest.fixture
def sentinels() -> Iterator[SentinelGroup]:
    group = SentinelGroup()
    try:
        group.start()
        yield group
    finally:
        group.cleanup()


class KeyedLoad:
    """One client sending keyed GETs back to back (bounded in rate) and noting each answer."""

    def __init__(self, gateway: Gateway, key: str, path: str) -> None:
        self.url = gateway.url + path
        self.key = key
        self.answers: list[tuple[float, int, str]] = []  # (monotonic time, status, error code)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> KeyedLoad:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=20)

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                answer = session.get(self.url, headers={"x-api-key": self.key}, timeout=5)
                code = "" if answer.status_code == 200 else str(answer.json().get("error"))
                self.answers.append((time.monotonic(), answer.status_code, code))
            except requests.RequestException as exc:
                self.answers.append((time.monotonic(), 0, type(exc).__name__))
                session = requests.Session()
            self._stop.wait(0.02)


def test_a_master_failover_is_followed_without_a_restart(
    sentinels: SentinelGroup,
    start_gateway: Callable[..., Gateway],
    stub: StubUpstream,
) -> None:
    stub.reply("/items", Reply(body=b'{"items": []}', headers=(("cache-control", "max-age=600"),)))
    gateway = start_gateway(
        {
            "CACHE_REDIS_URL": sentinels.url,
            "HTTP_CLIENT_BASE_URL": stub.url,
            "API_KEYS_RATE_LIMIT_MAX_REQUESTS": str(RATE_LIMIT),
            "API_KEYS_RATE_LIMIT_WINDOW_SECONDS": "86400",
            "REDIS_TIMEOUT_MS": "500",
        },
        workers=2,
        with_key=False,
    )
    key = gateway.create_key(ADMIN_TOKEN)["apiKey"]
    old_master = sentinels.master_address()
    # The key is on the replica before the master goes (what WAIT 1 confirms).
    assert sentinels.client(old_master[1]).wait(1, 2000) == 1

    with KeyedLoad(gateway, key, "/api/v1/items") as load:
        time.sleep(1.5)
        killed_at = time.monotonic()
        sentinels.kill_master()
        deadline = killed_at + 30
        while time.monotonic() < deadline:
            recent = [status for t, status, _c in load.answers if t > killed_at + 0.2]
            if len(recent) >= 10 and set(recent[-10:]) == {200}:
                break
            time.sleep(0.1)
        time.sleep(1.0)

    before = [a for a in load.answers if a[0] <= killed_at]
    after = [a for a in load.answers if a[0] > killed_at]
    assert before
    assert {status for _t, status, _c in before} == {200}
    # While no master answers, keyed requests get the documented 503 and nothing else.
    failed = [(status, code) for _t, status, code in after if status != 200]
    assert {status for status, _code in failed} <= {503}, failed
    assert {code for _status, code in failed} <= {"auth_unavailable"}, failed
    first_ok = next(t for t, status, _c in after if status == 200)
    last_failed = max((t for t, status, _c in after if status != 200), default=killed_at)
    recovered_s = max(first_ok, last_failed) - killed_at
    print(
        f"\nsentinel failover: keyed requests answered 200 again {recovered_s:.2f} s after "
        f"the master was killed (down-after {DOWN_AFTER_MS} ms), {len(failed)} 503s"
    )
    timeline = [(round(t - killed_at, 2), status) for t, status, _c in after]
    assert after[-1][1] == 200, timeline
    assert sentinels.master_address() != old_master
    # The gateway logged the loss of the master and the new one answering, once each.
    records = gateway.log_records()
    started = [r for r in records if r.get("msg") == "redis outage started"]
    ended = [r for r in records if r.get("msg") == "redis outage ended"]
    assert started
    assert ended
    assert {r.get("master") for r in ended} == {f"127.0.0.1:{sentinels.replica_port}"}

    # The rate limit carried over: what the key used before the failover still counts.
    answer = requests.get(gateway.url + "/api/v1/items", headers={"x-api-key": key}, timeout=5)
    remaining = int(answer.headers["x-ratelimit-remaining"])
    ok_count = sum(1 for _t, status, _c in load.answers if status == 200) + 1
    # (A SIGKILLed master may take its last few counts along: replication is asynchronous.)
    assert RATE_LIMIT - ok_count <= remaining <= RATE_LIMIT - ok_count + 5
    session = requests.Session()
    statuses = [
        session.get(
            gateway.url + "/api/v1/items", headers={"x-api-key": key}, timeout=5
        ).status_code
        for _ in range(remaining + 3)
    ]
    assert statuses.count(200) == remaining
    assert statuses[-3:] == [429, 429, 429]
    # The upstream saw the first miss only: the cache moved with the data to the new master.
    assert len(stub.calls("/items")) == 1


def test_a_connection_to_a_demoted_master_is_dropped_and_the_master_asked_again(
    redis_server: RedisServer, second_redis_server: RedisServer
) -> None:
    """What a failover leaves behind when the old master comes back as a replica: the pipelined
    connection that still reaches it gets READONLY, drops itself, and the next command goes to
    wherever the sentinels now say the master is."""
    for server in (redis_server, second_redis_server):
        if server.process is None:
            server.start()
    replica = second_redis_server.client()
    replica.replicaof("127.0.0.1", redis_server.port)
    try:
        addresses = iter(
            [("127.0.0.1", second_redis_server.port), ("127.0.0.1", redis_server.port)]
        )
        url = f"redis+sentinel://127.0.0.1:1/{MASTER_NAME}/0"
        connection = PipelinedConnection(url, 2.0, lambda: next(addresses))
        with pytest.raises(PipelineError, match="demoted"):
            connection.execute("SET", "failover-probe", "1")
        assert connection.execute("SET", "failover-probe", "2") == b"OK"
        assert redis_server.client().get("failover-probe") == b"2"
        connection.close()
    finally:
        replica.replicaof("NO", "ONE")
