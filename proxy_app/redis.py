"""Redis connections with bounded timeouts and an outage detector, and the few typed
operations the app uses: the only module that uses redis-py (with ``redis_pipeline``, its own
transport).

After a failure, calls short-circuit for a moment instead of each request paying a timeout; the
first call after that moment probes again, so recovery needs no restart. One warning when an
outage starts, one info line when it ends.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import redis
import redis.exceptions
import redis.sentinel
from redis.commands.core import Script

from proxy_app.redis_pipeline import LocateError, PipelinedConnection, PipelineError, ReplyError
from proxy_app.settings import SENTINEL_SCHEME, Settings, mask_url_password, parse_sentinel_url

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


def field_args(fields: Mapping[str, str]) -> list[str]:
    """``{"a": "1", "b": "2"}`` -> ``["a", "1", "b", "2"]``: a hash's fields as the arguments
    HSET (or a script that passes them on to it) takes."""
    return [item for pair in fields.items() for item in pair]


def lua_source(module_file: str, name: str) -> str:
    """The text of the Lua script ``name`` in the ``lua/`` folder beside a module (its
    ``__file__``): every script is a file, one atomic operation each."""
    return (Path(module_file).with_name("lua") / name).read_text()


@dataclasses.dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script registered with one RedisService; run it with ``run_script``."""

    name: str
    _script: Script


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
        self._sentinel: _Sentinel | None = None
        if client is None and url.startswith(SENTINEL_SCHEME + "://"):
            self._sentinel = _Sentinel(url, timeout_s)
            client = self._sentinel.client
        elif client is None:
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
            PipelinedConnection(
                url, timeout_s, self._sentinel.locate if self._sentinel is not None else None
            )
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

    # --- the operations the app uses; each raises RedisUnavailable when Redis fails --------

    def get(self, key: str) -> bytes | None:
        return self._command("GET", key)  # type: ignore[no-any-return]

    def mget(self, *keys: str) -> list[bytes | None]:
        return cast("list[bytes | None]", self._call(lambda client: client.mget(keys)))

    def set_nx(self, key: str, value: str, *, px: int) -> bool:
        """SET unless the key exists, expiring after ``px`` ms; whether it was set."""
        return bool(self._call(lambda client: client.set(key, value, nx=True, px=px)))

    def set_nx_get(self, key: str, value: str, *, px: int) -> bytes | None:
        """SET unless the key exists, expiring after ``px`` ms; the value found (None: set)."""
        found = self._call(lambda client: client.set(key, value, nx=True, px=px, get=True))
        return cast("bytes | None", found)

    def delete(self, *keys: str) -> int:
        return int(self._call(lambda client: client.delete(*keys)))

    def exists(self, key: str) -> bool:
        return bool(self._call(lambda client: client.exists(key)))

    def scan(self, cursor: int, *, match: str, count: int) -> tuple[int, list[bytes]]:
        """One SCAN step (never KEYS): the next cursor (0 at the end) and the keys found."""
        found = self._call(lambda client: client.scan(cursor, match=match, count=count))
        return cast("tuple[int, list[bytes]]", found)

    def unlink(self, *keys: str | bytes) -> int:
        return int(self._call(lambda client: client.unlink(*keys)))

    def incr_with_ttl(self, key: str, ttl_s: int) -> int:
        """INCR a counter that expires ``ttl_s`` after its first increment; the new count."""

        def count(client: redis.Redis) -> int:
            pipe = client.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, ttl_s, nx=True)
            return int(pipe.execute()[0])

        return self._call(count)

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return cast("dict[bytes, bytes]", self._call(lambda client: client.hgetall(key)))

    def hgetall_many(self, keys: Sequence[str]) -> list[dict[bytes, bytes]]:
        """HGETALL of each key in one round trip, in order (empty for a missing key)."""

        def fetch(client: redis.Redis) -> list[dict[bytes, bytes]]:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return list(pipe.execute())

        return self._call(fetch)

    def hget(self, key: str, field: str) -> bytes | None:
        return cast("bytes | None", self._command("HGET", key, field))

    def scard(self, key: str) -> int:
        return int(self._command("SCARD", key))

    def sscan(self, key: str, cursor: int, *, count: int) -> tuple[int, list[bytes]]:
        """One step of SSCAN: the next cursor (0 at the end) and the members it gave."""
        next_cursor, members = self._command("SSCAN", key, cursor, "COUNT", count)
        return int(next_cursor), list(members)

    def publish(self, channel: str, message: str) -> int:
        return int(self._command("PUBLISH", channel, message))

    def set_members(self, key: str, *, batch: int) -> list[bytes]:
        """Every member of a set, read with SSCAN ``batch`` at a time (never one SMEMBERS)."""
        found = self._call(lambda client: list(client.sscan_iter(key, count=batch)))
        return cast("list[bytes]", found)

    def transaction(self, *commands: Sequence[str | bytes | int]) -> list[Any]:
        """Run commands in one MULTI/EXEC; their replies, in order."""

        def run(client: redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=True)
            for command in commands:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            return list(pipe.execute())

        return self._call(run)

    def script(self, module_file: str, name: str) -> LuaScript:
        """Register the Lua script ``lua/<name>`` beside a module (see ``lua_source``)."""
        return LuaScript(name, self.client.register_script(lua_source(module_file, name)))

    def run_script(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA a registered script (loading it when Redis does not know it yet), over the
        worker's shared pipelined connection when there is one."""
        registered = script._script
        pipeline = self._pipeline
        if pipeline is None:
            return self._call(lambda client: registered(keys=keys, args=args, client=client))

        def evaluate() -> Any:
            command = ("EVALSHA", registered.sha, len(keys), *keys, *args)
            try:
                return pipeline.execute(*command)
            except ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
            pipeline.execute("SCRIPT", "LOAD", registered.script)
            return pipeline.execute(*command)

        return self._guarded(evaluate)

    def _command(self, *args: Any) -> Any:
        """One command, over the worker's shared pipelined connection when there is one."""
        pipeline = self._pipeline
        if pipeline is None:
            return self._call(lambda client: client.execute_command(*args))  # type: ignore[no-untyped-call]
        return self._guarded(lambda: pipeline.execute(*args))

    def _call(self, operation: Callable[[redis.Redis], T]) -> T:
        """Run ``operation(client)`` on a pooled connection."""
        return self._guarded(lambda: operation(self.client))

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

    def subscriber(self) -> Any:
        """A redis-py PubSub on this endpoint, for a listener that runs as long as the worker
        (its own connection, outside the pool's bounds and the outage detector)."""
        return self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]

    def ping(self) -> bool:
        try:
            return bool(self._call(lambda client: client.ping()))
        except RedisUnavailable:
            return False

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
        self.client.close()
        if self._sentinel is not None:
            self._sentinel.close()

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
        extra = {"redis": self.name, "url": self.url_for_logs}
        if self._sentinel is not None and self._sentinel.master is not None:
            host, port = self._sentinel.master
            extra["master"] = f"{host}:{port}"  # which one answers now
        log.info("redis outage ended", extra=extra)


class _BlockingSentinelPool(
    redis.sentinel.SentinelConnectionPool,
    redis.BlockingConnectionPool,
):
    """redis-py's Sentinel pool, with the bounded wait of the blocking pool: a request that
    finds no free connection waits for one (at most the Redis timeout) instead of failing at
    once, as it does with a plain URL. Both classes are redis-py's; this only combines them."""


class _Sentinel:
    """The sentinels of a ``redis+sentinel://`` URL and a client of the master they name. Every
    new connection asks them for the master, so a failover needs no restart."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parsed = parse_sentinel_url(url)
        self.master_name = parsed.master_name
        self.master: tuple[str, int] | None = None
        self._manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(parsed.sentinels),
            sentinel_kwargs={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s},
        )
        self.client: redis.Redis = self._manager.master_for(  # type: ignore[no-untyped-call]
            parsed.master_name,
            connection_pool_class=_BlockingSentinelPool,
            max_connections=POOL_SIZE,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            db=parsed.db,
            username=parsed.username,
            password=parsed.password,
        )

    def locate(self) -> tuple[str, int]:
        """The master's address as the sentinels know it now."""
        try:
            host, port = self._manager.discover_master(self.master_name)  # type: ignore[no-untyped-call]
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise LocateError(f"no sentinel names a master for {self.master_name!r}") from exc
        self.master = (str(host), int(port))
        return self.master

    def close(self) -> None:
        self._manager.close()


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

    @property
    def shared(self) -> bool:
        """Keys and cache live in one Redis (one script may touch both)."""
        return self.keys is self.cache

    def services(self) -> list[RedisService]:
        return [self.cache] if self.shared else [self.cache, self.keys]

    def status(self) -> dict[str, Any]:
        return {service.name: "up" if service.ping() else "down" for service in self.services()}

    def close(self) -> None:
        for service in self.services():
            service.close()
