"""The per-key rate limit: its policy and the headers that tell clients where they stand.

The algorithm is GCRA (a sliding, burst-bounded limit: at most ``limit`` requests in any
``window``, with no doubling at window edges). It runs inside Redis, in the same script as the
key check (``lua/access_check.lua``), so that a request costs one round trip and every worker
and replica shares one exact count.
"""

from __future__ import annotations

import dataclasses
import math

from proxy_app import headers


@dataclasses.dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    limit: int
    window_s: int

    @property
    def window_ms(self) -> int:
        return self.window_s * 1000


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
        return max(1, math.ceil(self.retry_after_ms / 1000))


def rate_limit_headers(policy: RateLimitPolicy, state: RateLimitState) -> dict[str, str]:
    """``x-ratelimit-*`` and the IETF ``RateLimit-Policy`` / ``RateLimit`` fields."""
    return {
        headers.RATELIMIT_LIMIT: str(policy.limit),
        headers.RATELIMIT_REMAINING: str(state.remaining),
        headers.RATELIMIT_RESET: str(state.reset_s),
        headers.RATELIMIT_POLICY: f'"default";q={policy.limit};w={policy.window_s}',
        headers.RATELIMIT: f'"default";r={state.remaining};t={state.reset_s}',
    }
