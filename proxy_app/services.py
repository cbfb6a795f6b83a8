"""Typed accessors for the process-wide services registered on the app by ``create_app``."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from flask import current_app

if TYPE_CHECKING:
    from proxy_app.access.keys import KeyRegistry
    from proxy_app.access.plans import PlanRegistry
    from proxy_app.cache.http import ProxyCache
    from proxy_app.metrics import Metrics
    from proxy_app.redis import RedisConnections
    from proxy_app.settings import Settings
    from proxy_app.upstream import UpstreamClient

SETTINGS = "proxy_app.settings"
UPSTREAM = "proxy_app.upstream"
REDIS = "proxy_app.redis"
METRICS = "proxy_app.metrics"
PROXY_CACHE = "proxy_app.proxy_cache"
KEY_REGISTRY = "proxy_app.key_registry"
PLAN_REGISTRY = "proxy_app.plan_registry"
FORWARDED_HEADERS = "proxy_app.forwarded_headers"


def settings() -> Settings:
    return cast("Settings", current_app.extensions[SETTINGS])


def upstream() -> UpstreamClient:
    return cast("UpstreamClient", current_app.extensions[UPSTREAM])


def redis() -> RedisConnections:
    return cast("RedisConnections", current_app.extensions[REDIS])


def metrics() -> Metrics:
    return cast("Metrics", current_app.extensions[METRICS])


def proxy_cache() -> ProxyCache:
    return cast("ProxyCache", current_app.extensions[PROXY_CACHE])


def key_registry() -> KeyRegistry:
    return cast("KeyRegistry", current_app.extensions[KEY_REGISTRY])


def plan_registry() -> PlanRegistry:
    return cast("PlanRegistry", current_app.extensions[PLAN_REGISTRY])
