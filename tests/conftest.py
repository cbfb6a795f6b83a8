"""Shared fixtures: settings, the Flask app and client (unit), and the real servers
(redis-server, a stub upstream, the gateway process) for integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from proxy_app.settings import Settings
from tests.support.app import ADMIN_TOKEN, fake_redis_app, settings_for_tests
from tests.support.gateway import Gateway
from tests.support.redis_server import RedisServer
from tests.support.stub_upstream import StubUpstream


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
