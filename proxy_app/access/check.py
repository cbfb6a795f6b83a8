"""The check in front of ``/api/v1``: a valid, unrevoked, unexpired ``x-api-key`` within its
rate limit, or the request ends here (401, 429, or 503 when Redis cannot tell)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, NoReturn

from flask import Response, g, request

from proxy_app import services
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
from proxy_app.cache.store import Prefetched
from proxy_app.errors import Forbidden, ServiceUnavailable, TooManyRequests, Unauthorized
from proxy_app.redis import RedisService, RedisUnavailable

API_KEY_HEADER = "x-api-key"
_API_KEY_ENVIRON = "HTTP_" + API_KEY_HEADER.upper().replace("-", "_")  # as WSGI names it
_REFUSED = frozenset({b"unknown", b"revoked", b"expired", b"forbidden_scope", b"ip_not_allowed"})
_CHARGED = frozenset({b"ok", b"deferred", b"limited", b"quota_exceeded"})
_SCRIPT = (Path(__file__).with_name("lua") / "access_check.lua").read_text()
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
    prefetched: Prefetched | None = None
    grace: bool = False  # judged from the worker's memory while Redis was away

    def headers(self) -> list[tuple[str, str]]:
        headers = rate_limit_headers(self.plan, self.limits, self.states, self.quota)
        if self.grace:
            headers.append(("x-auth-mode", "grace"))
        return headers


class AccessGate:
    """Checks a key, its scopes and addresses, and charges every limit and the quota of its
    plan, in one Redis round trip."""

    def __init__(
        self,
        redis: RedisService,
        prefix: str,
        default_limit: Limit,
        addresses: ClientAddresses | None = None,
        grace: GraceMemory | None = None,
    ) -> None:
        self.redis = redis
        self.names = KeyNamespace(prefix)
        self.prefix = prefix
        self.default_limits = encode_limits((default_limit,))
        self.addresses = addresses or ClientAddresses(())
        self._script = redis.client.register_script(_SCRIPT)
        self.grace = grace
        self._listener = (
            KeyEventListener(grace, redis.subscriber, self.names.events)
            if grace is not None
            else None
        )

    def check(
        self,
        key_id: str,
        raw_key: str,
        *,
        method: str = "GET",
        path: str = "/",
        client_address: str = "",
        prefetch: str | None = None,
        charge: bool = False,
    ) -> AccessDecision:
        """Check the key and charge its limits; with ``prefetch``, also read that Redis key when
        the request is allowed. ``charge``: charge even on a plan whose cache hits are free
        (the request is going upstream). Raises RedisUnavailable when the answer cannot be
        had."""
        keys = [self.names.record(key_id)]
        if prefetch is not None:
            keys.append(prefetch)
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
        prefetched = None
        if prefetch is not None:
            prefetched = Prefetched(prefetch, reply[7] or None)
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
            prefetched,
        )


def enforce_api_key() -> None:
    """before_request of the proxy: the key check, scopes, addresses, limits and quota."""
    raw_key = request.environ.get(_API_KEY_ENVIRON, "").strip()
    if not raw_key:
        _reject("missing")
    key_id = key_id_of(raw_key)
    if key_id is None:
        _reject("invalid")
    gate = services.access_gate()
    state = g._get_current_object()  # one context lookup for the several uses below
    planned = state.get("proxy_request")
    try:
        # The proxy may have named, in g, a cache entry it will want: read in the same trip.
        decision = gate.check(
            key_id,
            raw_key,
            method=request.method,
            path=(planned.target if planned is not None else None) or "",
            client_address=gate.addresses.of(request.environ),
            prefetch=state.get("cache_prefetch_key"),
        )
    except RedisUnavailable:
        decision = _judged_in_grace(gate, key_id, raw_key)
    _judge(decision, key_id)
    state.key_id = key_id
    state.access = decision
    state.cache_prefetched = decision.prefetched


def charge_deferred() -> None:
    """For a plan whose cache hits are free: charge a request that is going to the upstream
    after all (a second round trip, on the way to a slower one)."""
    state = g._get_current_object()
    decision: AccessDecision | None = state.get("access")
    if decision is None or decision.outcome != "deferred":
        return
    gate = services.access_gate()
    raw_key = request.environ.get(_API_KEY_ENVIRON, "").strip()
    planned = state.get("proxy_request")
    try:
        charged = gate.check(
            state.key_id,
            raw_key,
            method=request.method,
            path=(planned.target if planned is not None else None) or "",
            client_address=gate.addresses.of(request.environ),
            charge=True,
        )
    except RedisUnavailable:
        _unavailable()
    state.access = charged
    _judge(charged, state.key_id)


def _judge(decision: AccessDecision, key_id: str) -> None:
    outcome = decision.outcome
    if outcome in ("ok", "deferred"):
        return
    if outcome in ("unknown", "revoked", "expired"):
        _reject("invalid" if outcome == "unknown" else outcome)
    if outcome in _FORBIDDEN:
        services.metrics().auth_rejections.labels(outcome).inc()
        raise Forbidden(_FORBIDDEN[outcome], code=outcome, keyId=key_id)
    retry_after = retry_after_s(decision.retry_after_ms)
    g.access = decision  # a refused answer still says where the key stands
    if outcome == "quota_exceeded" and decision.quota is not None:
        services.metrics().rate_limited.inc()
        raise TooManyRequests(
            "The quota of this API key is used up until it refills.",
            code="quota_exceeded",
            headers={"retry-after": str(retry_after)},
            retryAfter=retry_after,
            quota=decision.quota.quota.to_json(),
        )
    services.metrics().rate_limited.inc()
    raise TooManyRequests(
        "Rate limit exceeded for this API key.",
        headers={"retry-after": str(retry_after)},
        retryAfter=retry_after,
    )


def _judged_in_grace(gate: AccessGate, key_id: str, raw_key: str) -> AccessDecision:
    """Redis cannot be asked: with grace mode on, what this worker remembers of the key."""
    if gate.grace is None:
        _unavailable()
    verdict = gate.grace.judge(key_id, hash_key(raw_key), int(time.time() * 1000))
    metrics = services.metrics()
    metrics.auth_grace.labels(verdict.outcome).inc()
    if verdict.outcome in ("revoked", "expired"):
        _reject(verdict.outcome)
    if verdict.outcome == "deleted":
        _reject("invalid")
    if verdict.outcome not in ("ok", "limited"):
        _unavailable()
    return AccessDecision(
        verdict.outcome,
        verdict.plan,
        verdict.limits,
        verdict.states,
        retry_after_ms=verdict.retry_after_ms,
        grace=True,
    )


def _unavailable() -> NoReturn:
    services.metrics().auth_rejections.labels("unavailable").inc()
    raise ServiceUnavailable(
        "API keys cannot be checked right now; try again shortly.",
        code="auth_unavailable",
        headers={"retry-after": "1"},
    ) from None


def add_rate_limit_headers(response: Response) -> Response:
    """after_request of the proxy: every answer to a known key says where its limits stand."""
    decision: AccessDecision | None = g.get("access")
    if decision is not None and decision.limits:
        # Appended: no answer carries these names before this point (upstream ones are not
        # passed on), so there is nothing to replace.
        response.headers.extend(decision.headers())
    return response


def _reject(reason: str) -> NoReturn:
    services.metrics().auth_rejections.labels(reason).inc()
    raise Unauthorized(_REJECTIONS[reason], code=f"{reason}_api_key")
