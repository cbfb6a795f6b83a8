"""``python -m proxy_app``: validate the settings, then serve with gunicorn as the process
manager and the gateway's own gevent workers (``proxy_app.worker``).

Exit code 2 and one line per problem when the settings are invalid. SIGTERM: readiness 503 at
once, SHUTDOWN_DRAIN_SECONDS of serving as usual, then in-flight requests are finished within
GRACEFUL_TIMEOUT seconds and the process exits 0.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import shutil
import sys
import tempfile
from typing import Any

from gunicorn.app.base import BaseApplication

from proxy_app.logging import configure as configure_logging
from proxy_app.logging import logging_config, register_secrets
from proxy_app.settings import Settings, SettingsError, from_environment

log = logging.getLogger("proxy_app")

# gunicorn restarts a worker that has not reported for this long; gevent workers report from
# their own greenlet, so only a truly stuck worker hits it.
WORKER_TIMEOUT_S = 30
EXIT_INVALID_SETTINGS = 2
WORKER_CLASS = "proxy_app.worker.GatewayWorker"
# Seconds the master waits beyond a worker's own drain and graceful timeout before killing it.
SHUTDOWN_MARGIN_S = 2
# Read by prometheus_client when it is first imported (in the workers, after the fork); this
# module must therefore not import it.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class GatewayServer(BaseApplication):  # type: ignore[misc]
    """gunicorn configured in code from Settings: no config file, no command-line parsing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        options: dict[str, Any] = {
            "bind": [f"{settings.host}:{settings.port}"],
            "workers": settings.web_concurrency,
            "worker_class": WORKER_CLASS,
            "worker_connections": settings.worker_connections,
            # The master's patience with its workers at shutdown: each worker drains, then
            # finishes what is in flight (proxy_app.worker), and is killed only after both.
            "graceful_timeout": (
                settings.shutdown_drain_s + settings.graceful_timeout_s + SHUTDOWN_MARGIN_S
            ),
            "timeout": WORKER_TIMEOUT_S,
            # Longer than the ingress' idle timeout, so the proxy in front closes idle
            # connections first and never sends on one we are closing.
            "keepalive": settings.keepalive_s,
            "loglevel": settings.log_level,
            "logconfig_dict": logging_config(settings.log_level),
            "accesslog": None,
            "errorlog": "-",
            "proc_name": "proxy_app",
            # No runtime control socket: nothing to write under $HOME on a read-only image.
            "control_socket_disable": True,
            "child_exit": _child_exit,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from proxy_app import create_app

        app = create_app(self.settings)
        # Everything built so far lives as long as the worker: out of the collector's sight, a
        # full collection scans what requests leave behind, not the whole app (with it, each
        # one stalled a worker for about 30 ms every few seconds under load).
        gc.collect()
        gc.freeze()
        return app


def _child_exit(_server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def main() -> int:
    try:
        settings = from_environment()
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"invalid setting {problem}", file=sys.stderr)
        return EXIT_INVALID_SETTINGS
    configure_logging(settings.log_level)
    register_secrets(settings.secret_values())

    metrics_dir = tempfile.mkdtemp(prefix="proxy_app-metrics-")
    # prometheus_client picks its multiprocess mode from the environment when imported, which
    # happens in each worker after this point.
    os.environ[MULTIPROC_ENV] = metrics_dir
    settings = dataclasses.replace(settings, metrics_multiproc_dir=metrics_dir)
    if not settings.admin_api_token:
        log.warning("ADMIN_API_TOKEN is empty: every /internal request will be refused")
    log.info("starting", extra={"settings": settings.masked()})
    master_pid = os.getpid()
    try:
        GatewayServer(settings).run()
    finally:
        # Workers are forked from inside run() and leave through here too: only the master,
        # last out, may remove what the others still write to.
        if os.getpid() == master_pid:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
