"""Grace mode: keyed requests keep being served while the keys' Redis is away.

Off by default (``API_KEYS_OUTAGE_GRACE_SECONDS=0``: fail closed). When on, each worker
remembers the keys it validated, by key id with the key's hash (never the raw key): whether
the key was valid, when it expires, its plan's limits and whether scopes or addresses restrict
it. While Redis cannot be asked, a key validated within the grace period is served under a
local limit (each limit divided by ``API_KEYS_OUTAGE_SHARE``, the number of workers times
replicas that share the traffic), and its answers say ``x-auth-mode: grace``. A key the worker
never validated still gets 503; a key it last saw revoked, deleted or expired gets 401.

Revocations, deletions and changes of a key are published on a Redis channel
(``<prefix>:key-events``) and each worker listens, so a key revoked before an outage is never
served in grace, not even by a worker that has not seen a request of it since. What is revoked
during an outage cannot reach the gateway until Redis is back. When the listener loses its
subscription, the worker forgets everything it remembered (events may have been missed).
Quotas are not counted in grace, and keys restricted by scopes or addresses are not served in
grace (503): the memory keeps only what a plain key needs.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from proxy_app.access.plans import Limit
from proxy_app.access.ratelimit import RateLimitState

log = logging.getLogger(__name__)

# Keys remembered per worker; the least recently validated are forgotten first.
CAPACITY = 10_000
# Between attempts to subscribe again after the listener lost Redis.
RESUBSCRIBE_DELAY_S = 1.0


@dataclasses.dataclass(slots=True)
class _Remembered:
    key_hash: str
    status: str  # valid, revoked, expired, deleted
    validated_at: float  # monotonic
    expires_at_ms: int  # 0: never
    plan: str
    limits: tuple[Limit, ...]
    restricted: bool
    tats: list[float]  # the local limits' theoretical arrival times (monotonic ms)


@dataclasses.dataclass(frozen=True, slots=True)
class GraceVerdict:
    outcome: str  # ok, limited, revoked, expired, deleted, unknown
    plan: str = ""
    limits: tuple[Limit, ...] = ()
    states: tuple[RateLimitState, ...] = ()
    retry_after_ms: int = 0


class GraceMemory:
    def __init__(self, grace_s: int, share: int, capacity: int = CAPACITY) -> None:
        self.grace_s = grace_s
        self.share = max(1, share)
        self.capacity = capacity
        self._keys: collections.OrderedDict[str, _Remembered] = collections.OrderedDict()
        self._lock = threading.Lock()

    def remember(
        self,
        key_id: str,
        key_hash: str,
        *,
        plan: str,
        limits: tuple[Limit, ...],
        expires_at_ms: int,
        restricted: bool,
    ) -> None:
        """A request of this key was just judged valid by Redis."""
        with self._lock:
            entry = self._keys.get(key_id)
            if entry is not None and entry.key_hash == key_hash and entry.limits == limits:
                entry.status, entry.validated_at = "valid", time.monotonic()
                entry.expires_at_ms, entry.plan, entry.restricted = expires_at_ms, plan, restricted
                self._keys.move_to_end(key_id)
                return
            self._keys[key_id] = _Remembered(
                key_hash,
                "valid",
                time.monotonic(),
                expires_at_ms,
                plan,
                limits,
                restricted,
                [0.0] * len(limits),
            )
            self._keys.move_to_end(key_id)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)

    def mark(self, key_id: str, status: str) -> None:
        """Redis said (or an event told) that the key is revoked, expired or deleted."""
        with self._lock:
            entry = self._keys.get(key_id)
            if entry is not None:
                entry.status = status

    def forget(self, key_id: str | None = None) -> None:
        """Forget one key (it changed: its next request asks Redis), or every key."""
        with self._lock:
            if key_id is None:
                self._keys.clear()
            else:
                self._keys.pop(key_id, None)

    def judge(self, key_id: str, key_hash: str, now_ms: int) -> GraceVerdict:
        """While Redis is away: may this key be served, under its local limits?"""
        with self._lock:
            entry = self._keys.get(key_id)
            if entry is None or not hmac.compare_digest(entry.key_hash, key_hash):
                return GraceVerdict("unknown")
            if entry.status != "valid":
                return GraceVerdict(entry.status)
            if entry.expires_at_ms and now_ms >= entry.expires_at_ms:
                return GraceVerdict("expired")
            if entry.restricted or time.monotonic() - entry.validated_at > self.grace_s:
                return GraceVerdict("unknown")
            return self._charge(entry)

    def _charge(self, entry: _Remembered) -> GraceVerdict:
        """GCRA per limit, as in Redis, with each limit's share of the requests."""
        now = time.monotonic() * 1000
        states = []
        updates = []
        retry_after = 0.0
        for index, limit in enumerate(entry.limits):
            allowed = max(1, limit.max // self.share)
            window = limit.window_s * 1000
            interval = window / allowed
            tat = max(entry.tats[index], now)
            new_tat = tat + interval
            if new_tat - now > window + 0.001:
                retry_after = max(retry_after, new_tat - window - now)
                states.append(RateLimitState(0, int(tat - now) + 1))
            else:
                remaining = int((window - (new_tat - now)) / interval + 0.001)
                states.append(RateLimitState(remaining, int(new_tat - now) + 1))
                updates.append((index, new_tat))
        shown = tuple(
            Limit(max(1, limit.max // self.share), limit.window_s) for limit in entry.limits
        )
        if retry_after:
            return GraceVerdict("limited", entry.plan, shown, tuple(states), int(retry_after) + 1)
        for index, new_tat in updates:
            entry.tats[index] = new_tat
        return GraceVerdict("ok", entry.plan, shown, tuple(states))


class KeyEventListener:
    """Follows ``<prefix>:key-events`` in a thread (a greenlet under gevent) of the worker
    and applies each event to the memory: ``revoked:<id>``, ``deleted:<id>``, ``changed:<id>``.

    When the subscription is lost (Redis went away), the memory is kept: that is what it is for.
    Once subscribed again, it is forgotten whole, since events may have been missed meanwhile;
    keys are then judged by Redis again, one request each."""

    def __init__(self, memory: GraceMemory, subscribe: Callable[[], Any], channel: str) -> None:
        self.memory = memory
        self._subscribe = subscribe
        self.channel = channel
        self._started = False
        self._lock = threading.Lock()
        self.subscribed = threading.Event()  # set while the subscription stands

    def ensure_started(self) -> None:
        """Started on first use, in the worker process (threads do not survive a fork)."""
        if self._started:
            return
        with self._lock:
            if self._started:
                return
            self._started = True
            threading.Thread(target=self._run, name="key-events", daemon=True).start()

    def _run(self) -> None:
        missed = False
        while True:
            try:
                self._listen(forget_first=missed)
            except Exception as exc:  # whatever broke the subscription, events may be lost
                log.debug("key events subscription lost", extra={"reason": type(exc).__name__})
            self.subscribed.clear()
            missed = True
            time.sleep(RESUBSCRIBE_DELAY_S)

    def _listen(self, *, forget_first: bool) -> None:
        pubsub = self._subscribe()
        try:
            pubsub.subscribe(self.channel)
            # The subscription is confirmed before anything is forgotten: what the memory
            # learns from here on is complete.
            while pubsub.get_message(timeout=1.0) is None and not pubsub.subscribed:
                pass
            if forget_first:
                self.memory.forget()
            self.subscribed.set()
            while True:
                message = pubsub.get_message(timeout=5.0)
                if message is None or message.get("type") != "message":
                    continue
                event, _, key_id = message["data"].decode().partition(":")
                if event == "changed":
                    self.memory.forget(key_id)
                elif event in ("revoked", "deleted"):
                    self.memory.mark(key_id, event)
        finally:
            pubsub.close()
