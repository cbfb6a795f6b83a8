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


@pytest.fixture(scope="session")
def second_redis_server() -> Iterator[RedisServer]:
    """Another Redis, for keys kept apart from the cache (API_KEYS_REDIS_URL)."""
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
    return settings_for_tests


def settings_for_tests(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "upstream_base_url": "http://upstream.test/v4",
        "upstream_api_key": UPSTREAM_KEY,
        "admin_api_token": ADMIN_TOKEN,
        "upstream_retries": 0,
        "web_concurrency": 1,
    }
    values.update(overrides)
    return Settings(**values)


def fake_redis_app(**overrides: Any) -> Flask:
    """The app with Redis replaced by fakeredis: for fast tests of request handling."""
    application = create_app(settings_for_tests(**overrides))
    application.config["TESTING"] = True
    fake = fakeredis.FakeRedis()
    for service in application.extensions["proxy_app.redis"].services():
        service.use_client(fake)
    return application


@pytest.fixture
def app() -> Flask:
    return fake_redis_app()


@pytest.fixture
def api_key(app: Flask) -> str:
    """A valid client key, stored in the app's (fake) Redis."""
    with app.app_context():
        _record, raw_key = app.extensions["proxy_app.key_registry"].create(owner="tests")
    return str(raw_key)


@pytest.fixture
def client(app: Flask, api_key: str) -> FlaskClient:
    """A test client that sends a valid x-api-key with every request."""
    test_client = app.test_client()
    test_client.environ_base["HTTP_X_API_KEY"] = api_key
    return test_client


@pytest.fixture
def start_gateway(redis_url: str) -> Iterator[Callable[..., Gateway]]:
    """Start ``python -m proxy_app``; stopped at the end of the test."""
    started: list[Gateway] = []

    def start(
        env: dict[str, str] | None = None,
        *,
        workers: int = 1,
        wait: bool = True,
        with_key: bool = True,
    ) -> Gateway:
        """With ``with_key``, a client key is created and sent by the gateway's get/request."""
        gateway = Gateway(
            {"CACHE_REDIS_URL": redis_url, "ADMIN_API_TOKEN": ADMIN_TOKEN, **(env or {})},
            workers=workers,
        )
        started.append(gateway)
        gateway.start(wait=wait)
        if wait and with_key:
            gateway.api_key = gateway.create_key(ADMIN_TOKEN)["apiKey"]
        return gateway

    yield start
    for gateway in started:
        gateway.stop()
