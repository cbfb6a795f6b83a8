"""Prometheus metrics, correct across gunicorn workers (prometheus_client multiprocess mode).

Under gunicorn, the entry point sets PROMETHEUS_MULTIPROC_DIR before any worker imports this
module, every worker writes its samples there, and the exposition merges them. Without it
(tests, a single process) each app keeps its own registry.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# Buckets from sub-millisecond cache hits to slow upstream calls.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The service's metrics; one instance per app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self._multiprocess_dir = multiprocess_dir
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._outcome_children: dict[str, Any] = {}
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
        self.rate_limited = Counter(
            "proxy_rate_limited_total",
            "Requests refused with 429 by the per-key rate limit.",
            registry=registry,
        )
        self.redis_errors = Counter(
            "proxy_redis_errors_total",
            "Redis calls that failed or were short-circuited during an outage, by connection.",
            ["redis"],
            registry=registry,
        )

    def observe_request(self, route: str, method: str, status: int, duration_s: float) -> None:
        """Count one answered request and its latency (the labelled children are looked up
        once per combination: ``labels()`` takes a lock and builds a key every call)."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(route, method, str(status)),
                self.request_latency.labels(route),
            )
        children[0].inc()
        children[1].observe(duration_s)

    def count_cache_outcome(self, outcome: str) -> None:
        child = self._outcome_children.get(outcome)
        if child is None:
            child = self._outcome_children[outcome] = self.cache_outcomes.labels(outcome)
        child.inc()

    def count_redis_error(self, redis_name: str) -> None:
        self.redis_errors.labels(redis_name).inc()

    def render(self) -> bytes:
        if self._multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
