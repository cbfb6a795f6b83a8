from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

from proxy_app import create_app
from proxy_app.redis import RedisUnavailable
from proxy_app.settings import Settings
from tests.support.app import ADMIN_TOKEN


def test_health_reports_ok_version_and_redis(client: FlaskClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json == {
        "status": "ok",
        "version": "dev",
        "deployment": None,
        "redis": {"cache": "up"},
        "upstream": {"configured": True, "breaker": "off"},
    }
    assert response.headers["cache-control"] == "no-store"


def test_health_is_degraded_and_not_ready_while_redis_fails(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = app.extensions["proxy_app.redis"].cache

    def failing(_operation: object) -> object:
        raise RedisUnavailable("cache is unavailable")

    monkeypatch.setattr(cache, "_guarded", failing)
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json is not None
    assert health.json["status"] == "degraded"
    assert health.json["redis"] == {"cache": "down"}
    assert client.get("/health/ready").status_code == 503
    assert client.get("/health/cache").status_code == 503
    assert client.get("/health/live").status_code == 200


def test_ready_and_cache_report_up(client: FlaskClient) -> None:
    assert client.get("/health/ready").json == {"status": "ready", "redis": {"cache": "up"}}
    assert client.get("/health/cache").json == {"cache": "up"}


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN, "Bearer"],
)
def test_metrics_need_the_admin_token(client: FlaskClient, authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization else {}
    response = client.get("/internal/metrics", headers=headers)
    assert response.status_code == 401
    assert response.json is not None
    assert response.json["error"] == "invalid_admin_token"
    assert ADMIN_TOKEN not in response.get_data(as_text=True)


def test_metrics_count_requests_by_route_group(client: FlaskClient) -> None:
    client.get("/health/live")
    client.open("/api/v1/x", method="TRACE")
    response = client.get("/internal/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    assert 'proxy_http_requests_total{method="GET",route="health",status="200"} 1.0' in text
    # Methods outside the proxied set share one label: clients cannot mint new series.
    assert 'proxy_http_requests_total{method="OTHER",route="proxy",status="405"} 1.0' in text
    assert "proxy_http_request_duration_seconds_bucket" in text


def test_empty_admin_token_refuses_every_admin_call(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings(admin_api_token=""))
    response = app.test_client().get("/internal/metrics", headers={"authorization": "Bearer "})
    assert response.status_code == 401


def test_a_redis_that_answers_every_command_with_an_error_is_reported_down(
    app: Flask, client: FlaskClient
) -> None:
    """A Redis in protected mode, or one refusing the gateway's credentials, answers with an
    error reply instead of not answering: health says so instead of failing with a 500."""
    import redis as redis_py

    class Refusing:
        def ping(self) -> object:  # what redis-py raises for such a reply
            raise redis_py.exceptions.ResponseError("DENIED Redis is running in protected mode")

    app.extensions["proxy_app.redis"].cache.use_client(Refusing())
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json is not None
    assert health.json["status"] == "degraded"
    assert health.json["redis"] == {"cache": "down"}
    assert client.get("/health/ready").status_code == 503
