"""One Redis connection shared by every request of a worker, for the per-request commands.

Commands are written as they come and their replies matched to them in order (Redis answers in
order), so concurrent requests share one connection and its round trips instead of each taking
a pooled connection and paying for its checks. A caller waits at most the timeout for its reply;
a late reply is still consumed in turn, so the connection never loses its place. A broken
connection fails every pending command and is replaced on the next one.
"""

from __future__ import annotations

import collections
import socket
import threading
from typing import Any

import hiredis
from redis.connection import parse_url

# Bytes read from the socket at once: many replies per read when requests pile up.
READ_SIZE = 65536


class PipelineError(ConnectionError):
    """The connection failed or the reply did not come in time."""


class PipelineTimeout(PipelineError, TimeoutError):
    pass


class ReplyError(Exception):
    """Redis answered with an error (for example NOSCRIPT)."""


class _Waiter:
    __slots__ = ("done", "error", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Any = None
        self.error: BaseException | None = None


class PipelinedConnection:
    def __init__(self, url: str, timeout_s: float) -> None:
        options = parse_url(url)  # type: ignore[no-untyped-call]
        self._address: tuple[str, int] | str = (
            options["path"]
            if "path" in options
            else (options.get("host", "127.0.0.1"), int(options.get("port", 6379)))
        )
        self._setup: list[tuple[Any, ...]] = []
        if options.get("password"):
            username = options.get("username")
            auth = ("AUTH", username, options["password"]) if username else None
            self._setup.append(auth or ("AUTH", options["password"]))
        if int(options.get("db", 0)):
            self._setup.append(("SELECT", int(options["db"])))
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._reading = False

    @staticmethod
    def supports(url: str) -> bool:
        """TLS (rediss://) stays with redis-py's connections."""
        return url.startswith(("redis://", "unix://"))

    def execute(self, *args: Any) -> Any:
        """Send one command and wait for its reply; raises PipelineError, PipelineTimeout or
        ReplyError."""
        payload = hiredis.pack_command(args)
        waiter = _Waiter()
        with self._lock:
            sock = self._sock or self._connect()
            self._waiters.append(waiter)
            try:
                sock.sendall(payload)
            except OSError as exc:
                self._fail_all(sock, exc)
                raise PipelineError(f"writing to Redis failed: {exc}") from exc
            if not self._reading:
                self._reading = True
                threading.Thread(target=self._read_replies, args=(sock,), daemon=True).start()
        if not waiter.done.wait(self.timeout_s):
            raise PipelineTimeout("Redis did not answer in time")
        if waiter.error is not None:
            raise PipelineError(str(waiter.error)) from waiter.error
        if isinstance(waiter.reply, hiredis.ReplyError):
            raise ReplyError(str(waiter.reply))
        return waiter.reply

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._fail_all(self._sock, ConnectionError("closed"))

    # --- internals (called with the lock held, except the reader) ------------------------------

    def _connect(self) -> socket.socket:
        try:
            if isinstance(self._address, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout_s)
                sock.connect(self._address)
            else:
                sock = socket.create_connection(self._address, timeout=self.timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = hiredis.Reader()
            for command in self._setup:
                sock.sendall(hiredis.pack_command(command))
                reply = _read_one(sock, reader)
                if isinstance(reply, hiredis.ReplyError):
                    sock.close()
                    raise PipelineError(f"Redis refused {command[0]}: {reply}")
        except OSError as exc:
            raise PipelineError(f"connecting to Redis failed: {exc}") from exc
        self._sock = sock
        return sock

    def _read_replies(self, sock: socket.socket) -> None:
        """Runs while commands are pending: hands each reply to its waiter, in order."""
        reader = hiredis.Reader()
        while True:
            with self._lock:
                if not self._waiters or self._sock is not sock:
                    self._reading = False
                    return
            try:
                data = sock.recv(READ_SIZE)
            except TimeoutError:
                continue  # nothing yet; the waiters keep their own time limits
            except OSError as exc:
                with self._lock:
                    self._fail_all(sock, exc)
                    self._reading = False
                return
            if not data:
                with self._lock:
                    self._fail_all(sock, ConnectionError("Redis closed the connection"))
                    self._reading = False
                return
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                with self._lock:
                    waiter = self._waiters.popleft() if self._waiters else None
                if waiter is not None:
                    waiter.reply = reply
                    waiter.done.set()

    def _fail_all(self, sock: socket.socket, error: BaseException) -> None:
        if self._sock is sock:
            self._sock = None
        sock.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = error
            waiter.done.set()


def _read_one(sock: socket.socket, reader: hiredis.Reader) -> Any:
    while (reply := reader.gets()) is False:
        data = sock.recv(READ_SIZE)
        if not data:
            raise ConnectionError("Redis closed the connection")
        reader.feed(data)
    return reply
