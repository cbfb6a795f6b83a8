"""The gateway's own JSON answers (health, admin, errors): one shape, never stored by caches."""

from __future__ import annotations

from flask import Response, jsonify


def json_response(body: object, status: int = 200) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers["cache-control"] = "no-store"
    return response
