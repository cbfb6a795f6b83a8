"""The check in front of ``/api/v1``: a valid, unrevoked, unexpired ``x-api-key`` within its
rate limit, or the request ends here (401, 429, or 503 when Redis cannot tell)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NoReturn

from proxy_app import headers
from proxy_app.access.keys import KeyNamespace, hash_key, key_id_of
from proxy_app.access.ratelimit import RateLimitPolicy, RateLimitState, rate_limit_headers
from proxy_app.errors import RedisOutage, TooManyRequests, Unauthorized
from proxy_app.metrics import Metrics
from proxy_app.redis import RedisService, RedisUnavailable

_API_KEY_ENVIRON = "HTTP_" + headers.API_KEY.upper().replace("-", "_")  # as WSGI names it
_OUTCOMES = frozenset({b"ok", b"limited", b"unknown", b"revoked", b"expired"})
#: The answer when Redis cannot tell whether a key may pass.
OUTAGE = RedisOutage(
    "auth_unavailable", "API keys cannot be checked right now; try again shortly.", 1
)
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
    # The entry asked to be read along (``also_read``), when it was: its bytes, b"" if absent.
    read_along: bytes | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """A request let through the key check: its key and where its rate limit stands."""

    key_id: str
    rate: RateLimitState
    read_along: bytes | None  # see AccessDecision.read_along
    limited: bool = False  # over its limit: refused by AccessGate.enforce_limit


class AccessGate:
    """Checks a key and charges its rate limit in one Redis round trip."""

    def __init__(
        self, redis: RedisService, prefix: str, policy: RateLimitPolicy, metrics: Metrics
    ) -> None:
        self.redis = redis
        self.names = KeyNamespace(prefix)
        self.policy = policy
        self.metrics = metrics
        self._script = redis.script(__file__, "access_check.lua")

    def check(self, key_id: str, raw_key: str, also_read: str | None = None) -> AccessDecision:
        """Check the key and charge its limit; with ``also_read``, also read that Redis key when
        the request is allowed. Raises RedisUnavailable when the answer cannot be had."""
        keys = [self.names.record(key_id), self.names.rate(key_id)]
        if also_read is not None:
            keys.append(also_read)
        args: list[str | int] = [hash_key(raw_key), self.policy.limit, self.policy.window_ms]
        reply = self.redis.run_script(self._script, keys, args)
        if not isinstance(reply, list) or not reply or reply[0] not in _OUTCOMES:
            # Not an answer this script gives: never read anything else as "allowed".
            raise RedisUnavailable("the key check got an unexpected reply")
        outcome = reply[0].decode()
        if outcome not in ("ok", "limited"):
            return AccessDecision(outcome)
        state = RateLimitState.from_script(int(reply[1]), int(reply[2]), int(reply[3]))
        read_along = None
        if also_read is not None and len(reply) > 4:
            read_along = reply[4] or b""
        return AccessDecision(outcome, state, read_along)

    def admit(self, environ: Mapping[str, Any], also_read: str | None = None) -> Admission:
        """The key check of a request (its WSGI environ) and the charge to its rate limit: the
        admission, or Unauthorized (RedisUnavailable when Redis cannot tell: see OUTAGE). A key
        over its limit is admitted too, for ``enforce_limit`` to refuse once the request has
        recorded where its limit stands."""
        raw_key = environ.get(_API_KEY_ENVIRON, "").strip()
        if not raw_key:
            self._reject("missing")
        key_id = key_id_of(raw_key)
        if key_id is None:
            self._reject("invalid")
        try:
            decision = self.check(key_id, raw_key, also_read)
        except RedisUnavailable:
            self.metrics.auth_rejections.labels("unavailable").inc()
            raise
        if decision.rate is None:  # unknown, revoked or expired
            self._reject("invalid" if decision.outcome == "unknown" else decision.outcome)
        if decision.outcome == "limited":
            return Admission(key_id, decision.rate, None, limited=True)
        return Admission(key_id, decision.rate, decision.read_along)

    def enforce_limit(self, admission: Admission) -> None:
        """429 when the admitted request is over its key's rate limit."""
        if not admission.limited:
            return
        rate = admission.rate
        self.metrics.rate_limited.inc()
        raise TooManyRequests(
            "Rate limit exceeded for this API key.",
            headers={headers.RETRY_AFTER: str(rate.retry_after_s)},
            retryAfter=rate.retry_after_s,
        )

    def rate_limit_headers(self, state: RateLimitState) -> dict[str, str]:
        return rate_limit_headers(self.policy, state)

    def _reject(self, reason: str) -> NoReturn:
        self.metrics.auth_rejections.labels(reason).inc()
        raise Unauthorized(_REJECTIONS[reason], code=f"{reason}_api_key")
