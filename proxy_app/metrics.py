"""Prometheus metrics, correct across gunicorn workers (prometheus_client multiprocess mode).

Under gunicorn, the entry point sets PROMETHEUS_MULTIPROC_DIR before any worker imports this
module, every worker writes its samples there, and the exposition merges them. Without it
(tests, a single process) each app keeps its own registry.

The per-request figures (requests, their latency, cache outcomes) are tallied in plain
dictionaries and written to the metric files in aggregate about once a second: each write to
those files costs a lock, a process-id check and a memory-mapped update, and doing three per
request cost the hot path a sizeable share of its throughput. A scrape flushes first, and a
background flusher covers idle workers, so a scrape lags by at most ``FLUSH_INTERVAL_S``.
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
import time
import weakref
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# Buckets from sub-millisecond cache hits to slow upstream calls.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
log = logging.getLogger(__name__)

# Tallies older than this are written out by the next request, or by the background flusher.
FLUSH_INTERVAL_S = 1.0

_flushed: weakref.WeakSet[Metrics] = weakref.WeakSet()
_flusher_lock = threading.Lock()
_flusher_started = False


def flush_all() -> None:
    """Flush every instance; one failing never stops the others, or the next round (a dead
    flusher would freeze the metrics of idle workers)."""
    for instance in list(_flushed):
        try:
            instance.flush()
        except Exception:
            log.warning("writing the metrics failed", exc_info=True)


def _start_flusher(metrics: Metrics) -> None:
    """One daemon thread (a greenlet under gevent) per process flushes every instance."""
    global _flusher_started
    _flushed.add(metrics)
    if _flusher_started:
        return
    with _flusher_lock:
        if _flusher_started:
            return
        _flusher_started = True

    def flush_forever() -> None:
        try:
            while True:
                time.sleep(FLUSH_INTERVAL_S)
                flush_all()
        except BaseException:  # the worker is exiting and kills its greenlets
            return

    threading.Thread(target=flush_forever, name="metrics-flush", daemon=True).start()


class Metrics:
    """The service's metrics; one instance per app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self._multiprocess_dir = multiprocess_dir
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._outcome_children: dict[str, Any] = {}
        self._tally_lock = threading.Lock()
        # Held for a whole flush, so that a scrape never renders while another flush (the
        # background one) has taken the tallies but not yet written them.
        self._flush_lock = threading.Lock()
        self._requests_tally: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self._latency_tally: dict[str, list[float]] = {}
        self._upstream_tally: dict[str, list[float]] = {}
        self._upstream_children: dict[str, Any] = {}
        self._outcomes_tally: collections.Counter[str] = collections.Counter()
        self._flushed_at = time.monotonic()
        self._flusher_registered = False
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "proxy_http_requests_total",
            "HTTP requests answered, by route group, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_latency = Histogram(
            "proxy_http_request_duration_seconds",
            "Time to answer a request, by route group.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "proxy_upstream_request_duration_seconds",
            "Time the upstream took to answer, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "proxy_upstream_errors_total",
            "Upstream requests that failed after retries, by kind.",
            ["kind"],
            registry=registry,
        )
        self.cache_outcomes = Counter(
            "proxy_cache_outcomes_total",
            "Cache outcome of proxied GET/HEAD requests (HIT, MISS, STALE, BYPASS, ...).",
            ["outcome"],
            registry=registry,
        )
        self.auth_rejections = Counter(
            "proxy_auth_rejections_total",
            "Requests refused by the API key check, by reason.",
            ["reason"],
            registry=registry,
        )
        self.auth_grace = Counter(
            "proxy_auth_grace_total",
            "Keyed requests judged in grace mode while the keys' Redis was away, by outcome "
            "(ok and limited were answered so; unknown got 503; revoked, expired, deleted 401).",
            ["outcome"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "proxy_rate_limited_total",
            "Requests refused with 429 by the per-key rate limit.",
            registry=registry,
        )
        self.upstream_rejections = Counter(
            "proxy_upstream_rejections_total",
            "Upstream requests the gateway held back to spare the upstream, by reason "
            "(concurrency, rate_limit, retry_after, breaker_open, refresh_skipped); "
            "some were answered from a stale entry.",
            ["reason"],
            registry=registry,
        )
        self.upstream_rate_limit_fail_open = Counter(
            "proxy_upstream_rate_limit_fail_open_total",
            "Upstream requests sent unchecked because Redis could not apply UPSTREAM_RATE_LIMIT.",
            registry=registry,
        )
        self.upstream_breaker_opened = Counter(
            "proxy_upstream_breaker_opened_total",
            "Times a worker's upstream circuit breaker opened.",
            registry=registry,
        )
        self.upstream_breaker_state = Gauge(
            "proxy_upstream_breaker_state",
            "Upstream circuit breaker: 0 closed (or off), 1 half-open, 2 open; the worst worker's.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.redis_errors = Counter(
            "proxy_redis_errors_total",
            "Redis calls that failed or were short-circuited during an outage, by connection.",
            ["redis"],
            registry=registry,
        )

    def observe_request(self, route: str, method: str, status: int, duration_s: float) -> None:
        """Count one answered request and its latency (tallied; see the module docstring)."""
        with self._tally_lock:
            self._requests_tally[(route, method, status)] += 1
            self._latency_tally.setdefault(route, []).append(duration_s)
        self._flush_when_due()

    def observe_upstream(self, method: str, elapsed_s: float) -> None:
        """One upstream request's duration (tallied like the request figures)."""
        with self._tally_lock:
            self._upstream_tally.setdefault(method, []).append(elapsed_s)
        self._flush_when_due()

    def count_cache_outcome(self, outcome: str) -> None:
        with self._tally_lock:
            self._outcomes_tally[outcome] += 1

    def flush(self) -> None:
        """Write the tallies to the metrics, each labelled child once."""
        with self._flush_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        with self._tally_lock:
            requests, self._requests_tally = self._requests_tally, collections.Counter()
            latencies, self._latency_tally = self._latency_tally, {}
            outcomes, self._outcomes_tally = self._outcomes_tally, collections.Counter()
            upstream, self._upstream_tally = self._upstream_tally, {}
            self._flushed_at = time.monotonic()
        for (route, method, status), count in requests.items():
            child = self._request_children.get((route, method, status))
            if child is None:
                child = self.requests.labels(route, method, str(status))
                self._request_children[(route, method, status)] = child
            child.inc(count)
        for route, durations in latencies.items():
            histogram = self._latency_children.get(route)
            if histogram is None:
                histogram = self._latency_children[route] = self.request_latency.labels(route)
            _observe_many(histogram, durations)
        for method, durations in upstream.items():
            histogram = self._upstream_children.get(method)
            if histogram is None:
                histogram = self._upstream_children[method] = self.upstream_latency.labels(method)
            _observe_many(histogram, durations)
        for outcome, count in outcomes.items():
            child = self._outcome_children.get(outcome)
            if child is None:
                child = self._outcome_children[outcome] = self.cache_outcomes.labels(outcome)
            child.inc(count)

    def _flush_when_due(self) -> None:
        if time.monotonic() - self._flushed_at >= FLUSH_INTERVAL_S:
            self.flush()
        if not self._flusher_registered:
            self._flusher_registered = True
            _start_flusher(self)

    def count_redis_error(self, redis_name: str) -> None:
        self.redis_errors.labels(redis_name).inc()

    def render(self) -> bytes:
        self.flush()
        if self._multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


def _observe_many(histogram: Any, durations: list[float]) -> None:
    """``histogram.observe(d)`` for every duration, written as one update per bucket and one
    to the sum. Uses the histogram's bucket values (stable in prometheus_client for years;
    a test compares the result with plain ``observe`` calls)."""
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    for duration in durations:
        counts[bisect.bisect_left(bounds, duration)] += 1
    histogram._sum.inc(sum(durations))
    for index, count in enumerate(counts):
        if count:
            histogram._buckets[index].inc(count)
