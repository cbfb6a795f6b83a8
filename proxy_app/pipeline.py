"""Around every request: the request id first, then one log line and the metrics last."""

from __future__ import annotations

import logging
import random
import re
import time

from flask import Flask, Response, request

from proxy_app import headers, request_state, services
from proxy_app.forwarding import GATEWAY_PREFIX, PROXIED_METHODS
from proxy_app.logging import reset_request_id, set_request_id
from proxy_app.request_state import RequestState

log = logging.getLogger("proxy_app.access")

_REQUEST_ID_ENVIRON = "HTTP_" + headers.REQUEST_ID.upper().replace("-", "_")  # as WSGI names it
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Metric labels take these methods as they are and any other as OTHER: clients choose the method,
# and every distinct label value is a new time series.
_METHOD_LABELS = frozenset(PROXIED_METHODS)


def route_group(path: str) -> str:
    """A small fixed set of labels for metrics, never raw paths (their number is unbounded)."""
    for prefix, group in ((GATEWAY_PREFIX, "proxy"), ("/health", "health"), ("/internal", "admin")):
        if path == prefix or path.startswith(prefix + "/"):
            return group
    return "other"


def new_request_id() -> str:
    """128 random bits as 32 hex digits. Unique, not secret: the process's generator (seeded
    anew in each worker) serves, without a system call per request."""
    return f"{random.getrandbits(128):032x}"


def _start_request() -> None:
    incoming = request.environ.get(_REQUEST_ID_ENVIRON, "")
    request_id = incoming if _VALID_REQUEST_ID.match(incoming) else new_request_id()
    state = request_state.begin(RequestState(request_id, time.perf_counter()))
    state.request_id_token = set_request_id(request_id)


def _finish_request(response: Response) -> Response:
    state = request_state.current()
    current = request._get_current_object()  # type: ignore[attr-defined]
    response.headers[headers.REQUEST_ID] = state.request_id
    duration_s = time.perf_counter() - state.started
    path = current.path
    group = route_group(path)
    method = current.method
    label = method if method in _METHOD_LABELS else "OTHER"
    services.metrics().observe_request(group, label, response.status_code, duration_s)
    level = logging.DEBUG if group == "health" else logging.INFO
    if log.isEnabledFor(level):
        fields: dict[str, object] = {
            "method": method,
            "path": path,
            "status": response.status_code,
            "duration_ms": round(duration_s * 1000, 2),
            **state.log_fields(),
        }
        log.log(level, "request", extra=fields)
    return response


def _teardown_request(_exc: BaseException | None) -> None:
    state = request_state.ended()
    if state is not None and state.request_id_token is not None:
        reset_request_id(state.request_id_token)


def init_app(app: Flask) -> None:
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.teardown_request(_teardown_request)
