"""The app as the fast tests build it: test settings and fakeredis in place of Redis."""

from __future__ import annotations

from typing import Any

import fakeredis
from flask import Flask

from proxy_app import create_app
from proxy_app.settings import Settings

ADMIN_TOKEN = "test-admin-token-5f2c9a"
UPSTREAM_KEY = "test-upstream-key-77d1e0"


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
