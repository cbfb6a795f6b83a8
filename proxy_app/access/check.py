"""The check in front of ``/api/v1``: a valid, unrevoked, unexpired ``x-api-key`` within its
rate limit, or the request ends here (401, 429, or 503 when Redis cannot tell)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NoReturn

from flask import Response, request

from proxy_app import request_state, services
from proxy_app.access.keys import KeyNamespace, hash_key, key_id_of
from proxy_app.access.ratelimit import RateLimitPolicy, RateLimitState, rate_limit_headers
from proxy_app.cache.store import Prefetched
from proxy_app.errors import ServiceUnavailable, TooManyRequests, Unauthorized
from proxy_app.redis import RedisService, RedisUnavailable

API_KEY_HEADER = "x-api-key"
_API_KEY_ENVIRON = "HTTP_" + API_KEY_HEADER.upper().replace("-", "_")  # as WSGI names it
_OUTCOMES = frozenset({b"ok", b"limited", b"unknown", b"revoked", b"expired"})
_SCRIPT = (Path(__file__).with_name("lua") / "access_check.lua").read_text()
_REJECTIONS = {
    "missing": "An x-api-key header is required.",
    "invalid": "The API key is not valid.",
    "revoked": "The API key has been revoked.",
    "expired": "The API key has expired.",
}


@dataclasses.dataclass(frozen=True, slots=True)
class AccessDecision:
    outcome: str  # ok, unknown, revoked, expired, limited
    rate: RateLimitState | None = None
    prefetched: Prefetched | None = None


class AccessGate:
    """Checks a key and charges its rate limit in one Redis round trip."""

    def __init__(self, redis: RedisService, prefix: str, policy: RateLimitPolicy) -> None:
        self.redis = redis
        self.names = KeyNamespace(prefix)
        self.policy = policy
        self._script = redis.client.register_script(_SCRIPT)

    def check(self, key_id: str, raw_key: str, prefetch: str | None = None) -> AccessDecision:
        """Check the key and charge its limit; with ``prefetch``, also read that Redis key when
        the request is allowed. Raises RedisUnavailable when the answer cannot be had."""
        keys = [self.names.record(key_id), self.names.rate(key_id)]
        if prefetch is not None:
            keys.append(prefetch)
        args: list[str | int] = [hash_key(raw_key), self.policy.limit, self.policy.window_ms]
        reply = self.redis.run_script(self._script, keys, args)
        if not isinstance(reply, list) or not reply or reply[0] not in _OUTCOMES:
            # Not an answer this script gives: never read anything else as "allowed".
            raise RedisUnavailable("the key check got an unexpected reply")
        outcome = reply[0].decode()
        if outcome not in ("ok", "limited"):
            return AccessDecision(outcome)
        state = RateLimitState.from_script(int(reply[1]), int(reply[2]), int(reply[3]))
        prefetched = None
        if prefetch is not None and len(reply) > 4:
            prefetched = Prefetched(prefetch, reply[4] or None)
        return AccessDecision(outcome, state, prefetched)


def enforce_api_key() -> None:
    """before_request of the proxy: the key check, then the rate limit."""
    raw_key = request.environ.get(_API_KEY_ENVIRON, "").strip()
    if not raw_key:
        _reject("missing")
    key_id = key_id_of(raw_key)
    if key_id is None:
        _reject("invalid")
    gate = services.access_gate()
    state = request_state.current()
    plan = state.proxy
    try:
        # The proxy may have named a cache entry it will want: read in the same trip.
        decision = gate.check(key_id, raw_key, plan.prefetch_key if plan is not None else None)
    except RedisUnavailable:
        services.metrics().auth_rejections.labels("unavailable").inc()
        raise ServiceUnavailable(
            "API keys cannot be checked right now; try again shortly.",
            code="auth_unavailable",
            headers={"retry-after": "1"},
        ) from None
    if decision.outcome in ("unknown", "revoked", "expired"):
        _reject("invalid" if decision.outcome == "unknown" else decision.outcome)
    state.key_id = key_id
    state.rate_limit = decision.rate
    state.prefetched = decision.prefetched
    if decision.outcome == "limited" and decision.rate is not None:
        services.metrics().rate_limited.inc()
        raise TooManyRequests(
            "Rate limit exceeded for this API key.",
            headers={"retry-after": str(decision.rate.retry_after_s)},
            retryAfter=decision.rate.retry_after_s,
        )


def add_rate_limit_headers(response: Response) -> Response:
    """after_request of the proxy: every answer to a known key says where its limit stands."""
    state = request_state.current().rate_limit
    if state is not None:
        # Appended: no answer carries these names before this point (upstream ones are not
        # passed on), so there is nothing to replace.
        response.headers.extend(rate_limit_headers(services.access_gate().policy, state))
    return response


def _reject(reason: str) -> NoReturn:
    services.metrics().auth_rejections.labels(reason).inc()
    raise Unauthorized(_REJECTIONS[reason], code=f"{reason}_api_key")
