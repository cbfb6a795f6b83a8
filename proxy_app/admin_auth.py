"""The bearer-token check in front of every ``/internal/**`` route."""

from __future__ import annotations

import hmac

from flask import request

from proxy_app import services
from proxy_app.errors import Unauthorized

_CHALLENGE = {"www-authenticate": 'Bearer realm="internal"'}


def require_admin_token() -> None:
    """before_request hook: 401 unless ``Authorization: Bearer <ADMIN_API_TOKEN>``."""
    expected = services.settings().admin_api_token
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if (
        not expected
        or scheme.lower() != "bearer"
        # compare_digest on bytes: constant time whatever the presented value holds.
        or not hmac.compare_digest(presented.strip().encode(), expected.encode())
    ):
        raise Unauthorized(
            "A valid admin bearer token is required.",
            code="invalid_admin_token",
            headers=_CHALLENGE,
        )
