"""The gunicorn worker class the gateway runs on: gevent, the gateway's own HTTP/1.1 connection
handling (``proxy_app.http_connection``), and a shutdown that neither drops nor waits.

gunicorn stays the process manager (master, worker lifecycle and heartbeat, signals); this
class replaces its stock gevent worker, whose per-request parsing and two sends per answer cost
more than the app's own work on a cache hit.

Shutdown, on SIGTERM: readiness answers 503 at once; for ``SHUTDOWN_DRAIN_SECONDS`` the worker
keeps accepting and serving (an ingress that has not noticed yet loses nothing); then it stops
accepting, closes idle keep-alive connections, answers requests in progress with
``Connection: close`` and exits as soon as none is left (within ``GRACEFUL_TIMEOUT``).
SIGINT and SIGQUIT skip the drain.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.pool
import gevent.server
from gevent import hub, monkey
from gunicorn.workers.base import Worker

if TYPE_CHECKING:
    from proxy_app.http_connection import Connection, ServerState

log = logging.getLogger("proxy_app.server")

# How often the main greenlet reports to the master while nothing else happens.
HEARTBEAT_S = 1.0


class GatewayWorker(Worker):  # type: ignore[misc]
    """A gunicorn worker serving the WSGI app with ``proxy_app.http_connection`` on gevent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connections: set[Connection] = set()
        self._stopping: gevent.event.Event | None = None
        self._drain_cut: gevent.event.Event | None = None
        self._state: ServerState | None = None

    # --- process set-up ------------------------------------------------------------------

    def init_process(self) -> None:
        monkey.patch_all()
        # gunicorn's listeners are plain sockets: serve them as gevent sockets.
        from gevent import socket as gsocket

        self.sockets: list[Any] = [
            gsocket.socket(listener.FAMILY, socket.SOCK_STREAM, fileno=listener.sock.detach())
            for listener in self.sockets
        ]
        hub.reinit()
        self._stopping = gevent.event.Event()
        self._drain_cut = gevent.event.Event()
        super().init_process()

    def init_signals(self) -> None:
        super().init_signals()
        # Handled in a greenlet of their own (gevent runs them there), so they may wait.
        gevent.signal_handler(signal.SIGTERM, self._begin_shutdown, True)
        gevent.signal_handler(signal.SIGINT, self._begin_shutdown, False)
        gevent.signal_handler(signal.SIGQUIT, self._begin_shutdown, False)

    def notify(self) -> None:
        super().notify()
        if self.ppid != os.getppid():
            log.info("the gunicorn master is gone: stopping")
            self._begin_shutdown(False)

    def _setting(self, name: str, default: float) -> float:
        """A setting of the gateway's; another app served by this class (the benchmark's
        hello) has none, and gets the server's defaults."""
        return float(getattr(getattr(self.app, "settings", None), name, default))

    # --- serving -------------------------------------------------------------------------

    def run(self) -> None:
        from proxy_app.http_connection import FairShare, ServerState

        assert self._stopping is not None
        self._state = ServerState()
        fair_share = FairShare()
        pool = gevent.pool.Pool(self.cfg.worker_connections)
        servers = []
        for listener in self.sockets:
            template = self._environ_template(listener, self._state)
            server = gevent.server.StreamServer(
                listener, handle=self._connection_handler(template, fair_share), spawn=pool
            )
            if self.cfg.workers > 1:
                server.max_accept = 1  # one accept per turn spreads connections over workers
            server.start()
            servers.append(server)
        while self.alive:
            self.notify()
            self._stopping.wait(HEARTBEAT_S)
        self._shut_down(servers, pool)

    def _connection_handler(self, template: dict[str, Any], fair_share: Any) -> Any:
        from proxy_app.http_connection import REQUEST_TIMEOUT_S, Connection

        app = self.wsgi
        keepalive_s = float(self.cfg.keepalive)
        request_timeout_s = self._setting("client_request_timeout_s", REQUEST_TIMEOUT_S)
        connections = self._connections
        state = self._state
        assert state is not None

        def handle(sock: socket.socket, address: Any) -> None:
            with contextlib.suppress(OSError):
                # Answers go out in one send; a last chunk must not wait for an ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = Connection(
                sock,
                address,
                app,
                template,
                keepalive_s=keepalive_s,
                request_timeout_s=request_timeout_s,
                fair_share=fair_share,
                state=state,
            )
            connections.add(connection)
            try:
                connection.serve()
            except Exception:
                # Said as a JSON log line, not as gevent's plain-text traceback on stderr.
                log.exception("serving a connection failed")
            finally:
                connections.discard(connection)

        return handle

    def _environ_template(self, listener: socket.socket, state: ServerState) -> dict[str, Any]:
        from proxy_app.http_connection import SERVER_STATE_ENVIRON

        name = listener.getsockname()
        host, port = (str(name[0]), str(name[1])) if isinstance(name, tuple) else ("", "")
        return {
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",  # TLS ends at the ingress
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,  # greenlets
            "wsgi.multiprocess": self.cfg.workers > 1,
            "wsgi.run_once": False,
            # The server ends each body where the request does (chunked ones too).
            "wsgi.input_terminated": True,
            "SCRIPT_NAME": "",
            "SERVER_NAME": host,
            "SERVER_PORT": port,
            "SERVER_SOFTWARE": "proxy_app",
            SERVER_STATE_ENVIRON: state,
        }

    # --- shutdown ------------------------------------------------------------------------

    def _begin_shutdown(self, drain: bool) -> None:
        assert self._stopping is not None
        assert self._drain_cut is not None
        if not drain:
            self._drain_cut.set()
        if self._state is not None:
            self._state.shutting_down = True
        self.alive = False
        self._stopping.set()

    def _shut_down(self, servers: list[gevent.server.StreamServer], pool: gevent.pool.Pool) -> None:
        assert self._drain_cut is not None
        assert self._state is not None
        drain_s = self._setting("shutdown_drain_s", 0)
        graceful_s = self._setting("graceful_timeout_s", self.cfg.graceful_timeout)
        if drain_s > 0 and not self._drain_cut.is_set():
            log.info(
                "shutting down: still serving while the ingress notices",
                extra={"drain_s": drain_s},
            )
            drain_until = time.monotonic() + drain_s
            while not self._drain_cut.is_set():
                remaining = drain_until - time.monotonic()
                if remaining <= 0:
                    break
                self.notify()
                self._drain_cut.wait(min(HEARTBEAT_S, remaining))
        for server in servers:
            server.close()  # stop accepting
        self._state.closing = True
        in_flight = 0
        for connection in list(self._connections):
            if not connection.close_if_idle():
                in_flight += 1
        log.info("stopped accepting", extra={"in_flight": in_flight})
        deadline = time.monotonic() + graceful_s
        while pool.free_count() != pool.size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning(
                    "graceful timeout: cutting the connections left",
                    extra={"connections": pool.size - pool.free_count()},
                )
                pool.kill(timeout=1)
                break
            self.notify()
            # Connections that finished a request meanwhile and wait for the next one.
            for connection in list(self._connections):
                connection.close_if_idle()
            pool.join(timeout=min(0.05, remaining))
        log.info("stopped")
