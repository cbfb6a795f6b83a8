"""One Redis connection shared by every request of a worker, for the per-request commands.

Commands are queued as they come and their replies matched to them in order (Redis answers in
order), so concurrent requests share one connection and its round trips instead of each taking
a pooled connection and paying for its checks. Each socket has a writer and a reader of its own
(greenlets under gevent): the writer sends whatever commands queued up since its last write in
one write, so requests that become ready together reach Redis in one packet, and the reader
hands each reply to its waiter. A caller waits for its reply at most the timeout plus one round
of the link's watchdog (which saves a timer per command); a late reply is still consumed in
turn, so the connection never loses its place. Each socket has its own queue of waiters: when
one breaks, only its own pending commands fail, and the next command opens a new socket whose
replies can never be mistaken for the old one's.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import hiredis
from redis.connection import parse_url

from proxy_app.settings import SENTINEL_SCHEME, parse_sentinel_url

# Bytes read from the socket at once: many replies per read when requests pile up.
READ_SIZE = 65536
# How often overdue commands are looked for: every 25 ms, or a quarter of a shorter timeout but
# not more often than every 2 ms. A command may wait up to that much longer than the timeout.
WATCHDOG_INTERVAL_S = 0.025
WATCHDOG_MIN_INTERVAL_S = 0.002
# How long written commands may stay unacknowledged by the peer's TCP before the kernel drops
# the connection (TCP_USER_TIMEOUT). A Redis that went away without closing its end (its
# container removed from the network, a node lost) never acknowledges again; without this
# limit every later command on the socket only timed out, for as long as the kernel kept
# retransmitting, while a new Redis was already serving. A slow but live Redis still
# acknowledges at once, so only a dead peer is cut off.
UNACKNOWLEDGED_LIMIT_MS = 1000


class PipelineError(ConnectionError):
    """The connection failed or the reply did not come in time."""


class PipelineTimeout(PipelineError, TimeoutError):
    pass


class LocateError(Exception):
    """The address of the Redis to connect to could not be found (no sentinel knows a master)."""


class ReplyError(Exception):
    """Redis answered with an error (for example NOSCRIPT)."""


class _Waiter:
    __slots__ = ("deadline", "done", "error", "reply")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.done = threading.Event()
        self.reply: Any = None
        self.error: BaseException | None = None

    def settle(self, reply: Any = None, error: BaseException | None = None) -> None:
        """With the link's lock held: the first answer (reply, failure or time-out) counts."""
        if not self.done.is_set():
            self.reply, self.error = reply, error
            self.done.set()


class _Link:
    """One socket, the commands queued for it and those that still await their replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        # Commands not yet written, and the waiters of every command queued, in the same order.
        self.outgoing: list[bytes] = []
        self.waiters: collections.deque[_Waiter] = collections.deque()
        self.wake_writer = threading.Event()
        self.broken = False
        self.closed = threading.Event()  # set when broken: ends the watchdog's wait at once


Address = tuple[str, int] | str  # host and port, or the path of a Unix socket


class PipelinedConnection:
    def __init__(
        self, url: str, timeout_s: float, locate: Callable[[], Address] | None = None
    ) -> None:
        """``locate``, given for a ``redis+sentinel://`` URL, names the current master; it is
        asked again for every new socket, so a failover is followed by the next connect."""
        if url.startswith(SENTINEL_SCHEME + "://"):
            if locate is None:
                raise ValueError("a Sentinel URL needs a way to locate its master")
            sentinel = parse_sentinel_url(url)
            options: dict[str, Any] = {
                "username": sentinel.username,
                "password": sentinel.password,
                "db": sentinel.db,
            }
        else:
            options = parse_url(url)  # type: ignore[no-untyped-call]
            fixed: Address = (
                options["path"]
                if "path" in options
                else (options.get("host", "127.0.0.1"), int(options.get("port", 6379)))
            )
            locate = locate or (lambda: fixed)
        self._locate = locate
        # A READONLY reply means the socket reaches a master that was demoted: only where a
        # failover can have moved the master is that a reason to connect again.
        self._follows_failover = url.startswith(SENTINEL_SCHEME + "://")
        self._setup: list[tuple[Any, ...]] = []
        if options.get("password"):
            username = options.get("username")
            auth = ("AUTH", username, options["password"]) if username else None
            self._setup.append(auth or ("AUTH", options["password"]))
        if int(options.get("db") or 0):
            self._setup.append(("SELECT", int(options["db"])))
        self.timeout_s = timeout_s
        self._link: _Link | None = None
        # Held only while connecting: one connect at a time, and nobody waits for it longer
        # than the timeout.
        self._connecting = threading.Lock()

    @staticmethod
    def supports(url: str) -> bool:
        """TLS (rediss://) stays with redis-py's connections."""
        return url.startswith(("redis://", "unix://", SENTINEL_SCHEME + "://"))

    def execute(self, *args: Any) -> Any:
        """Send one command and wait for its reply; raises PipelineError, PipelineTimeout or
        ReplyError."""
        payload = hiredis.pack_command(args)
        waiter = _Waiter(time.monotonic() + self.timeout_s)
        link = self._link or self._connect()
        if link.broken:  # it broke since we looked: nothing was written yet, use a new one
            link = self._connect()
        with link.lock:
            if link.broken:
                raise PipelineError("the Redis connection was lost")
            link.waiters.append(waiter)
            link.outgoing.append(payload)
            link.wake_writer.set()
        # No timer per command: the link's watchdog settles overdue waiters.
        waiter.done.wait()
        if isinstance(waiter.error, PipelineTimeout):
            raise PipelineTimeout(str(waiter.error))
        if waiter.error is not None:
            raise PipelineError(str(waiter.error)) from waiter.error
        if isinstance(waiter.reply, hiredis.ReplyError):
            if self._follows_failover and str(waiter.reply).startswith("READONLY"):
                with link.lock:
                    self._break(link, PipelineError("the Redis master was demoted"))
                raise PipelineError("the Redis master was demoted to a replica")
            raise ReplyError(str(waiter.reply))
        return waiter.reply

    def close(self) -> None:
        link = self._link
        if link is not None:
            with link.lock:
                self._break(link, ConnectionError("closed"))

    # --- internals ---------------------------------------------------------------------------

    def _connect(self) -> _Link:
        if not self._connecting.acquire(timeout=self.timeout_s):
            raise PipelineTimeout("connecting to Redis is taking too long")
        try:
            if self._link is not None:  # somebody else connected meanwhile
                return self._link
            link = _Link(self._open_socket())
            threading.Thread(target=self._write_commands, args=(link,), daemon=True).start()
            threading.Thread(target=self._read_replies, args=(link,), daemon=True).start()
            threading.Thread(target=self._expire_waiters, args=(link,), daemon=True).start()
            self._link = link
            return link
        finally:
            self._connecting.release()

    def _open_socket(self) -> socket.socket:
        sock: socket.socket | None = None
        try:
            address = self._locate()
            if isinstance(address, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout_s)
                sock.connect(address)
            else:
                sock = socket.create_connection(address, timeout=self.timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
                    sock.setsockopt(
                        socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, UNACKNOWLEDGED_LIMIT_MS
                    )
            reader = hiredis.Reader()
            for command in self._setup:
                sock.sendall(hiredis.pack_command(command))
                reply = _read_one(sock, reader)
                if isinstance(reply, hiredis.ReplyError):
                    raise PipelineError(f"Redis refused {command[0]}: {reply}")
        except (OSError, hiredis.ProtocolError, PipelineError, LocateError) as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, PipelineError):
                raise
            raise PipelineError(f"connecting to Redis failed: {exc}") from exc
        return sock

    def _write_commands(self, link: _Link) -> None:
        """Runs as long as the link: writes the queued commands, all that queued up at once."""
        while True:
            link.wake_writer.wait()
            with link.lock:
                if link.broken:
                    return
                data = b"".join(link.outgoing)
                link.outgoing.clear()
                link.wake_writer.clear()
            try:
                link.sock.sendall(data)
            except OSError as exc:
                with link.lock:
                    self._break(link, PipelineError(f"writing to Redis failed: {exc}"))
                return

    def _read_replies(self, link: _Link) -> None:
        """Runs as long as the link: hands each reply to its waiter."""
        reader = hiredis.Reader()
        try:
            while not link.broken:
                try:
                    data = link.sock.recv(READ_SIZE)
                except TimeoutError:
                    continue  # nothing yet; the waiters keep their own time limits
                if not data:
                    raise ConnectionError("Redis closed the connection")
                reader.feed(data)
                while (reply := reader.gets()) is not False:
                    with link.lock:
                        if link.waiters:  # an overdue waiter's late reply is dropped here
                            link.waiters.popleft().settle(reply)
        except Exception as exc:  # whatever broke the stream, this link is done
            with link.lock:
                self._break(link, exc)

    def _expire_waiters(self, link: _Link) -> None:
        """Runs as long as the link: fails the commands whose time is up. They stay queued, so
        that their replies, when they come, are consumed in turn."""
        while not link.closed.wait(self._watchdog_interval_s()):
            now = time.monotonic()
            with link.lock:
                for waiter in link.waiters:
                    if waiter.deadline <= now:
                        waiter.settle(error=PipelineTimeout("Redis did not answer in time"))

    def _watchdog_interval_s(self) -> float:
        return max(WATCHDOG_MIN_INTERVAL_S, min(WATCHDOG_INTERVAL_S, self.timeout_s / 4))

    def _break(self, link: _Link, error: BaseException) -> None:
        """With ``link.lock`` held: close the link and fail the commands waiting on it."""
        if link.broken:
            return
        link.broken = True
        if self._link is link:
            self._link = None
        with contextlib.suppress(OSError):
            link.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv
        link.sock.close()
        link.outgoing.clear()
        link.wake_writer.set()  # the writer sees the link broken and ends
        link.closed.set()
        while link.waiters:
            link.waiters.popleft().settle(error=error)


def _read_one(sock: socket.socket, reader: hiredis.Reader) -> Any:
    while (reply := reader.gets()) is False:
        data = sock.recv(READ_SIZE)
        if not data:
            raise ConnectionError("Redis closed the connection")
        reader.feed(data)
    return reply
