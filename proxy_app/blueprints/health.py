"""Liveness, readiness and status: no auth, never cached, never rate-limited."""

from __future__ import annotations

from flask import Blueprint, Response, request

from proxy_app import services
from proxy_app.http_connection import SERVER_STATE_ENVIRON
from proxy_app.responses import json_response as _json

bp = Blueprint("health", __name__, url_prefix="/health")


@bp.get("")
def status() -> Response:
    redis_status = services.redis().status()
    healthy = all(state == "up" for state in redis_status.values())
    settings = services.settings()
    return _json(
        {
            "status": "ok" if healthy else "degraded",
            "version": settings.version,
            # Set per deploy, so that a deploy can tell its own tasks from the ones before.
            "deployment": settings.deployment_id,
            "redis": redis_status,
            "upstream": {
                "configured": bool(settings.upstream_base_url),
                # This worker's view (each worker guards its own requests).
                **_upstream_guard_status(),
            },
        }
    )


def _upstream_guard_status() -> dict[str, object]:
    guard = services.upstream().guard
    return guard.status() if guard is not None else {}


@bp.get("/live")
def live() -> Response:
    return _json({"status": "ok"})


@bp.get("/ready")
def ready() -> Response:
    server_state = request.environ.get(SERVER_STATE_ENVIRON)
    if server_state is not None and server_state.shutting_down:
        # The ingress should stop sending here; the server still serves meanwhile.
        return _json({"status": "shutting_down"}, 503)
    redis_status = services.redis().status()
    if all(state == "up" for state in redis_status.values()):
        return _json({"status": "ready", "redis": redis_status})
    return _json({"status": "unavailable", "redis": redis_status}, 503)


@bp.get("/cache")
def cache() -> Response:
    up = services.redis().cache.ping()
    return _json({"cache": "up" if up else "down"}, 200 if up else 503)
