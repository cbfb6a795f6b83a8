"""proxy_app: a caching API gateway in front of one upstream HTTP API."""

from __future__ import annotations

from flask import Flask

from proxy_app.settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build the WSGI app; settings come from the environment unless given."""
    # Imported here so that ``python -m proxy_app`` (the gunicorn master) stays light and the
    # gevent workers import the network libraries only after monkey-patching.
    from proxy_app import pipeline, services
    from proxy_app.blueprints import admin_metrics, health, proxy
    from proxy_app.errors import register_error_handlers
    from proxy_app.logging import register_secrets
    from proxy_app.metrics import Metrics
    from proxy_app.redis import RedisConnections
    from proxy_app.settings import from_environment
    from proxy_app.upstream import UpstreamClient

    if settings is None:
        settings = from_environment()
    register_secrets([settings.admin_api_token, settings.upstream_api_key])

    app = Flask(__name__, static_folder=None)
    # One byte over the limit: werkzeug stops reading there without an error, so a chunked
    # body that comes back longer than the limit is known to be too large.
    app.config["MAX_CONTENT_LENGTH"] = settings.proxy_body_limit_bytes + 1
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # The proxy judges raw paths itself: no slash merging or redirects before it sees them.
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.url_map.converters["anypath"] = proxy.AnyPathConverter

    app.extensions[services.SETTINGS] = settings
    app.extensions[services.METRICS] = Metrics(settings.metrics_multiproc_dir)
    app.extensions[services.REDIS] = RedisConnections(settings)
    app.extensions[services.UPSTREAM] = UpstreamClient.from_settings(settings)

    pipeline.init_app(app)
    register_error_handlers(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(proxy.bp)
    app.register_blueprint(admin_metrics.bp)
    return app
