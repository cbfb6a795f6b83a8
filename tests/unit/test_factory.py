from __future__ import annotations

from collections.abc import Callable

from proxy_app import create_app, services
from proxy_app.settings import Settings


def test_factory_honours_its_settings(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(proxy_body_limit_bytes=1234, upstream_base_url="https://x.example/v2")
    app = create_app(settings)
    assert app.config["MAX_CONTENT_LENGTH"] == 1235
    with app.app_context():
        assert services.settings() is settings
        assert services.upstream().base_url == "https://x.example/v2"
        assert services.redis().keys is services.redis().cache


def test_separate_keys_redis_gets_its_own_connection(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(
        make_settings(
            cache_redis_url="redis://127.0.0.1:1/0", api_keys_redis_url="redis://127.0.0.1:2/0"
        )
    )
    with app.app_context():
        assert services.redis().keys is not services.redis().cache
        assert len(services.redis().services()) == 2


def test_blueprints_are_registered(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings())
    assert {"health", "proxy", "admin_metrics"} <= set(app.blueprints)


def test_two_apps_do_not_share_metrics(make_settings: Callable[..., Settings]) -> None:
    first, second = create_app(make_settings()), create_app(make_settings())
    first.test_client().get("/health/live")
    with first.app_context():
        first_text = services.metrics().render().decode()
    with second.app_context():
        second_text = services.metrics().render().decode()
    assert 'route="health"' in first_text
    assert 'route="health"' not in second_text


def test_a_worker_puts_its_app_beyond_the_collectors_reach(
    make_settings: Callable[..., Settings],
) -> None:
    import gc

    from proxy_app.__main__ import GatewayServer

    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        GatewayServer(make_settings()).load()
        # What the app was built from is frozen: full collections skip it.
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_the_server_process_stays_light() -> None:
    """The gunicorn master only validates settings and supervises: the web stack, Redis and
    HTTP clients are imported by the workers (after gevent's patching), not by it."""
    import subprocess
    import sys

    heavy = ("flask", "werkzeug", "requests", "redis", "prometheus_client")
    probe = (
        f"import sys, proxy_app.__main__; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert loaded == ""
