"""proxy_app: a caching API gateway in front of one upstream HTTP API."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy_app.settings import Settings

if TYPE_CHECKING:
    from flask import Flask

# Background cache refreshes a worker runs at once; more are skipped, not queued.
REFRESH_POOL_SIZE = 32


def create_app(settings: Settings | None = None) -> Flask:
    """Build the WSGI app; settings come from the environment unless given."""
    # Imported here so that ``python -m proxy_app`` (the gunicorn master) stays light and the
    # gevent workers import the network libraries only after monkey-patching.
    from proxy_app import cors, pipeline, services
    from proxy_app.access.addresses import ClientAddresses
    from proxy_app.access.check import AccessGate
    from proxy_app.access.grace import GraceMemory
    from proxy_app.access.keys import KeyRegistry
    from proxy_app.access.plans import Limit, PlanRegistry
    from proxy_app.background import background_spawner
    from proxy_app.blueprints import (
        admin_cache,
        admin_keys,
        admin_metrics,
        admin_openapi,
        admin_plans,
        health,
        proxy,
    )
    from proxy_app.cache.http import ProxyCache
    from proxy_app.cache.store import CacheService
    from proxy_app.errors import register_error_handlers
    from proxy_app.forwarding import PROXIED_METHODS, forwarded_request_headers
    from proxy_app.gateway_flask import GatewayFlask
    from proxy_app.logging import register_secrets
    from proxy_app.metrics import Metrics
    from proxy_app.redis import RedisConnections
    from proxy_app.settings import from_environment
    from proxy_app.upstream import UpstreamClient
    from proxy_app.upstream_guard import UpstreamGuard

    if settings is None:
        settings = from_environment()
    register_secrets(settings.secret_values())

    app = GatewayFlask(__name__, static_folder=None)
    # One byte over the limit: werkzeug stops reading there without an error, so a chunked
    # body that comes back longer than the limit is known to be too large.
    app.config["MAX_CONTENT_LENGTH"] = settings.proxy_body_limit_bytes + 1
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # The proxy judges raw paths itself: no slash merging or redirects before it sees them.
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    # /api/v1/ would otherwise be redirected to /api/v1 (the rule whose default gives the same
    # path) before the key check; no route here wants a canonical form forced on it.
    app.url_map.redirect_defaults = False
    app.url_map.converters["anypath"] = proxy.AnyPathConverter

    metrics = Metrics(settings.metrics_multiproc_dir)
    redis = RedisConnections(settings, on_error=metrics.count_redis_error)
    guard = UpstreamGuard.from_settings(settings, redis.cache, metrics)
    upstream = UpstreamClient.from_settings(settings, metrics, guard)
    store = CacheService(
        redis.cache,
        default_ttl_s=settings.cache_ttl_default_s,
        default_stale_s=settings.cache_stale_ttl_s,
        load_timeout_s=upstream.max_duration_s,
        spawn=background_spawner(REFRESH_POOL_SIZE),
    )
    app.extensions[services.SETTINGS] = settings
    app.extensions[services.METRICS] = metrics
    app.extensions[services.REDIS] = redis
    app.extensions[services.UPSTREAM] = upstream
    app.extensions[services.FORWARDED_HEADERS] = forwarded_request_headers(
        settings.proxy_forward_request_headers
    )
    proxy_cache = app.extensions[services.PROXY_CACHE] = ProxyCache(store, upstream, settings)
    app.extensions[services.KEY_REGISTRY] = KeyRegistry(redis.keys, settings.api_keys_redis_prefix)
    default_limit = Limit(settings.rate_limit_max_requests, settings.rate_limit_window_s)
    app.extensions[services.PLAN_REGISTRY] = PlanRegistry(
        redis.keys, settings.api_keys_redis_prefix, default_limit
    )
    gate = AccessGate(
        redis.keys,
        settings.api_keys_redis_prefix,
        default_limit,
        metrics,
        ClientAddresses(settings.trusted_proxies),
        GraceMemory(settings.outage_grace_s, settings.outage_share)
        if settings.outage_grace_s
        else None,
    )

    pipeline.init_app(app)
    # After the request id (a preflight is logged like any request), before the key check.
    cors.init_app(
        app,
        cors.CorsPolicy.build(
            settings.cors_allowed_origins,
            PROXIED_METHODS,
            app.extensions[services.FORWARDED_HEADERS],
        )
        if settings.cors_allowed_origins
        else None,
    )
    register_error_handlers(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(
        proxy.blueprint(
            gate,
            proxy_cache,
            app.extensions[services.FORWARDED_HEADERS],
            read_along=redis.shared,
        )
    )
    app.register_blueprint(admin_metrics.bp)
    app.register_blueprint(admin_keys.bp)
    app.register_blueprint(admin_plans.bp)
    app.register_blueprint(admin_cache.bp)
    app.register_blueprint(admin_openapi.bp)
    return app
