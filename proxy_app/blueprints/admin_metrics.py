"""Prometheus exposition for scrapers holding the admin bearer token."""

from __future__ import annotations

from flask import Blueprint, Response

from proxy_app import services
from proxy_app.admin_auth import require_admin_token

bp = Blueprint("admin_metrics", __name__, url_prefix="/internal")
bp.before_request(require_admin_token)


@bp.get("/metrics")
def metrics() -> Response:
    registry = services.metrics()
    return Response(
        registry.render(),
        content_type=registry.content_type,
        headers={"cache-control": "no-store"},
    )
