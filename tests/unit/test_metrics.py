from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from proxy_app.metrics import LATENCY_BUCKETS_S, Metrics

DURATIONS = [0.0004, 0.001, 0.0011, 0.003, 0.02, 0.02, 0.7, 1.0, 4.2, 29.9, 31.0, 120.0]


def _lines(text: bytes, prefix: str) -> list[str]:
    """Bucket, count and sum samples (not the creation timestamp)."""
    return sorted(
        line
        for line in text.decode().splitlines()
        if line.startswith(prefix) and not line.startswith(prefix + "created")
    )


def test_tallied_latencies_expose_exactly_what_plain_observations_would() -> None:
    metrics = Metrics()
    for duration in DURATIONS:
        metrics.observe_request("proxy", "GET", 200, duration)
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "proxy_http_request_duration_seconds",
        "reference",
        ["route"],
        buckets=LATENCY_BUCKETS_S,
        registry=reference_registry,
    )
    for duration in DURATIONS:
        reference.labels("proxy").observe(duration)
    prefix = "proxy_http_request_duration_seconds_"
    assert _lines(metrics.render(), prefix) == _lines(generate_latest(reference_registry), prefix)


def test_counts_are_written_on_render_without_waiting_for_the_flusher() -> None:
    metrics = Metrics()
    for _ in range(7):
        metrics.observe_request("proxy", "GET", 200, 0.01)
        metrics.count_cache_outcome("HIT")
    metrics.count_cache_outcome("MISS")
    text = metrics.render().decode()
    assert 'proxy_http_requests_total{method="GET",route="proxy",status="200"} 7.0' in text
    assert 'proxy_cache_outcomes_total{outcome="HIT"} 7.0' in text
    assert 'proxy_cache_outcomes_total{outcome="MISS"} 1.0' in text
    assert "proxy_http_requests_total" in metrics.render().decode()  # a second flush adds 0
    assert 'status="200"} 7.0' in metrics.render().decode()


def test_upstream_latency_is_tallied_and_exposed() -> None:
    metrics = Metrics()
    metrics.observe_upstream("GET", 0.004)
    metrics.observe_upstream("GET", 0.3)
    text = metrics.render().decode()
    assert 'proxy_upstream_request_duration_seconds_count{method="GET"} 2.0' in text
    assert 'proxy_upstream_request_duration_seconds_bucket{le="0.005",method="GET"} 1.0' in text


def test_one_failing_flush_stops_neither_the_others_nor_the_flusher(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy_app import metrics as metrics_module

    broken, healthy = Metrics(), Metrics()
    for instance in (broken, healthy):
        instance.observe_request("proxy", "GET", 200, 0.01)

    def fail() -> None:
        raise ValueError("mmap closed or invalid")

    monkeypatch.setattr(broken, "flush", fail)
    metrics_module.flush_all()  # must not raise
    assert "writing the metrics failed" in caplog.text
    assert 'route="proxy",status="200"} 1.0' in generate_latest(healthy.registry).decode()
