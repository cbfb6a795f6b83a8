"""Liveness, readiness and status: no auth, never cached, never rate-limited."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from proxy_app import services

bp = Blueprint("health", __name__, url_prefix="/health")


def _json(body: dict[str, object], status: int = 200) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers["cache-control"] = "no-store"
    return response


@bp.get("")
def status() -> Response:
    redis_status = services.redis().status()
    healthy = all(state == "up" for state in redis_status.values())
    settings = services.settings()
    return _json(
        {
            "status": "ok" if healthy else "degraded",
            "version": settings.version,
            "redis": redis_status,
            "upstream": {"configured": bool(settings.upstream_base_url)},
        }
    )


@bp.get("/live")
def live() -> Response:
    return _json({"status": "ok"})


@bp.get("/ready")
def ready() -> Response:
    redis_status = services.redis().status()
    if all(state == "up" for state in redis_status.values()):
        return _json({"status": "ready", "redis": redis_status})
    return _json({"status": "unavailable", "redis": redis_status}, 503)


@bp.get("/cache")
def cache() -> Response:
    up = services.redis().cache.ping()
    return _json({"cache": "up" if up else "down"}, 200 if up else 503)
