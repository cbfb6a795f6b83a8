"""The check in front of ``/api/v1``: a valid, unrevoked, unexpired ``x-api-key`` used within
its scopes and allowed addresses, and within every limit and the quota of its plan, or the
request ends here (401, 403, 429, or 503 when Redis cannot tell)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any, NoReturn

from proxy_app import headers
from proxy_app.access.addresses import ClientAddresses, address_hex
from proxy_app.access.grace import GraceMemory, KeyEventListener
from proxy_app.access.keys import KeyNamespace, hash_key, key_id_of
from proxy_app.access.plans import (
    DEFAULT_PLAN,
    Limit,
    decode_limits,
    decode_quota,
    encode_limits,
)
from proxy_app.access.ratelimit import (
    QuotaState,
    RateLimitState,
    quota_periods,
    rate_limit_headers,
    retry_after_s,
)
from proxy_app.errors import Forbidden, RedisOutage, TooManyRequests, Unauthorized
from proxy_app.metrics import Metrics
from proxy_app.redis import RedisService, RedisUnavailable

_API_KEY_ENVIRON = "HTTP_" + headers.API_KEY.upper().replace("-", "_")  # as WSGI names it
_REFUSED = frozenset({b"unknown", b"revoked", b"expired", b"forbidden_scope", b"ip_not_allowed"})
_CHARGED = frozenset({b"ok", b"deferred", b"limited", b"quota_exceeded"})
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
_FORBIDDEN = {
    "forbidden_scope": "This API key may not be used for this method or path.",
    "ip_not_allowed": "This API key may not be used from this address.",
}
_PERIOD_MEMO: list[Any] = [None, None]  # [whole second, quota_periods() of it]


@dataclasses.dataclass(frozen=True, slots=True)
class AccessDecision:
    # ok, deferred (cache hits free: nothing charged yet), limited, quota_exceeded, unknown,
    # revoked, expired, forbidden_scope, ip_not_allowed
    outcome: str
    plan: str = DEFAULT_PLAN
    limits: tuple[Limit, ...] = ()
    states: tuple[RateLimitState, ...] = ()
    quota: QuotaState | None = None
    retry_after_ms: int = 0
    # The entry asked to be read along (``also_read``), when it was: its bytes, b"" if absent.
    read_along: bytes | None = None
    grace: bool = False  # judged from the worker's memory while Redis was away

    def headers(self) -> list[tuple[str, str]]:
        """Where the key stands: every answer to a known key carries these."""
        fields = rate_limit_headers(self.plan, self.limits, self.states, self.quota)
        if self.grace:
            fields.append((headers.AUTH_MODE, "grace"))
        return fields


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """A request let through the key check: its key and where its limits stand. A request over
    a limit or its quota is admitted too, for ``AccessGate.enforce_limit`` to refuse once the
    request has recorded where its limits stand."""

    key_id: str
    decision: AccessDecision

    @property
    def deferred(self) -> bool:
        """Nothing charged yet: the plan makes cache hits free (see ``charge_deferred``)."""
        return self.decision.outcome == "deferred"


class AccessGate:
    """Checks a key, its scopes and addresses, and charges every limit and the quota of its
    plan, in one Redis round trip."""

    def __init__(
        self,
        redis: RedisService,
        prefix: str,
        default_limit: Limit,
        metrics: Metrics,
        addresses: ClientAddresses | None = None,
        grace: GraceMemory | None = None,
    ) -> None:
        self.redis = redis
        self.names = KeyNamespace(prefix)
        self.prefix = prefix
        self.default_limits = encode_limits((default_limit,))
        self.metrics = metrics
        self.addresses = addresses or ClientAddresses(())
        self.grace = grace
        self._listener = (
            KeyEventListener(grace, redis.subscriber, self.names.events)
            if grace is not None
            else None
        )
        self._script = redis.script(__file__, "access_check.lua")

    def check(
        self,
        key_id: str,
        raw_key: str,
        *,
        method: str = "GET",
        path: str = "/",
        client_address: str = "",
        also_read: str | None = None,
        charge: bool = False,
    ) -> AccessDecision:
        """Check the key and charge its limits; with ``also_read``, also read that Redis key
        when the request is allowed. ``charge``: charge even on a plan whose cache hits are free
        (the request is going upstream). Raises RedisUnavailable when the answer cannot be
        had."""
        keys = [self.names.record(key_id)]
        if also_read is not None:
            keys.append(also_read)
        if self._listener is not None:
            self._listener.ensure_started()
        key_hash = hash_key(raw_key)
        second = int(time.time())
        if _PERIOD_MEMO[0] != second:
            _PERIOD_MEMO[1] = quota_periods(second)
            _PERIOD_MEMO[0] = second
        day, day_reset, month, month_reset = _PERIOD_MEMO[1]
        args: list[str | int] = [
            key_hash,
            key_id,
            self.prefix,
            self.default_limits,
            method,
            path,
            address_hex(client_address) if client_address else "",
            day,
            day_reset,
            month,
            month_reset,
            "charge" if charge else "auto",
        ]
        reply = self.redis.run_script(self._script, keys, args)
        if not isinstance(reply, list) or not reply:
            raise RedisUnavailable("the key check got an unexpected reply")
        outcome = reply[0]
        if outcome in _REFUSED:
            if self.grace is not None and outcome in (b"revoked", b"expired"):
                # The hash matched: this key, not a guess at its id, is refused now.
                self.grace.mark(key_id, outcome.decode())
            return AccessDecision(outcome.decode())
        if outcome not in _CHARGED or len(reply) < 10:
            # Not an answer this script gives: never read anything else as "allowed".
            raise RedisUnavailable("the key check got an unexpected reply")
        limits = decode_limits(reply[2].decode())
        quota = decode_quota((reply[3] or b"").decode())
        states = tuple(
            RateLimitState.from_script(int(reply[i]), int(reply[i + 1]), 0)
            for i in range(10, len(reply) - 1, 2)
        )
        if self.grace is not None:
            self.grace.remember(
                key_id,
                key_hash,
                plan=reply[1].decode(),
                limits=limits,
                expires_at_ms=int(reply[8]),
                restricted=reply[9] == 1,
            )
        return AccessDecision(
            outcome.decode(),
            reply[1].decode(),
            limits,
            states,
            QuotaState(quota, int(reply[5]), int(reply[6])) if quota is not None else None,
            int(reply[4]),
            (reply[7] or b"") if also_read is not None else None,
        )

    def admit(
        self,
        environ: Mapping[str, Any],
        *,
        path: str,
        also_read: str | None = None,
        charge: bool = False,
    ) -> Admission:
        """The key check of a request (its WSGI environ; ``path`` under /api/v1, for scopes)
        and the charge to its limits: the admission, or Unauthorized / Forbidden
        (RedisUnavailable when Redis cannot tell: see OUTAGE)."""
        raw_key = environ.get(_API_KEY_ENVIRON, "").strip()
        if not raw_key:
            self._reject("missing")
        key_id = key_id_of(raw_key)
        if key_id is None:
            self._reject("invalid")
        try:
            decision = self.check(
                key_id,
                raw_key,
                method=environ["REQUEST_METHOD"],
                path=path,
                client_address=self.addresses.of(environ),
                also_read=also_read,
                charge=charge,
            )
        except RedisUnavailable:
            decision = self._judged_in_grace(key_id, raw_key)
        outcome = decision.outcome
        if outcome in ("unknown", "revoked", "expired"):
            self._reject("invalid" if outcome == "unknown" else outcome)
        if outcome in _FORBIDDEN:
            self.metrics.auth_rejections.labels(outcome).inc()
            raise Forbidden(_FORBIDDEN[outcome], code=outcome, keyId=key_id)
        return Admission(key_id, decision)

    def enforce_limit(self, admission: Admission) -> None:
        """429 when the admitted request is over one of its key's limits or its quota."""
        decision = admission.decision
        if decision.outcome not in ("limited", "quota_exceeded"):
            return
        retry_after = retry_after_s(decision.retry_after_ms)
        self.metrics.rate_limited.inc()
        if decision.outcome == "quota_exceeded" and decision.quota is not None:
            raise TooManyRequests(
                "The quota of this API key is used up until it refills.",
                code="quota_exceeded",
                headers={headers.RETRY_AFTER: str(retry_after)},
                retryAfter=retry_after,
                quota=decision.quota.quota.to_json(),
            )
        raise TooManyRequests(
            "Rate limit exceeded for this API key.",
            headers={headers.RETRY_AFTER: str(retry_after)},
            retryAfter=retry_after,
        )

    def _judged_in_grace(self, key_id: str, raw_key: str) -> AccessDecision:
        """Redis cannot be asked: with grace mode on, what this worker remembers of the key;
        else (or for a key it cannot vouch for) RedisUnavailable again."""
        if self.grace is None:
            self.metrics.auth_rejections.labels("unavailable").inc()
            raise RedisUnavailable("the key check cannot be had")
        verdict = self.grace.judge(key_id, hash_key(raw_key), int(time.time() * 1000))
        self.metrics.auth_grace.labels(verdict.outcome).inc()
        if verdict.outcome in ("revoked", "expired"):
            self._reject(verdict.outcome)
        if verdict.outcome == "deleted":
            self._reject("invalid")
        if verdict.outcome not in ("ok", "limited"):
            self.metrics.auth_rejections.labels("unavailable").inc()
            raise RedisUnavailable("the key check cannot be had")
        return AccessDecision(
            verdict.outcome,
            verdict.plan,
            verdict.limits,
            verdict.states,
            retry_after_ms=verdict.retry_after_ms,
            grace=True,
        )

    def _reject(self, reason: str) -> NoReturn:
        self.metrics.auth_rejections.labels(reason).inc()
        raise Unauthorized(_REJECTIONS[reason], code=f"{reason}_api_key")
