"""Redis connections with bounded timeouts and an outage detector.

After a failure, calls short-circuit for a moment instead of each request paying a timeout; the
first call after that moment probes again, so recovery needs no restart. One warning when an
outage starts, one info line when it ends. The only module that imports redis' exceptions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.exceptions
from redis.commands.core import Script

from proxy_app.redis_pipeline import PipelinedConnection, PipelineError, ReplyError
from proxy_app.settings import Settings, mask_url_password

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long calls short-circuit after a failure before one is let through to probe Redis again.
# Short, because it adds to every outage: after a Redis restart the service answers 503 until
# the first probe after the new Redis is up (at 1 s, a third of a 3 s budget for a restart).
OUTAGE_COOLDOWN_S = 0.25
# Connections per worker process; a request that finds none free waits at most the Redis timeout.
POOL_SIZE = 64


class RedisUnavailable(Exception):
    """Redis could not be reached or did not answer in time (or an outage is in progress)."""


class RedisService:
    """One Redis endpoint: a bounded connection pool and the outage state shared by its callers."""

    def __init__(
        self,
        url: str,
        *,
        timeout_ms: int,
        name: str = "redis",
        on_error: Callable[[str], None] = lambda _name: None,
        client: redis.Redis | None = None,
    ) -> None:
        timeout_s = timeout_ms / 1000
        self.name = name
        self._on_error = on_error
        injected = client
        self.url_for_logs = mask_url_password(url)
        if client is None:
            pool = redis.BlockingConnectionPool.from_url(
                url,
                max_connections=POOL_SIZE,
                timeout=timeout_s,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
            )
            client = redis.Redis(connection_pool=pool)
        self.client: redis.Redis = client
        # Only for a real server: an injected client (tests) keeps every command on itself.
        self._pipeline = (
            PipelinedConnection(url, timeout_s)
            if injected is None and PipelinedConnection.supports(url)
            else None
        )
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._in_outage = False

    def use_client(self, client: redis.Redis) -> None:
        """Send every command through this client (tests inject fakeredis here)."""
        if self._pipeline is not None:
            self._pipeline.close()
        self.client = client
        self._pipeline = None

    @property
    def available(self) -> bool:
        """False while an outage is known and the cool-down has not passed."""
        return not (self._in_outage and time.monotonic() < self._down_until)

    def call(self, operation: Callable[[redis.Redis], T]) -> T:
        """Run ``operation(client)``; raise RedisUnavailable fast during an outage."""
        return self._guarded(lambda: operation(self.client))

    def command(self, *args: Any) -> Any:
        """One command, over the worker's shared pipelined connection when there is one."""
        pipeline = self._pipeline
        if pipeline is None:
            return self.call(lambda client: client.execute_command(*args))  # type: ignore[no-untyped-call]
        return self._guarded(lambda: pipeline.execute(*args))

    def run_script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA a registered script (loading it when Redis does not know it yet)."""
        pipeline = self._pipeline
        if pipeline is None:
            return self.call(lambda client: script(keys=keys, args=args, client=client))

        def evaluate() -> Any:
            command = ("EVALSHA", script.sha, len(keys), *keys, *args)
            try:
                return pipeline.execute(*command)
            except ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
            pipeline.execute("SCRIPT", "LOAD", script.script)
            return pipeline.execute(*command)

        return self._guarded(evaluate)

    def _guarded(self, attempt: Callable[[], T]) -> T:
        if not self.available:
            self._on_error(self.name)
            raise RedisUnavailable(f"{self.name} is unavailable")
        try:
            result = attempt()
        except (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            PipelineError,
        ) as exc:
            self._record_failure(exc)
            raise RedisUnavailable(f"{self.name} is unavailable") from exc
        except redis.exceptions.BusyLoadingError as exc:
            self._record_failure(exc)
            raise RedisUnavailable(f"{self.name} is loading its data") from exc
        except (
            redis.exceptions.OutOfMemoryError,
            redis.exceptions.ReadOnlyError,
            redis.exceptions.MasterDownError,
            redis.exceptions.AuthenticationError,
            redis.exceptions.NoPermissionError,
            # Any other error reply (a Redis in protected mode answers every command with one).
            redis.exceptions.ResponseError,
            ReplyError,
        ) as exc:
            # The server answers but refuses this command: fail it, without declaring an
            # outage that would short-circuit the commands it still serves.
            self._on_error(self.name)
            raise RedisUnavailable(f"{self.name} refused the command") from exc
        if self._in_outage:
            self._record_recovery()
        return result

    def ping(self) -> bool:
        try:
            return bool(self.call(lambda client: client.ping()))
        except RedisUnavailable:
            return False

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
        self.client.close()

    def _record_failure(self, exc: Exception) -> None:
        self._on_error(self.name)
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

    def __init__(
        self, settings: Settings, on_error: Callable[[str], None] = lambda _name: None
    ) -> None:
        self.cache = RedisService(
            settings.cache_redis_url,
            timeout_ms=settings.redis_timeout_ms,
            name="cache",
            on_error=on_error,
        )
        if settings.api_keys_redis_url == settings.cache_redis_url:
            self.keys = self.cache
        else:
            self.keys = RedisService(
                settings.api_keys_redis_url,
                timeout_ms=settings.redis_timeout_ms,
                name="keys",
                on_error=on_error,
            )

    def services(self) -> list[RedisService]:
        return [self.cache] if self.keys is self.cache else [self.cache, self.keys]

    def status(self) -> dict[str, Any]:
        return {service.name: "up" if service.ping() else "down" for service in self.services()}

    def close(self) -> None:
        for service in self.services():
            service.close()
