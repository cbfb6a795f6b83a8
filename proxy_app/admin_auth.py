"""The bearer-token check in front of every ``/internal/**`` route, with throttling of clients
that keep presenting wrong tokens (a correct token, or none, is never throttled)."""

from __future__ import annotations

import hmac

from flask import request

from proxy_app import headers, services
from proxy_app.audit import audit
from proxy_app.errors import TooManyRequests, Unauthorized
from proxy_app.redis import RedisUnavailable

# Wrong tokens one client may present per window before it gets 429 instead of 401 (the default
# of ADMIN_AUTH_MAX_FAILURES).
FAILURES_ALLOWED = 10
FAILURE_WINDOW_S = 60
_CHALLENGE = {"www-authenticate": 'Bearer realm="internal"'}


def require_admin_token() -> None:
    """before_request hook: 401 unless ``Authorization: Bearer <ADMIN_API_TOKEN>``."""
    expected = services.settings().admin_api_token
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if (
        expected
        and scheme.lower() == "bearer"
        # compare_digest on bytes: constant time whatever the presented value holds.
        and hmac.compare_digest(presented.strip().encode(), expected.encode())
    ):
        return
    # Only a presented token is a guess worth throttling: a request without credentials is
    # always told plainly that it needs them.
    failures = _count_failure() if "authorization" in request.headers else 0
    audit("admin.auth", "denied", failures=failures)
    if failures > services.settings().admin_auth_max_failures:
        raise TooManyRequests(
            "Too many requests with a wrong admin token; wait before trying again.",
            code="too_many_auth_failures",
            headers={headers.RETRY_AFTER: str(FAILURE_WINDOW_S)},
        )
    raise Unauthorized(
        "A valid admin bearer token is required.", code="invalid_admin_token", headers=_CHALLENGE
    )


def _count_failure() -> int:
    """Wrong tokens from this client in the current window; 0 when Redis cannot count."""
    registry = services.key_registry()
    try:
        return registry.count_admin_failure(request.remote_addr or "unknown", FAILURE_WINDOW_S)
    except RedisUnavailable:
        return 0
