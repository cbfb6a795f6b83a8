"""Where a key stands against its limits and quota, and the headers that tell clients.

Each limit is a GCRA (a sliding, burst-bounded limit: at most ``max`` requests in any window,
with no doubling at window edges); a quota counts requests per UTC day or month. Both run
inside Redis, in the same script as the key check (``lua/access_check.lua``), so that a
request costs one round trip and every worker and replica shares one exact count.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math

from proxy_app import headers
from proxy_app.access.plans import Limit, Quota


@dataclasses.dataclass(frozen=True, slots=True)
class RateLimitState:
    """Where a key stands after this request: what is left, when the limit is whole again,
    and (when refused) how long to wait."""

    remaining: int
    reset_ms: int
    retry_after_ms: int = 0

    @classmethod
    def from_script(cls, remaining: int, reset_ms: int, retry_after_ms: int) -> RateLimitState:
        return cls(max(0, remaining), max(0, reset_ms), max(0, retry_after_ms))

    @property
    def reset_s(self) -> int:
        return math.ceil(self.reset_ms / 1000)

    @property
    def retry_after_s(self) -> int:
        """Whole seconds, at least 1 (a Retry-After of 0 invites an immediate retry)."""
        return retry_after_s(self.retry_after_ms)


@dataclasses.dataclass(frozen=True, slots=True)
class QuotaState:
    quota: Quota
    used: int
    reset_ms: int

    @property
    def remaining(self) -> int:
        return max(0, self.quota.max - self.used)

    @property
    def reset_s(self) -> int:
        return math.ceil(self.reset_ms / 1000)


def retry_after_s(milliseconds: int) -> int:
    """Whole seconds, at least 1 (a Retry-After of 0 invites an immediate retry)."""
    return max(1, math.ceil(milliseconds / 1000))


def quota_periods(now_s: float) -> tuple[str, int, str, int]:
    """The current UTC day and month, each as an id and the milliseconds until the next one:
    quotas refill at 00:00 UTC, monthly ones on the 1st."""
    moment = dt.datetime.fromtimestamp(now_s, dt.UTC)
    day_start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    next_day = day_start + dt.timedelta(days=1)
    month_start = day_start.replace(day=1)
    next_month = (month_start + dt.timedelta(days=32)).replace(day=1)
    return (
        day_start.strftime("%Y-%m-%d"),
        math.ceil((next_day.timestamp() - now_s) * 1000),
        month_start.strftime("%Y-%m"),
        math.ceil((next_month.timestamp() - now_s) * 1000),
    )


def policy_names(plan: str, limits: tuple[Limit, ...]) -> tuple[str, ...]:
    """A name per limit for the IETF fields: the plan's name for a plan of one limit, else the
    plan's name and the window (``"pro-1s"``, ``"pro-86400s"``)."""
    if len(limits) == 1:
        return (plan,)
    return tuple(f"{plan}-{limit.window_s}s" for limit in limits)


@functools.lru_cache(maxsize=1024)
def policy_header(plan: str, limits: tuple[Limit, ...], quota: Quota | None) -> str:
    """``RateLimit-Policy``: every limit of the key, and its quota (window: the period)."""
    items = [
        f'"{name}";q={limit.max};w={limit.window_s}'
        for name, limit in zip(policy_names(plan, limits), limits, strict=True)
    ]
    if quota is not None:
        window = 86_400 if quota.period == "day" else 2_678_400  # a 31-day month at most
        items.append(f'"{plan}-quota";q={quota.max};w={window}')
    return ", ".join(items)


def rate_limit_headers(
    plan: str,
    limits: tuple[Limit, ...],
    states: tuple[RateLimitState, ...],
    quota: QuotaState | None,
) -> list[tuple[str, str]]:
    """``x-ratelimit-*`` for the limit closest to exhaustion, the IETF ``RateLimit-Policy``
    (every policy) and ``RateLimit`` (the closest one), and ``x-quota-*`` for a quota."""
    if not limits:
        return []
    tightest = min(range(len(states)), key=lambda i: (states[i].remaining, -states[i].reset_ms))
    limit, state = limits[tightest], states[tightest]
    name = policy_names(plan, limits)[tightest]
    fields = [
        (headers.RATELIMIT_LIMIT, str(limit.max)),
        (headers.RATELIMIT_REMAINING, str(state.remaining)),
        (headers.RATELIMIT_RESET, str(state.reset_s)),
        (headers.RATELIMIT_POLICY, policy_header(plan, limits, quota.quota if quota else None)),
    ]
    if quota is not None and quota.remaining < state.remaining:
        fields.append((headers.RATELIMIT, f'"{plan}-quota";r={quota.remaining};t={quota.reset_s}'))
    else:
        fields.append((headers.RATELIMIT, f'"{name}";r={state.remaining};t={state.reset_s}'))
    if quota is not None:
        fields += [
            (headers.QUOTA_LIMIT, str(quota.quota.max)),
            (headers.QUOTA_REMAINING, str(quota.remaining)),
            (headers.QUOTA_RESET, str(quota.reset_s)),
        ]
    return fields
