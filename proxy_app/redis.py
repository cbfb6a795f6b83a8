"""Redis connections with bounded timeouts and an outage detector.

After a failure, calls short-circuit for a moment instead of each request paying a timeout; the
first call after that moment probes again, so recovery needs no restart. One warning when an
outage starts, one info line when it ends. The only module that imports redis' exceptions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.exceptions

from proxy_app.settings import Settings, mask_url_password

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long calls short-circuit after a failure before one is let through to probe Redis again.
OUTAGE_COOLDOWN_S = 1.0
# Connections per worker process; a request that finds none free waits at most the Redis timeout.
POOL_SIZE = 64


class RedisUnavailable(Exception):
    """Redis could not be reached or did not answer in time (or an outage is in progress)."""


class RedisService:
    """One Redis endpoint: a bounded connection pool and the outage state shared by its callers."""

    def __init__(self, url: str, *, timeout_ms: int, name: str = "redis") -> None:
        timeout_s = timeout_ms / 1000
        self.name = name
        self.url_for_logs = mask_url_password(url)
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self.client: redis.Redis = redis.Redis(connection_pool=pool)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._in_outage = False

    @property
    def available(self) -> bool:
        """False while an outage is known and the cool-down has not passed."""
        return not (self._in_outage and time.monotonic() < self._down_until)

    def call(self, operation: Callable[[redis.Redis], T]) -> T:
        """Run ``operation(client)``; raise RedisUnavailable fast during an outage."""
        if not self.available:
            raise RedisUnavailable(f"{self.name} is unavailable")
        try:
            result = operation(self.client)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self._record_failure(exc)
            raise RedisUnavailable(f"{self.name} is unavailable") from exc
        except redis.exceptions.BusyLoadingError as exc:
            self._record_failure(exc)
            raise RedisUnavailable(f"{self.name} is loading its data") from exc
        if self._in_outage:
            self._record_recovery()
        return result

    def ping(self) -> bool:
        try:
            return bool(self.call(lambda client: client.ping()))
        except RedisUnavailable:
            return False

    def close(self) -> None:
        self.client.close()

    def _record_failure(self, exc: Exception) -> None:
        with self._lock:
            self._down_until = time.monotonic() + OUTAGE_COOLDOWN_S
            if self._in_outage:
                return
            self._in_outage = True
        log.warning(
            "redis outage started",
            extra={"redis": self.name, "url": self.url_for_logs, "reason": type(exc).__name__},
        )

    def _record_recovery(self) -> None:
        with self._lock:
            if not self._in_outage:
                return
            self._in_outage = False
        log.info("redis outage ended", extra={"redis": self.name, "url": self.url_for_logs})


class RedisConnections:
    """The cache's Redis and the keys' Redis; the same service when the URLs are equal."""

    def __init__(self, settings: Settings) -> None:
        self.cache = RedisService(
            settings.cache_redis_url, timeout_ms=settings.redis_timeout_ms, name="cache"
        )
        if settings.api_keys_redis_url == settings.cache_redis_url:
            self.keys = self.cache
        else:
            self.keys = RedisService(
                settings.api_keys_redis_url, timeout_ms=settings.redis_timeout_ms, name="keys"
            )

    def services(self) -> list[RedisService]:
        return [self.cache] if self.keys is self.cache else [self.cache, self.keys]

    def status(self) -> dict[str, Any]:
        return {service.name: "up" if service.ping() else "down" for service in self.services()}

    def close(self) -> None:
        for service in self.services():
            service.close()
