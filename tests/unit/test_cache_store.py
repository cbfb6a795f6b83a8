"""CacheService on fakeredis and on a real redis-server, through one parametrised fixture."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import fakeredis
import pytest

from proxy_app.cache.store import CacheService, Load, LoadFailed, Outcome, Result, Stored
from proxy_app.redis import RedisService
from tests.support.net import free_port

MakeRedis = Callable[[], RedisService]


@pytest.fixture(params=["fakeredis", pytest.param("redis-server", marks=pytest.mark.redis)])
def make_redis(request: pytest.FixtureRequest) -> Iterator[MakeRedis]:
    """Connections to one shared Redis (each call: another client, like another worker)."""
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()

        def fake() -> RedisService:
            return RedisService(
                "redis://fake", timeout_ms=500, client=fakeredis.FakeRedis(server=server)
            )

        yield fake
    else:
        request.getfixturevalue("redis_server")
        url = request.getfixturevalue("redis_url")
        opened: list[RedisService] = []

        def real() -> RedisService:
            opened.append(RedisService(url, timeout_ms=500))
            return opened[-1]

        yield real
        for service in opened:
            service.close()


class Spawned:
    """Background work, collected so the test decides when it runs."""

    def __init__(self) -> None:
        self.work: list[Callable[[], None]] = []

    def __call__(self, work: Callable[[], None]) -> bool:
        self.work.append(work)
        return True

    def run_all(self) -> None:
        while self.work:
            self.work.pop(0)()


@pytest.fixture
def spawned() -> Spawned:
    return Spawned()


def make_cache(redis: RedisService, spawned: Spawned, load_timeout_s: float = 2.0) -> CacheService:
    return CacheService(
        redis, default_ttl_s=60, default_stale_s=30, load_timeout_s=load_timeout_s, spawn=spawned
    )


class CountingLoader:
    def __init__(self, *values: Load, delay_s: float = 0.0) -> None:
        self.values = list(values)
        self.previous: list[Stored | None] = []
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self.started = threading.Event()  # set when a load starts (its key's lock is held)

    @property
    def calls(self) -> int:
        return len(self.previous)

    def __call__(self, previous: Stored | None) -> Load:
        with self._lock:
            self.previous.append(previous)
            value = self.values.pop(0) if len(self.values) > 1 else self.values[0]
        self.started.set()
        if self.delay_s:
            time.sleep(self.delay_s)
        if isinstance(value, Exception):
            raise value
        return value


def test_set_get_delete(make_redis: MakeRedis, spawned: Spawned) -> None:
    cache = make_cache(make_redis(), spawned)
    stored = cache.set("proxy:GET:/a#1", b"value", ttl_s=10, stale_s=5)
    got = cache.get("proxy:GET:/a#1")
    assert got is not None
    assert got.value == b"value"
    assert got.fresh_until == pytest.approx(stored.stored_at + 10)
    assert got.stale_until == pytest.approx(stored.stored_at + 15)
    ttl_ms = cache.redis.client.pttl("proxy:GET:/a#1")
    assert 14_000 < ttl_ms <= 15_000
    assert cache.delete("proxy:GET:/a#1")
    assert cache.get("proxy:GET:/a#1") is None


def test_miss_loads_and_stores_then_hits(make_redis: MakeRedis, spawned: Spawned) -> None:
    cache = make_cache(make_redis(), spawned)
    loader = CountingLoader(Load(b"v1", ttl_s=60))
    first = cache.wrap("k", loader)
    second = cache.wrap("k", loader)
    assert (first.outcome, first.value) == (Outcome.MISS, b"v1")
    assert (second.outcome, second.value) == (Outcome.HIT, b"v1")
    assert loader.calls == 1


def test_stale_is_served_and_refreshed_once_in_the_background(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    cache = make_cache(make_redis(), spawned)
    cache.set("k", b"old", ttl_s=0, stale_s=60)
    loader = CountingLoader(Load(b"new", ttl_s=60))
    first = cache.wrap("k", loader)
    assert (first.outcome, first.value) == (Outcome.STALE, b"old")
    assert loader.calls == 0  # the answer did not wait for the refresh
    assert len(spawned.work) == 1
    spawned.run_all()
    assert loader.calls == 1
    assert loader.previous[0] is not None
    assert loader.previous[0].value == b"old"
    after = cache.wrap("k", loader)
    assert (after.outcome, after.value) == (Outcome.HIT, b"new")


def test_background_refresh_yields_to_a_refresh_running_elsewhere(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    cache = make_cache(make_redis(), spawned)
    cache.set("k", b"old", ttl_s=0, stale_s=60)
    cache.redis.client.set("proxy:lock:k", "someone-else", px=5000)
    loader = CountingLoader(Load(b"new"))
    cache.wrap("k", loader)
    spawned.run_all()
    assert loader.calls == 0


def test_failed_refresh_keeps_serving_within_stale_if_error(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    cache = make_cache(make_redis(), spawned)
    cache.set("k", b"old", ttl_s=0, stale_s=0, stale_if_error_s=60)
    loader = CountingLoader(LoadFailed(error=TimeoutError("slow")))  # type: ignore[arg-type]
    result = cache.wrap("k", loader)
    assert (result.outcome, result.value) == (Outcome.STALE, b"old")
    assert loader.calls == 1


def test_failed_load_past_the_error_window_is_raised(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    cache = make_cache(make_redis(), spawned)
    cache.set("k", b"old", ttl_s=0, stale_s=0, stale_if_error_s=0, retain_s=60)
    loader = CountingLoader(LoadFailed(error=TimeoutError("slow")))  # type: ignore[arg-type]
    with pytest.raises(LoadFailed):
        cache.wrap("k", loader)


def test_unstored_loads_are_bypass_and_leave_nothing(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    cache = make_cache(make_redis(), spawned)
    result = cache.wrap("k", CountingLoader(Load(b"private", store=False)))
    assert result.outcome is Outcome.BYPASS
    assert cache.get("k") is None


def test_unusable_entries_count_as_misses(make_redis: MakeRedis, spawned: Spawned) -> None:
    cache = make_cache(make_redis(), spawned)
    cache.set("k", b"other-variant", ttl_s=60)
    loader = CountingLoader(Load(b"mine"))
    result = cache.wrap(
        "k", loader, usable=lambda stored: stored if stored.value == b"mine" else None
    )
    assert (result.outcome, result.value) == (Outcome.MISS, b"mine")


def test_concurrent_misses_in_one_process_load_once(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    cache = make_cache(make_redis(), spawned)
    loader = CountingLoader(Load(b"v"), delay_s=0.3)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.wrap("cold", loader)))
        for _ in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert loader.calls == 1
    assert sorted(r.outcome for r in results) == [Outcome.HIT] * 19 + [Outcome.MISS]
    assert {r.value for r in results} == {b"v"}


def test_a_miss_elsewhere_is_waited_for_not_repeated(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    worker_a, worker_b = make_cache(make_redis(), spawned), make_cache(make_redis(), spawned)
    slow = CountingLoader(Load(b"from-a"), delay_s=0.4)
    other = CountingLoader(Load(b"from-b"))
    thread = threading.Thread(target=lambda: worker_a.wrap("cold", slow))
    thread.start()
    assert slow.started.wait(5)  # worker A holds the load lock now
    result = worker_b.wrap("cold", other)
    thread.join(timeout=10)
    assert (result.outcome, result.value) == (Outcome.HIT, b"from-a")
    assert other.calls == 0


def test_waiters_elsewhere_stop_waiting_when_the_result_is_not_stored(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    worker_a, worker_b = make_cache(make_redis(), spawned, 5), make_cache(make_redis(), spawned, 5)
    loading = CountingLoader(Load(b"a", store=False), delay_s=0.3)
    thread = threading.Thread(target=lambda: worker_a.wrap("k", loading))
    thread.start()
    assert loading.started.wait(5)  # worker A holds the load lock now
    started = time.monotonic()
    result = worker_b.wrap("k", CountingLoader(Load(b"b", store=False)))
    thread.join(timeout=10)
    assert (result.outcome, result.value) == (Outcome.BYPASS, b"b")
    assert time.monotonic() - started < 2  # far less than the 6 s wait bound


def test_redis_down_means_bypass_with_the_loader_called(spawned: Spawned) -> None:
    down = RedisService(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=100)
    cache = make_cache(down, spawned)
    loader = CountingLoader(Load(b"direct"))
    started = time.monotonic()
    results = [cache.wrap("k", loader) for _ in range(20)]
    assert {(r.outcome, r.value) for r in results} == {(Outcome.BYPASS, b"direct")}
    assert loader.calls == 20
    assert time.monotonic() - started < 1.5  # the outage detector short-circuits


def test_delete_indexed_removes_every_listed_entry(make_redis: MakeRedis, spawned: Spawned) -> None:
    cache = make_cache(make_redis(), spawned)
    cache.set("proxy:GET:/a#1", b"1", index="proxy:index:/a")
    cache.set("proxy:GET:/a#2", b"2", index="proxy:index:/a")
    cache.set("proxy:GET:/b#1", b"3", index="proxy:index:/b")
    assert cache.delete_indexed("proxy:index:/a") == 2
    assert cache.get("proxy:GET:/a#1") is None
    assert cache.get("proxy:GET:/b#1") is not None
    assert cache.delete_indexed("proxy:index:/a") == 0


def test_after_an_uncacheable_load_the_next_miss_does_not_wait(
    make_redis: MakeRedis, spawned: Spawned, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_a, worker_b = make_cache(make_redis(), spawned, 5), make_cache(make_redis(), spawned, 5)
    worker_a.wrap("k", CountingLoader(Load(b"a", store=False)))
    assert worker_b.redis.client.get("proxy:lock:k") == b"pass"
    loader = CountingLoader(Load(b"b", store=False))
    polls: list[float] = []
    real_sleep = time.sleep

    def recording_sleep(seconds: float) -> None:
        polls.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr("proxy_app.cache.store.time.sleep", recording_sleep)
    for _ in range(20):
        assert worker_b.wrap("k", loader).outcome is Outcome.BYPASS
    assert polls == []  # never waited for another worker's load
    assert loader.calls == 20


def test_an_uncacheable_key_skips_the_lock_for_a_while(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    cache = make_cache(make_redis(), spawned)
    loader = CountingLoader(Load(b"private", store=False))
    assert cache.wrap("k", loader).outcome is Outcome.BYPASS
    cache.redis.client.delete("proxy:lock:k")
    assert cache.wrap("k", loader).outcome is Outcome.BYPASS
    assert loader.calls == 2
    # No lock was taken (taking and releasing it would have left a "pass" marker).
    assert not cache.redis.client.exists("proxy:lock:k")


def test_a_waiter_in_the_same_worker_does_not_take_another_variant(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    cache = make_cache(make_redis(), spawned)
    leader = CountingLoader(Load(b"for-mobile"), delay_s=0.3)
    follower = CountingLoader(Load(b"for-desktop"))
    results: dict[str, bytes] = {}

    def request(name: str, loader: CountingLoader, wanted: bytes) -> None:
        result = cache.wrap(
            "k", loader, usable=lambda stored: stored if stored.value == wanted else None
        )
        results[name] = result.value

    first = threading.Thread(target=request, args=("mobile", leader, b"for-mobile"))
    first.start()
    assert leader.started.wait(5)  # the mobile request is loading; the desktop one arrives now
    request("desktop", follower, b"for-desktop")
    first.join(timeout=10)
    assert results == {"mobile": b"for-mobile", "desktop": b"for-desktop"}
    assert (leader.calls, follower.calls) == (1, 1)


def test_a_miss_read_ahead_before_another_load_finished_takes_its_result(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    from proxy_app.cache.store import Prefetched

    cache = make_cache(make_redis(), spawned)
    # This request read the entry (absent) with its key check; another worker stored it since.
    cache.set("k", b"stored-meanwhile", ttl_s=60)
    loader = CountingLoader(Load(b"second-load"))
    result = cache.wrap("k", loader, prefetched=Prefetched("k", None))
    assert (result.outcome, result.value) == (Outcome.HIT, b"stored-meanwhile")
    assert loader.calls == 0
    assert not cache.redis.client.exists("proxy:lock:k")


class Answer:
    """An answer a load got and did not store (a body still arriving, say)."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_an_unstored_answer_serves_only_the_caller_whose_load_got_it(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    cache = make_cache(make_redis(), spawned)
    answers: list[Answer] = []
    lock = threading.Lock()

    def loader(_previous: Stored | None) -> Load:
        with lock:
            answers.append(Answer())
            answer = answers[-1]
        time.sleep(0.3)  # the others are waiting on this load meanwhile
        return Load(b"", store=False, unstored=answer)

    results: list[Result] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.wrap("cold", loader)))
        for _ in range(5)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert [r.outcome for r in results] == [Outcome.BYPASS] * 5
    assert sorted(id(r.unstored) for r in results) == sorted(id(a) for a in answers)
    assert len(answers) == 5


def test_a_failed_load_with_its_own_answer_is_not_shared_with_waiters(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    cache = make_cache(make_redis(), spawned)

    def loader(_previous: Stored | None) -> Load:
        time.sleep(0.3)
        raise LoadFailed(unstored=Answer())

    failures: list[LoadFailed] = []

    def ask() -> None:
        try:
            cache.wrap("cold", loader)
        except LoadFailed as failed:
            failures.append(failed)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len({id(f.unstored) for f in failures}) == 4


def test_a_background_refresh_closes_an_answer_it_did_not_store(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    cache = make_cache(make_redis(), spawned)
    cache.set("k", b"old", ttl_s=0, stale_s=60)
    cache.set("k2", b"old", ttl_s=0, stale_s=60)
    unstored, failed = Answer(), Answer()
    cache.wrap("k", CountingLoader(Load(b"", store=False, unstored=unstored)))
    cache.wrap("k2", CountingLoader(LoadFailed(unstored=failed)))  # type: ignore[arg-type]
    spawned.run_all()
    assert (unstored.closed, failed.closed) == (True, True)


def test_serving_stale_on_error_closes_the_failed_loads_answer(
    make_redis: MakeRedis, spawned: Spawned
) -> None:
    cache = make_cache(make_redis(), spawned)
    cache.set("k", b"old", ttl_s=0, stale_s=0, stale_if_error_s=60)
    answer = Answer()
    result = cache.wrap("k", CountingLoader(LoadFailed(unstored=answer)))  # type: ignore[arg-type]
    assert (result.outcome, result.value) == (Outcome.STALE, b"old")
    assert answer.closed
