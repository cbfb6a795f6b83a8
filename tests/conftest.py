"""Shared fixtures: settings, the Flask app and client (unit), and the real servers
(redis-server, a stub upstream, the gateway process) for integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient

from proxy_app import create_app
from proxy_app.settings import Settings
from tests.support.gateway import Gateway
from tests.support.redis_server import RedisServer
from tests.support.stub_upstream import StubUpstream

ADMIN_TOKEN = "test-admin-token-5f2c9a"
UPSTREAM_KEY = "test-upstream-key-77d1e0"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean, running Redis for this test."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def stub() -> Iterator[StubUpstream]:
    upstream = StubUpstream()
    yield upstream
    upstream.close()


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "upstream_base_url": "http://upstream.test/v4",
            "upstream_api_key": UPSTREAM_KEY,
            "admin_api_token": ADMIN_TOKEN,
            "upstream_retries": 0,
            "web_concurrency": 1,
        }
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
def app(make_settings: Callable[..., Settings]) -> Flask:
    """The app with Redis replaced by fakeredis: for fast tests of request handling."""
    application = create_app(make_settings())
    application.config["TESTING"] = True
    redis_connections = application.extensions["proxy_app.redis"]
    fake = fakeredis.FakeRedis()
    for service in redis_connections.services():
        service.client = fake
    return application


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def start_gateway(redis_url: str) -> Iterator[Callable[..., Gateway]]:
    """Start ``python -m proxy_app``; stopped at the end of the test."""
    started: list[Gateway] = []

    def start(env: dict[str, str] | None = None, *, workers: int = 1, wait: bool = True) -> Gateway:
        gateway = Gateway(
            {"CACHE_REDIS_URL": redis_url, "ADMIN_API_TOKEN": ADMIN_TOKEN, **(env or {})},
            workers=workers,
        )
        started.append(gateway)
        return gateway.start(wait=wait)

    yield start
    for gateway in started:
        gateway.stop()
