"""``GET /internal/openapi.json``: the OpenAPI document of the admin API, kept beside the code
(``proxy_app/openapi.json``, shipped in the image) and checked against the routes by the tests."""

from __future__ import annotations

import functools
from pathlib import Path

from flask import Blueprint, Response

from proxy_app.admin_auth import require_admin_token

DOCUMENT_PATH = Path(__file__).resolve().parents[1] / "openapi.json"

bp = Blueprint("admin_openapi", __name__, url_prefix="/internal")
bp.before_request(require_admin_token)


@functools.cache
def document_bytes() -> bytes:
    return DOCUMENT_PATH.read_bytes()


@bp.get("/openapi.json")
def document() -> Response:
    return Response(
        document_bytes(),
        content_type="application/json",
        headers={"cache-control": "no-store"},
    )
