"""CacheService: cache-aside over Redis with stale-while-revalidate, stale-if-error and request
coalescing, for opaque byte values.

``wrap(key, loader)``: fresh -> the stored value; stale within its window -> the stored value
now and one background refresh (at most one per key across all workers and replicas, by a short
Redis lock); expired or missing -> one load per key at a time (waiters in this worker share it,
other workers poll for its result for a bounded time, then load themselves). When Redis fails,
every operation degrades to pass-through and the caller is told (outcome BYPASS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import secrets
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from proxy_app.redis import RedisService, RedisUnavailable

log = logging.getLogger(__name__)

# How often a worker waiting for another worker's load looks for its result.
POLL_INTERVAL_S = 0.02
# After a load whose result was not stored, waiters elsewhere are told so for this long.
PASS_MARKER_TTL_MS = 1000
# Keys this worker remembers as uncacheable, at most.
PASS_MEMORY_SIZE = 10_000
_PASS = b"pass"
# Keys SCAN looks at per step, and keys one UNLINK removes at most.
SCAN_COUNT = 1000
DELETE_BATCH = 500
_HEADER = struct.Struct("!4sdddd")
_MAGIC = b"PXC1"


class Outcome(enum.StrEnum):
    HIT = "HIT"
    MISS = "MISS"
    STALE = "STALE"
    REVALIDATED = "REVALIDATED"
    BYPASS = "BYPASS"


class Unstored(Protocol):
    """An answer a load got and will not store (a body still arriving, say): it serves the one
    caller whose load got it, never those waiting on that load, and is closed by the cache
    whenever it serves nobody."""

    def close(self) -> None: ...


class LoadFailed(Exception):
    """Raised by a loader when the source failed; a stale value may still be served. Carries
    what the caller should answer when none can be: ``fallback``, which waiters on the same
    load may share, or ``unstored``, which is this caller's alone (see Unstored)."""

    def __init__(
        self,
        *,
        error: Exception | None = None,
        fallback: Any = None,
        unstored: Unstored | None = None,
    ) -> None:
        super().__init__(str(error) if error else "load failed")
        self.error = error
        self.fallback = fallback
        self.unstored = unstored


@dataclasses.dataclass(frozen=True, slots=True)
class Load:
    """What a loader returns: the value and how long it may be used."""

    value: bytes
    ttl_s: float | None = None  # fresh for; None: the default TTL
    stale_s: float | None = None  # may be served while refreshing; None: the default
    stale_if_error_s: float | None = None  # may be served when refreshing fails; None: stale_s
    retain_s: float = 0.0  # kept this much longer (e.g. to revalidate it cheaply)
    store: bool = True
    revalidated: bool = False
    unstored: Unstored | None = None  # with store=False: the answer itself, see Unstored


@dataclasses.dataclass(frozen=True, slots=True)
class Stored:
    value: bytes
    stored_at: float
    fresh_until: float
    stale_until: float
    error_until: float


@dataclasses.dataclass(frozen=True, slots=True)
class Prefetched:
    """A cache entry read ahead of time (with the key check): the raw value, None when absent."""

    key: str
    blob: bytes | None

    def stored(self) -> Stored | None:
        return decode(self.blob) if self.blob else None


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    value: bytes
    outcome: Outcome
    stored: Stored | None = None  # the entry the value came from, when it came from the cache
    unstored: Unstored | None = None  # the load's own answer, when it was not stored
    entry: object = None  # what ``usable`` made of ``stored``, when it judged it


Loader = Callable[[Stored | None], Load]
# What a caller makes of a stored entry (its decoded form, say), or None when the entry cannot
# serve its request (another variant, or bytes it cannot read).
Usable = Callable[[Stored], object]


Spawn = Callable[[Callable[[], None]], bool]


@dataclasses.dataclass
class _Flight:
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Result | None = None
    error: BaseException | None = None


def encode(stored: Stored) -> bytes:
    header = _HEADER.pack(
        _MAGIC, stored.stored_at, stored.fresh_until, stored.stale_until, stored.error_until
    )
    return header + stored.value


def decode(blob: bytes) -> Stored | None:
    if len(blob) < _HEADER.size:
        return None
    magic, stored_at, fresh_until, stale_until, error_until = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        return None
    return Stored(blob[_HEADER.size :], stored_at, fresh_until, stale_until, error_until)


class CacheService:
    def __init__(
        self,
        redis: RedisService,
        *,
        default_ttl_s: float,
        default_stale_s: float,
        load_timeout_s: float,
        spawn: Spawn,
    ) -> None:
        self.redis = redis
        self.default_ttl_s = default_ttl_s
        self.default_stale_s = default_stale_s
        # Waiters give up on someone else's load after this long and load themselves.
        self.wait_s = load_timeout_s + 1.0
        self._lock_ms = int(self.wait_s * 1000) + 1000
        self._spawn = spawn
        self._flights: dict[str, _Flight] = {}
        # Keys whose last answer was not cacheable, and until when to believe that.
        self._passes: dict[str, float] = {}
        self._flights_lock = threading.Lock()
        self._store_script = redis.script(__file__, "cache_store.lua")
        self._release_script = redis.script(__file__, "lock_release.lua")
        self._delete_target_script = redis.script(__file__, "cache_delete_indexed.lua")

    # --- plain operations --------------------------------------------------------------------

    def get(self, key: str) -> Stored | None:
        """The stored entry (fresh, stale or only kept for revalidation), or None."""
        blob = self.redis.get(key)
        return decode(blob) if blob else None

    def set(
        self,
        key: str,
        value: bytes,
        ttl_s: float | None = None,
        stale_s: float | None = None,
        *,
        stale_if_error_s: float | None = None,
        retain_s: float = 0.0,
        index: str | None = None,
    ) -> Stored:
        now = time.time()
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        stale = self.default_stale_s if stale_s is None else stale_s
        on_error = stale if stale_if_error_s is None else stale_if_error_s
        stored = Stored(value, now, now + ttl, now + ttl + stale, now + ttl + on_error)
        expire_ms = max(1, int((max(stale, on_error) + ttl + retain_s) * 1000))
        keys = [key, index] if index else [key]
        self.redis.run_script(self._store_script, keys, [encode(stored), expire_ms])
        return stored

    def delete(self, key: str) -> bool:
        return bool(self.redis.delete(key))

    def scan_delete(self, pattern: str, *, dry_run: bool = False) -> tuple[int, int]:
        """Find keys matching a glob pattern with SCAN (never KEYS) and unlink them in batches;
        returns (matched, deleted)."""
        matched = deleted = 0
        cursor = 0
        while True:
            cursor, keys = self.redis.scan(cursor, match=pattern, count=SCAN_COUNT)
            matched += len(keys)
            if keys and not dry_run:
                for first in range(0, len(keys), DELETE_BATCH):
                    deleted += self.redis.unlink(*keys[first : first + DELETE_BATCH])
            if cursor == 0:
                return matched, deleted

    def exists(self, key: str) -> bool:
        return self.redis.exists(key)

    def delete_indexed(self, index: str) -> int:
        """Delete every key listed in an index set, and the set; returns how many went."""
        return int(self.redis.run_script(self._delete_target_script, [index], []))

    # --- cache-aside with stale-while-revalidate and coalescing -------------------------------

    def wrap(
        self,
        key: str,
        loader: Loader,
        *,
        usable: Usable = lambda stored: stored,
        index: str | None = None,
        prefetched: Prefetched | None = None,
    ) -> Result:
        if prefetched is not None and prefetched.key == key:
            stored = prefetched.stored()
        else:
            try:
                stored = self.get(key)
            except RedisUnavailable:
                loaded = loader(None)
                return Result(loaded.value, Outcome.BYPASS, unstored=loaded.unstored)
        entry = usable(stored) if stored is not None else None
        now = time.time()
        if stored is not None and entry is not None:
            if now < stored.fresh_until:
                return Result(stored.value, Outcome.HIT, stored, entry=entry)
            if now < stored.stale_until:
                self._refresh_in_background(key, loader, stored, index)
                return Result(stored.value, Outcome.STALE, stored, entry=entry)
            try:
                return self._load_coalesced(key, loader, stored, index, usable)
            except LoadFailed as failed:
                if time.time() < stored.error_until:
                    if failed.unstored is not None:
                        failed.unstored.close()
                    return Result(stored.value, Outcome.STALE, stored, entry=entry)
                raise
        if self._passed_recently(key):
            # Its last answer was not cacheable: fetch straight away, as that answer's marker
            # would tell us anyway (one Redis round trip saved per uncacheable request).
            return self._load_and_store(key, loader, None, index)
        return self._load_coalesced(key, loader, None, index, usable)

    def _load_coalesced(
        self,
        key: str,
        loader: Loader,
        previous: Stored | None,
        index: str | None,
        usable: Usable,
    ) -> Result:
        with self._flights_lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            if flight.done.wait(self.wait_s):
                # The leader's own answer (LoadFailed.unstored) cannot serve us as well.
                unshared = isinstance(flight.error, LoadFailed) and (
                    flight.error.unstored is not None
                )
                if flight.error is not None and not unshared:
                    raise flight.error
                shared = flight.result
                # The leader's answer serves us only if it was stored and is our variant.
                if shared is not None and shared.stored is not None:
                    entry = usable(shared.stored)
                    if entry is not None:
                        return dataclasses.replace(shared, outcome=Outcome.HIT, entry=entry)
            # Not stored, not our variant, the leader's own answer, or it never came: load
            # for ourselves.
            return self._load_and_store(key, loader, previous, index)
        try:
            flight.result = self._load_across_workers(key, loader, previous, index, usable)
            return flight.result
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            flight.done.set()
            with self._flights_lock:
                self._flights.pop(key, None)

    def _load_across_workers(
        self,
        key: str,
        loader: Loader,
        previous: Stored | None,
        index: str | None,
        usable: Usable,
    ) -> Result:
        token = secrets.token_hex(8)
        lock = _lock_key(key)
        try:
            # NX with GET: either we take the lock (None) or learn what holds it, in one call.
            holder = self.redis.set_nx_get(lock, token, px=self._lock_ms)
        except RedisUnavailable:
            return self._load_and_store(key, loader, previous, index)
        if holder == _PASS:
            # The last load of this key was not cacheable: nothing to wait for.
            return self._load_and_store(key, loader, previous, index)
        if holder is None:
            result = None
            try:
                # Our earlier look (perhaps read ahead with the key check) may predate a load
                # that finished since: what it stored serves us without another.
                result = self._fresh_since(key, previous, usable)
                if result is None:
                    result = self._load_and_store(key, loader, previous, index)
                return result
            finally:
                stored = result is not None and result.outcome is not Outcome.BYPASS
                self._release(lock, token, stored)
        waited = self._wait_for_other_load(key, lock, previous, usable)
        if waited is not None:
            return waited
        return self._load_and_store(key, loader, previous, index)

    def _fresh_since(self, key: str, previous: Stored | None, usable: Usable) -> Result | None:
        """A fresh, usable entry stored after ``previous``, as a HIT; else None."""
        try:
            current = self.get(key)
        except RedisUnavailable:
            return None
        previous_at = previous.stored_at if previous else None
        if (
            current is None
            or current.stored_at == previous_at
            or time.time() >= current.fresh_until
        ):
            return None
        entry = usable(current)
        if entry is None:
            return None
        return Result(current.value, Outcome.HIT, current, entry=entry)

    def _wait_for_other_load(
        self,
        key: str,
        lock: str,
        previous: Stored | None,
        usable: Usable,
    ) -> Result | None:
        """Poll for the entry another worker is loading; None when it will not come."""
        deadline = time.monotonic() + self.wait_s
        previous_at = previous.stored_at if previous else None
        while time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_S)
            try:
                blob, lock_value = self.redis.mget(key, lock)
            except RedisUnavailable:
                return None
            stored = decode(blob) if blob else None
            if stored is not None and stored.stored_at != previous_at:
                entry = usable(stored)
                if entry is not None:
                    return Result(stored.value, Outcome.HIT, stored, entry=entry)
            if lock_value is None or lock_value == _PASS:
                return None
        return None

    def _load_and_store(
        self, key: str, loader: Loader, previous: Stored | None, index: str | None
    ) -> Result:
        loaded = loader(previous)
        if not loaded.store:
            self._remember_pass(key)
            return Result(loaded.value, Outcome.BYPASS, unstored=loaded.unstored)
        try:
            stored = self.set(
                key,
                loaded.value,
                loaded.ttl_s,
                loaded.stale_s,
                stale_if_error_s=loaded.stale_if_error_s,
                retain_s=loaded.retain_s,
                index=index,
            )
        except RedisUnavailable:
            return Result(loaded.value, Outcome.BYPASS)
        outcome = Outcome.REVALIDATED if loaded.revalidated else Outcome.MISS
        return Result(loaded.value, outcome, stored)

    def _remember_pass(self, key: str) -> None:
        if len(self._passes) >= PASS_MEMORY_SIZE:
            self._passes.clear()  # crude but bounded; forgetting only costs a round trip
        self._passes[key] = time.monotonic() + PASS_MARKER_TTL_MS / 1000

    def _passed_recently(self, key: str) -> bool:
        until = self._passes.get(key)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        self._passes.pop(key, None)
        return False

    def _release(self, lock: str, token: str, stored: bool) -> None:
        # Without Redis the lock simply expires.
        with contextlib.suppress(RedisUnavailable):
            self.redis.run_script(
                self._release_script,
                [lock],
                [token, "deleted" if stored else "pass", PASS_MARKER_TTL_MS],
            )

    def _refresh_in_background(
        self, key: str, loader: Loader, previous: Stored, index: str | None
    ) -> None:
        def refresh() -> None:
            token = secrets.token_hex(8)
            lock = _lock_key(key)
            try:
                if not self.redis.set_nx(lock, token, px=self._lock_ms):
                    return  # another worker or replica is refreshing this key
            except RedisUnavailable:
                return
            stored = False
            try:
                result = self._load_and_store(key, loader, previous, index)
                stored = result.outcome is not Outcome.BYPASS
                # Nobody waits for a refresh's answer: one too large to store is not read.
                if result.unstored is not None:
                    result.unstored.close()
            except LoadFailed as exc:
                if exc.unstored is not None:
                    exc.unstored.close()
                log.info("background refresh failed", extra={"reason": str(exc.error or exc)})
            except Exception:
                log.exception("background refresh failed")
            finally:
                self._release(lock, token, stored)

        if not self._spawn(refresh):
            log.debug("background refresh skipped: the refresh pool is full")


def _lock_key(key: str) -> str:
    # Outside the entries' namespace, so that invalidating entries never touches a lock.
    return f"proxy:lock:{key}"
