"""The upstream guard's protections, each on its own: concurrency slots, the shared rate, the
pause an upstream asks for, and the circuit breaker."""

from __future__ import annotations

import threading
import time
from email.utils import formatdate

import fakeredis
import pytest

from proxy_app.background import background_spawner
from proxy_app.metrics import Metrics
from proxy_app.redis import RedisService
from proxy_app.upstream import (
    UpstreamConnectionError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy_app.upstream_guard import (
    BreakerState,
    CircuitBreaker,
    UpstreamBusy,
    UpstreamCircuitOpen,
    UpstreamGuard,
    retry_after_seconds,
)

URL = "http://upstream.test/things"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rejections(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("proxy_upstream_rejections_total", {"reason": reason})
    return value or 0.0


def state_of(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state


def connection_error() -> UpstreamConnectionError:
    return UpstreamConnectionError("could not connect", method="GET", url=URL)


def fail_through(guard: UpstreamGuard, error: UpstreamError) -> None:
    """One request through the guard that fails with ``error``, told as the client tells it."""
    try:
        with guard.passage("GET", URL) as way:
            way.failed(error)
            raise error
    except type(error):
        pass


# --- circuit breaker ------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_one_trial_closes_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, 10, clock=clock)
    for _ in range(2):
        assert breaker.admit() is None
        breaker.failed(counted=True)
    breaker.succeeded()  # a success in between starts the count again
    for _ in range(3):
        assert breaker.admit() is None
        breaker.failed(counted=True)
    assert state_of(breaker) is BreakerState.OPEN
    assert breaker.admit() == pytest.approx(10)
    clock.now += 10
    assert breaker.admit() is None  # the trial
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert breaker.admit() is not None  # others wait for the trial's outcome
    breaker.succeeded()
    assert state_of(breaker) is BreakerState.CLOSED
    assert breaker.admit() is None


def test_a_failed_trial_opens_the_breaker_for_another_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 5, clock=clock)
    breaker.failed(counted=True)
    clock.now += 5
    assert breaker.admit() is None
    breaker.failed(counted=False)  # any failure of the trial counts
    assert state_of(breaker) is BreakerState.OPEN
    assert breaker.admit() == pytest.approx(5)


def test_errors_other_than_connection_failures_and_timeouts_do_not_open_the_breaker() -> None:
    breaker = CircuitBreaker(2, 5, clock=Clock())
    for _ in range(5):
        breaker.failed(counted=False)
    assert state_of(breaker) is BreakerState.CLOSED


def test_a_trial_that_never_ran_lets_the_next_request_try() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 5, clock=clock)
    breaker.failed(counted=True)
    clock.now += 5
    assert breaker.admit() is None
    breaker.abandoned()
    assert breaker.admit() is None
    assert state_of(breaker) is BreakerState.HALF_OPEN


def test_breaker_failures_zero_is_off() -> None:
    breaker = CircuitBreaker(0, 5, clock=Clock())
    for _ in range(100):
        breaker.failed(counted=True)
    assert state_of(breaker) is BreakerState.OFF
    assert breaker.admit() is None


def test_guard_fails_fast_while_the_breaker_is_open_and_counts_it() -> None:
    clock = Clock()
    metrics = Metrics()
    guard = UpstreamGuard(breaker_failures=2, breaker_cooldown_s=30, metrics=metrics, clock=clock)
    for error in (connection_error(), UpstreamTimeout("timed out", method="GET", url=URL)):
        fail_through(guard, error)
    with pytest.raises(UpstreamCircuitOpen) as refused, guard.passage("GET", URL):
        pytest.fail("the upstream must not be asked")
    assert refused.value.status == 502
    assert refused.value.kind == "unavailable"
    assert refused.value.retry_after_s == 30
    assert rejections(metrics, "breaker_open") == 1
    assert metrics.registry.get_sample_value("proxy_upstream_breaker_state") == 2
    assert metrics.registry.get_sample_value("proxy_upstream_breaker_opened_total") == 1
    assert guard.status() == {"breaker": "open"}
    clock.now += 30
    with guard.passage("GET", URL) as way:
        way.answered(200, None)
    assert guard.status() == {"breaker": "closed"}
    assert metrics.registry.get_sample_value("proxy_upstream_breaker_state") == 0


def test_a_protocol_error_neither_opens_nor_resets_the_breaker() -> None:
    guard = UpstreamGuard(breaker_failures=2, clock=Clock())
    broken = UpstreamProtocolError("broken", method="GET", url=URL)
    for error in (connection_error(), broken, connection_error()):
        fail_through(guard, error)
    assert state_of(guard.breaker) is BreakerState.OPEN


# --- concurrency ----------------------------------------------------------------------------


def test_a_request_beyond_the_concurrency_waits_the_queue_timeout_then_is_busy() -> None:
    metrics = Metrics()
    guard = UpstreamGuard(max_concurrency=1, queue_timeout_ms=150, metrics=metrics)
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with guard.passage("GET", URL):
            holding.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    started = time.monotonic()
    with pytest.raises(UpstreamBusy) as refused, guard.passage("GET", URL):
        pytest.fail("no slot was free")
    waited = time.monotonic() - started
    assert 0.14 <= waited < 1.0
    assert refused.value.status == 503
    assert refused.value.kind == "busy"
    assert refused.value.retry_after_s == 1
    assert rejections(metrics, "concurrency") == 1
    release.set()
    holder.join()
    with guard.passage("GET", URL):
        pass  # the slot came back


def test_a_request_that_frees_its_slot_in_time_lets_a_waiting_one_through() -> None:
    guard = UpstreamGuard(max_concurrency=1, queue_timeout_ms=2000)
    holding = threading.Event()

    def hold() -> None:
        with guard.passage("GET", URL):
            holding.set()
            time.sleep(0.1)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    with guard.passage("GET", URL):
        pass
    holder.join()


def test_background_work_never_waits_for_a_slot() -> None:
    metrics = Metrics()
    guard = UpstreamGuard(max_concurrency=1, queue_timeout_ms=5000, metrics=metrics)
    outcome: list[str] = []
    done = threading.Event()

    def refresh() -> None:
        started = time.monotonic()
        try:
            with guard.passage("GET", URL):
                outcome.append("sent")
        except UpstreamBusy as exc:
            outcome.append(f"{exc.reason} after {time.monotonic() - started:.1f} s")
        done.set()

    with guard.passage("GET", URL):  # the only slot is taken
        assert background_spawner(1)(refresh)
        assert done.wait(5)
    assert outcome == ["refresh_skipped after 0.0 s"]
    assert rejections(metrics, "refresh_skipped") == 1


# --- upstream Retry-After -------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_an_upstream_retry_after_pauses_requests_for_at_most_the_bound(status: int) -> None:
    clock = Clock()
    metrics = Metrics()
    guard = UpstreamGuard(retry_after_max_s=5, metrics=metrics, clock=clock)
    with guard.passage("GET", URL) as way:
        way.answered(status, "120")
    with pytest.raises(UpstreamBusy) as refused, guard.passage("GET", URL):
        pytest.fail("the upstream asked for a pause")
    assert refused.value.retry_after_s == 5
    assert refused.value.reason == "retry_after"
    assert guard.status() == {"breaker": "off", "retryAfterSeconds": 5}
    clock.now += 5
    with guard.passage("GET", URL):
        pass
    assert rejections(metrics, "retry_after") == 1


def test_retry_after_is_ignored_unless_enabled_or_on_other_statuses() -> None:
    clock = Clock()
    off = UpstreamGuard(clock=clock)
    with off.passage("GET", URL) as way:
        way.answered(429, "30")
    on = UpstreamGuard(retry_after_max_s=60, clock=clock)
    with on.passage("GET", URL) as way:
        way.answered(500, "30")
    for guard in (off, on):
        with guard.passage("GET", URL):
            pass


def test_retry_after_values() -> None:
    now = time.time()
    assert retry_after_seconds("7") == 7
    assert retry_after_seconds(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, 1)
    assert retry_after_seconds(formatdate(now - 30, usegmt=True), now=now) == 0
    for invalid in (None, "", "-3", "soon", "1.5"):
        assert retry_after_seconds(invalid) is None


# --- the shared rate ------------------------------------------------------------------------


def test_the_shared_rate_admits_its_limit_per_second_across_guards() -> None:
    fake = fakeredis.FakeRedis()
    metrics = Metrics()
    guards = [
        UpstreamGuard(
            rate_limit=3,
            rate_redis=RedisService("redis://127.0.0.1:1/0", timeout_ms=100, client=fake),
            metrics=metrics,
        )
        for _ in range(2)
    ]
    answers = []
    for number in range(5):
        try:
            with guards[number % 2].passage("GET", URL):
                answers.append("sent")
        except UpstreamBusy as exc:
            answers.append(f"busy {exc.reason} {exc.retry_after_s}")
    assert answers == ["sent"] * 3 + ["busy rate_limit 1"] * 2
    assert rejections(metrics, "rate_limit") == 2
    time.sleep(0.4)  # a third of a second frees one request
    with guards[0].passage("GET", URL):
        pass


def test_the_shared_rate_fails_open_and_counted_when_redis_is_down() -> None:
    metrics = Metrics()
    unreachable = RedisService("redis://127.0.0.1:1/0", timeout_ms=100)
    guard = UpstreamGuard(rate_limit=1, rate_redis=unreachable, metrics=metrics)
    for _ in range(3):
        with guard.passage("GET", URL):
            pass
    fail_open = metrics.registry.get_sample_value("proxy_upstream_rate_limit_fail_open_total")
    assert fail_open == 3


def test_a_guard_with_nothing_set_admits_everything() -> None:
    guard = UpstreamGuard()
    assert not guard.enabled
    for _ in range(100):
        with guard.passage("GET", URL) as way:
            way.failed(connection_error())
    assert guard.status() == {"breaker": "off"}


# --- settings -------------------------------------------------------------------------------


def test_the_protections_are_off_by_default() -> None:
    from proxy_app.settings import load_settings

    settings = load_settings({"UPSTREAM_MAX_CONCURRENCY": "", "UPSTREAM_RATE_LIMIT": ""})
    guard = UpstreamGuard.from_settings(
        settings, RedisService("redis://127.0.0.1:1/0", timeout_ms=100)
    )
    assert not guard.enabled
    assert settings.upstream_queue_timeout_ms == 100
    assert settings.upstream_breaker_cooldown_s == 30


def test_bad_protection_settings_stop_start_up_naming_each() -> None:
    from proxy_app.settings import SettingsError, load_settings

    with pytest.raises(SettingsError) as caught:
        load_settings(
            {
                "UPSTREAM_MAX_CONCURRENCY": "0",
                "UPSTREAM_RATE_LIMIT": "many",
                "UPSTREAM_BREAKER_FAILURES": "-1",
                "UPSTREAM_RETRY_AFTER_MAX_SECONDS": "99999",
            }
        )
    problems = "\n".join(caught.value.problems)
    for name in (
        "UPSTREAM_MAX_CONCURRENCY='0'",
        "UPSTREAM_RATE_LIMIT='many': not an integer",
        "UPSTREAM_BREAKER_FAILURES='-1'",
        "UPSTREAM_RETRY_AFTER_MAX_SECONDS='99999'",
    ):
        assert name in problems
