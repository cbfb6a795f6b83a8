"""What one request has learnt on its way through the gateway, kept in one typed object.

Made by the first hook and stored once in ``flask.g``; each later step fills in its part, and
the request log line is built from it at the end.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import TYPE_CHECKING

from flask import g

if TYPE_CHECKING:
    from proxy_app.access.check import AccessDecision
    from proxy_app.cache.store import Prefetched
    from proxy_app.forwarding import ProxyRequest

_G_NAME = "request_state"


@dataclasses.dataclass(slots=True)
class RequestState:
    request_id: str
    started: float  # time.perf_counter() when the request came in
    request_id_token: contextvars.Token[str | None] | None = None  # the logging context's
    proxy: ProxyRequest | None = None  # what a proxied request asks of the upstream
    key_id: str | None = None
    access: AccessDecision | None = None  # the key check's verdict: plan, limits, quota
    prefetched: Prefetched | None = None  # the cache entry read along with the key check
    cache: str | None = None  # the cache outcome (x-cache)
    upstream_status: int | None = None
    upstream_ms: float | None = None

    def log_fields(self) -> dict[str, object]:
        """The request line's fields this state knows (those still unset are left out)."""
        fields: dict[str, object] = {}
        if self.upstream_status is not None:
            fields["upstream_status"] = self.upstream_status
        if self.upstream_ms is not None:
            fields["upstream_ms"] = self.upstream_ms
        if self.cache is not None:
            fields["cache"] = self.cache
        if self.key_id is not None:
            fields["key_id"] = self.key_id
        return fields


def begin(state: RequestState) -> RequestState:
    """Store the request's state; called once, by the first hook."""
    setattr(g, _G_NAME, state)
    return state


def current() -> RequestState:
    """The state of the request being handled."""
    state: RequestState = getattr(g, _G_NAME)
    return state


def ended() -> RequestState | None:
    """The state for teardown, taken out of ``g``; None when the first hook never ran."""
    state: RequestState | None = g.pop(_G_NAME, None)
    return state
