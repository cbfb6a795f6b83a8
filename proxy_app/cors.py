"""CORS for browser clients of ``/api/v1`` (CORS_ALLOWED_ORIGINS): preflights answered by the
gateway itself, and the allow and expose headers added to every answer for an allowed origin.
They are added per request, after the answer is made, so a cached answer never carries
another origin's."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from flask import Flask, Response, request

from proxy_app import headers
from proxy_app.errors import error_response
from proxy_app.forwarding import is_proxied

# Browsers may reuse a preflight answer this long (they cap it themselves: Chromium at 2 hours).
PREFLIGHT_MAX_AGE_S = 600
# Response headers every browser script may read without being told (Fetch standard).
_SAFELISTED_RESPONSE_HEADERS = frozenset(
    {
        "cache-control",
        "content-language",
        "content-length",
        "content-type",
        "expires",
        "last-modified",
        "pragma",
        "vary",
    }
)
# What a browser script may read of an answer besides the CORS-safelisted headers.
EXPOSED_HEADERS = (
    headers.RATELIMIT_LIMIT,
    headers.RATELIMIT_REMAINING,
    headers.RATELIMIT_RESET,
    headers.RATELIMIT,
    headers.RATELIMIT_POLICY,
    headers.QUOTA_LIMIT,
    headers.QUOTA_REMAINING,
    headers.QUOTA_RESET,
    headers.RETRY_AFTER,
    headers.CACHE,
    headers.REQUEST_ID,
    headers.AGE,
)


@dataclasses.dataclass(frozen=True, slots=True)
class CorsPolicy:
    """The allowed origins and the header values of every CORS answer, built once."""

    origins: frozenset[str]  # lowercased; empty with ``any_origin``
    any_origin: bool
    preflight_headers: tuple[tuple[str, str], ...]
    exposed: str

    @classmethod
    def build(
        cls, allowed_origins: Iterable[str], methods: Iterable[str], request_headers: Iterable[str]
    ) -> CorsPolicy:
        origins = frozenset(origin.lower() for origin in allowed_origins)
        allowed_headers = [headers.API_KEY, "content-type", headers.REQUEST_ID]
        allowed_headers += sorted(set(request_headers) - set(allowed_headers))
        return cls(
            origins=origins - {"*"},
            any_origin="*" in origins,
            preflight_headers=(
                ("access-control-allow-methods", ", ".join(methods)),
                ("access-control-allow-headers", ", ".join(allowed_headers)),
                ("access-control-max-age", str(PREFLIGHT_MAX_AGE_S)),
            ),
            exposed=", ".join(EXPOSED_HEADERS),
        )

    def allow_origin(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for a request's Origin, or None when that
        origin is not allowed."""
        if not origin:
            return None
        if self.any_origin:
            return "*"
        return origin if origin.lower() in self.origins else None

    def answer_preflight(self) -> Response | None:
        """before_request: a preflight for ``/api/v1`` is answered here, without a key, rate
        limit or upstream call; any other request goes on."""
        if (
            request.method != "OPTIONS"
            or "Access-Control-Request-Method" not in request.headers
            or "Origin" not in request.headers
            or not is_proxied(request.path)
        ):
            return None
        if self.allow_origin(request.headers["Origin"]) is None:
            # Refused plainly, so that a misconfigured origin shows in the gateway's log and the
            # browser's network panel alike.
            return error_response(
                403, "origin_not_allowed", "This origin may not call the API from a browser."
            )
        answer = Response(status=204, headers=list(self.preflight_headers))
        del answer.headers["content-type"]  # no body, no type
        return answer

    def add_headers(self, response: Response) -> Response:
        """after_request: every ``/api/v1`` answer varies by Origin; one for an allowed origin,
        errors included, says so and names the headers a script may read."""
        if not is_proxied(request.path):
            return response
        # A line of its own: the upstream's Vary lines stay exactly as they were sent.
        if not any(
            token.strip().lower() in ("origin", "*")
            for value in response.headers.getlist("vary")
            for token in value.split(",")
        ):
            response.headers.add("vary", "Origin")
        allowed = self.allow_origin(request.headers.get("Origin"))
        if allowed is not None:
            response.headers["access-control-allow-origin"] = allowed
            response.headers["access-control-expose-headers"] = self._exposed_for(response)
        return response

    def _exposed_for(self, response: Response) -> str:
        """The gateway's own headers, then every other one this answer carries that a script
        could not read otherwise (an upstream's pagination headers such as X-Total-Count)."""
        extra = [
            lowered
            for lowered in (name.lower() for name, _ in response.headers)
            if lowered not in _SAFELISTED_RESPONSE_HEADERS
            and lowered not in EXPOSED_HEADERS
            and not lowered.startswith("access-control-")
        ]
        if not extra:
            return self.exposed
        return ", ".join((self.exposed, *dict.fromkeys(extra)))


def init_app(app: Flask, policy: CorsPolicy | None) -> None:
    """Registered only when origins are configured: without CORS nothing is added per request."""
    if policy is None:
        return
    app.before_request(policy.answer_preflight)
    app.after_request(policy.add_headers)
