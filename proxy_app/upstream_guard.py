"""What the gateway does to spare its upstream: a per-worker cap on requests in flight, a request
rate shared by every replica (in Redis), a pause while the upstream asks for one (429 or 503 with
Retry-After), and a circuit breaker after repeated connection failures or timeouts.

A request held back here never reaches the upstream: it fails with ``UpstreamRefused`` (an
``UpstreamError``, so that the cache answers it from a stale entry when one may stand in, as it
does for any upstream failure). Every protection is off unless its setting turns it on.
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from proxy_app.background import in_background, on_gevent
from proxy_app.metrics import Metrics
from proxy_app.redis import RedisService, RedisUnavailable
from proxy_app.settings import Settings
from proxy_app.upstream import UpstreamConnectionError, UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)

# The shared rate state's Redis key: outside the cache entries' namespace, so that invalidating
# entries never touches it.
RATE_KEY = "proxy:upstream-rate"
# Statuses whose Retry-After says "this upstream is overloaded, come back later".
BACK_OFF_STATUSES = frozenset({429, 503})
# The Retry-After a refusal carries when there is nothing better to say, seconds.
DEFAULT_RETRY_AFTER_S = 1


class UpstreamRefused(UpstreamError):
    """The gateway held a request back to spare the upstream; the client may retry after
    ``retry_after_s``. ``status`` is what the client is answered with when no stored response
    may stand in, ``reason`` what the metrics count it as."""

    status = 503
    reason = "refused"

    def __init__(self, message: str, *, method: str, url: str, retry_after_s: float) -> None:
        super().__init__(message, method=method, url=url)
        self.retry_after_s = max(1, math.ceil(retry_after_s))


class UpstreamBusy(UpstreamRefused):
    """Too many requests in flight, over the shared rate, or the upstream asked for a pause."""

    kind = "busy"

    def __init__(
        self, message: str, *, method: str, url: str, retry_after_s: float, reason: str
    ) -> None:
        super().__init__(message, method=method, url=url, retry_after_s=retry_after_s)
        self.reason = reason


class UpstreamCircuitOpen(UpstreamRefused):
    """The circuit breaker is open: the upstream failed too often in a row."""

    kind = "unavailable"
    status = 502
    reason = "breaker_open"


class BreakerState(enum.StrEnum):
    OFF = "off"
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# The breaker's state as the metrics gauge shows it (the worst worker's, across workers).
BREAKER_GAUGE_VALUES = {
    BreakerState.OFF: 0,
    BreakerState.CLOSED: 0,
    BreakerState.HALF_OPEN: 1,
    BreakerState.OPEN: 2,
}


class CircuitBreaker:
    """Opens after ``failures`` consecutive connection failures or timeouts; while open,
    requests fail fast; after ``cooldown_s`` one trial request is let through, and its outcome
    closes the breaker or opens it for another cool-down. Per worker process."""

    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] = lambda _state: None,
    ) -> None:
        self.failures_to_open = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED if failures > 0 else BreakerState.OFF
        self._failures = 0
        self._open_until = 0.0

    @property
    def state(self) -> BreakerState:
        return self._state

    def refusing_for(self) -> float | None:
        """Seconds a request would be refused for now (without taking the trial), else None."""
        state = self._state
        if state is BreakerState.OPEN:
            remaining = self._open_until - self._clock()
            return remaining if remaining > 0 else None
        if state is BreakerState.HALF_OPEN:
            return DEFAULT_RETRY_AFTER_S  # a trial request is under way
        return None

    def admit(self) -> float | None:
        """None when a request may go (the one after a cool-down is the trial), else the
        seconds to wait."""
        if self._state in (BreakerState.OFF, BreakerState.CLOSED):
            return None
        with self._lock:
            if self._state is BreakerState.OPEN:
                remaining = self._open_until - self._clock()
                if remaining > 0:
                    return remaining
                self._set(BreakerState.HALF_OPEN)
                return None
            if self._state is BreakerState.HALF_OPEN:
                return DEFAULT_RETRY_AFTER_S
            return None

    def succeeded(self) -> None:
        """The upstream answered (any status: it is reachable)."""
        if self._state is BreakerState.OFF:
            return
        with self._lock:
            self._failures = 0
            if self._state is not BreakerState.CLOSED:
                self._set(BreakerState.CLOSED)

    def failed(self, *, counted: bool) -> None:
        """A request failed; ``counted``: a connection failure or timeout. Any failure of the
        trial request opens the breaker again."""
        if self._state is BreakerState.OFF:
            return
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._open()
                return
            if not counted:
                return
            self._failures += 1
            if self._state is BreakerState.CLOSED and self._failures >= self.failures_to_open:
                self._open()

    def abandoned(self) -> None:
        """The trial request was admitted but never sent: let the next request be the trial."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                # Quietly: nothing about the upstream was learnt.
                self._open_until = self._clock()
                self._state = BreakerState.OPEN

    def _open(self) -> None:
        self._open_until = self._clock() + self.cooldown_s
        self._failures = 0
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        previous, self._state = self._state, state
        if previous is not state:
            self._on_change(state)


class _Slots(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float | None = ...) -> bool: ...

    def release(self) -> None: ...


def _slots(size: int) -> _Slots:
    """A bounded semaphore that waits cooperatively: gevent's under gevent workers."""
    if on_gevent():
        import gevent.lock

        slots: _Slots = gevent.lock.BoundedSemaphore(size)
        return slots
    return threading.BoundedSemaphore(size)


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """A Retry-After value (delay-seconds or an HTTP-date, RFC 9110 section 10.2.3) as seconds
    from now; None when absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Passage:
    """One request's way through the guard: tell it how the request ended."""

    def __init__(self, guard: UpstreamGuard) -> None:
        self._guard = guard

    def answered(self, status: int, retry_after: str | None) -> None:
        self._guard._answered(status, retry_after)

    def failed(self, error: UpstreamError) -> None:
        self._guard.breaker.failed(
            counted=isinstance(error, (UpstreamConnectionError, UpstreamTimeout))
        )


class UpstreamGuard:
    """The protections in front of the upstream, one instance per worker process."""

    def __init__(
        self,
        *,
        max_concurrency: int | None = None,
        queue_timeout_ms: int = 100,
        rate_limit: int | None = None,
        rate_redis: RedisService | None = None,
        retry_after_max_s: int = 0,
        breaker_failures: int = 0,
        breaker_cooldown_s: int = 30,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._slots = _slots(max_concurrency) if max_concurrency else None
        self._queue_timeout_s = queue_timeout_ms / 1000
        self._rate_limit = rate_limit if rate_redis is not None else None
        self._rate_redis = rate_redis
        self._rate_script = (
            rate_redis.script(__file__, "upstream_rate.lua") if rate_redis and rate_limit else None
        )
        self._retry_after_max_s = retry_after_max_s
        self._paused_until = 0.0
        self.breaker = CircuitBreaker(
            breaker_failures, breaker_cooldown_s, clock=clock, on_change=self._breaker_changed
        )
        self.enabled = bool(
            self._slots or self._rate_script or retry_after_max_s or breaker_failures
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, redis: RedisService, metrics: Metrics | None = None
    ) -> UpstreamGuard:
        return cls(
            max_concurrency=settings.upstream_max_concurrency,
            queue_timeout_ms=settings.upstream_queue_timeout_ms,
            rate_limit=settings.upstream_rate_limit,
            rate_redis=redis,
            retry_after_max_s=settings.upstream_retry_after_max_s,
            breaker_failures=settings.upstream_breaker_failures,
            breaker_cooldown_s=settings.upstream_breaker_cooldown_s,
            metrics=metrics,
        )

    def status(self) -> dict[str, object]:
        """What /health shows: the breaker's state in this worker, and the pause the upstream
        asked for (seconds left), when one is on."""
        shown: dict[str, object] = {"breaker": self.breaker.state.value}
        paused_s = self._paused_for()
        if paused_s:
            shown["retryAfterSeconds"] = math.ceil(paused_s)
        return shown

    @contextlib.contextmanager
    def passage(self, method: str, url: str) -> Iterator[Passage]:
        """Admit one request to the upstream, or raise UpstreamRefused. The request holds its
        concurrency slot until the block ends."""
        if not self.enabled:
            yield Passage(self)
            return
        waited = self.breaker.refusing_for()
        if waited is not None:
            raise self._refused_by_breaker(method, url, waited)
        paused_s = self._paused_for()
        if paused_s:
            raise self._busy(
                "the upstream asked for a pause (Retry-After)", method, url, paused_s, "retry_after"
            )
        background = in_background()
        if self._slots is not None and not self._take_slot(background):
            if background:
                raise self._busy(
                    "no upstream slot for a background refresh", method, url, 1, "refresh_skipped"
                )
            raise self._busy(
                "too many requests to the upstream are in flight", method, url, 1, "concurrency"
            )
        try:
            wait_ms = self._rate_wait_ms()
            if wait_ms:
                raise self._busy(
                    "the upstream request rate is exhausted",
                    method,
                    url,
                    wait_ms / 1000,
                    "rate_limit",
                )
            waited = self.breaker.admit()
            if waited is not None:
                raise self._refused_by_breaker(method, url, waited)
            try:
                yield Passage(self)
            except BaseException:
                # Ended without an answer or a failure told (the client went away, say): a
                # trial request must not leave the breaker waiting for it forever.
                self.breaker.abandoned()
                raise
        finally:
            if self._slots is not None:
                self._slots.release()

    # --- internals ---------------------------------------------------------------------------

    def _take_slot(self, background: bool) -> bool:
        assert self._slots is not None
        if background or self._queue_timeout_s <= 0:
            return self._slots.acquire(blocking=False)
        return self._slots.acquire(timeout=self._queue_timeout_s)

    def _rate_wait_ms(self) -> int:
        """0 when the shared rate lets this request go, else the ms until it would. Redis
        unreachable: the request goes (counted), the limit is not worth an outage."""
        if self._rate_script is None or self._rate_redis is None:
            return 0
        script, limit = self._rate_script, self._rate_limit
        try:
            return int(self._rate_redis.run_script(script, [RATE_KEY], [limit]))
        except RedisUnavailable:
            if self._metrics is not None:
                self._metrics.upstream_rate_limit_fail_open.inc()
            return 0

    def _answered(self, status: int, retry_after: str | None) -> None:
        self.breaker.succeeded()
        if not self._retry_after_max_s or status not in BACK_OFF_STATUSES:
            return
        pause_s = retry_after_seconds(retry_after)
        if not pause_s:
            return
        pause_s = min(pause_s, self._retry_after_max_s)
        until = self._clock() + pause_s
        if until > self._paused_until:
            self._paused_until = until
            log.warning(
                "the upstream asked for a pause: requests to it are held back",
                extra={"upstream_status": status, "pause_s": round(pause_s, 3)},
            )

    def _paused_for(self) -> float:
        if not self._paused_until:
            return 0.0
        return max(0.0, self._paused_until - self._clock())

    def _busy(
        self, message: str, method: str, url: str, retry_after_s: float, reason: str
    ) -> UpstreamBusy:
        self._count(reason)
        return UpstreamBusy(
            message, method=method, url=url, retry_after_s=retry_after_s, reason=reason
        )

    def _refused_by_breaker(self, method: str, url: str, waited: float) -> UpstreamCircuitOpen:
        self._count(UpstreamCircuitOpen.reason)
        return UpstreamCircuitOpen(
            "the upstream failed repeatedly; requests to it are paused (circuit breaker open)",
            method=method,
            url=url,
            retry_after_s=waited,
        )

    def _count(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.upstream_rejections.labels(reason).inc()

    def _breaker_changed(self, state: BreakerState) -> None:
        if state is BreakerState.OPEN:
            log.warning(
                "upstream circuit breaker opened",
                extra={"cooldown_s": self.breaker.cooldown_s},
            )
            if self._metrics is not None:
                self._metrics.upstream_breaker_opened.inc()
        elif state is BreakerState.CLOSED:
            log.info("upstream circuit breaker closed")
        if self._metrics is not None:
            self._metrics.upstream_breaker_state.set(BREAKER_GAUGE_VALUES[state])
