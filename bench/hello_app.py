"""The ``flask-hello`` reference: a bare Flask app that answers every GET with the benchmark's
~1 KB JSON document (``bench.payload.PAYLOAD``, the same bytes nginx serves), nothing else: no
Redis, no upstream, no middleware. It shows what Flask under gunicorn with gevent workers can do
on this machine, the ceiling the gateway's goals are stated against.

``python -m bench.hello_app --port PORT [--workers 2] [--worker-class CLASS]`` serves it on
127.0.0.1 with gunicorn, configured like the gateway (``proxy_app.__main__``: worker connections,
keep-alive, no access log, no control socket), on gunicorn's stock ``gevent`` worker or on the
worker class given (a gunicorn name or a ``module.Class`` path, such as the product's own
``proxy_app.worker.GatewayWorker``); stopped by SIGTERM. ``bench.hello_app:app`` is the WSGI
app itself.
"""

from __future__ import annotations

import argparse
from typing import Any

from flask import Flask, Response
from gunicorn.app.base import BaseApplication

from bench.payload import PAYLOAD

_BODY = PAYLOAD.encode()

app = Flask(__name__)


@app.get("/")
@app.get("/<path:_path>")
def hello(_path: str = "") -> Response:
    return Response(_BODY, mimetype="application/json")


class HelloServer(BaseApplication):  # type: ignore[misc]
    """gunicorn configured in code, as the gateway is."""

    def __init__(self, port: int, workers: int, worker_class: str = "gevent") -> None:
        self._port = port
        self._workers = workers
        self._worker_class = worker_class
        super().__init__()

    def load_config(self) -> None:
        options: dict[str, Any] = {
            "bind": [f"127.0.0.1:{self._port}"],
            "workers": self._workers,
            "worker_class": self._worker_class,
            "worker_connections": 1000,
            "keepalive": 95,
            "graceful_timeout": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "warning",
            "proc_name": "bench-flask-hello",
            "control_socket_disable": True,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-class", default="gevent")
    args = parser.parse_args()
    HelloServer(args.port, args.workers, args.worker_class).run()


if __name__ == "__main__":
    main()
