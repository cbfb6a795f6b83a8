"""The client for the one upstream API: pooled connections, timeouts, a retry policy, bodies read
as they are needed, and the place where urllib3 errors become ours."""

from __future__ import annotations

import http.client
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import unquote

import certifi
import urllib3
import urllib3.connection
import urllib3.exceptions
from urllib3.util import SKIP_HEADER, Retry, Timeout, make_headers, parse_url

from proxy_app.metrics import Metrics
from proxy_app.settings import Settings

if TYPE_CHECKING:
    from proxy_app.upstream_guard import UpstreamGuard

log = logging.getLogger(__name__)

# Methods whose repetition cannot change anything upstream and that carry no body to resend.
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
# Gateway-ish statuses that say "try again", not "your request is wrong".
RETRY_STATUSES = frozenset({502, 503, 504})
# Short backoff between attempts (0.05 s, 0.1 s, ...): the client is waiting.
RETRY_BACKOFF_FACTOR_S = 0.05
# No single backoff pause may exceed this, whatever the attempt.
RETRY_BACKOFF_MAX_S = 1.0
# Bodies are read and passed on in pieces of at most this size.
CHUNK_BYTES = 64 * 1024
# A body of known length up to this size is read with the headers: it costs no more memory than
# one piece of a streamed body, and the connection goes back to the pool at once.
READ_AHEAD_BYTES = CHUNK_BYTES
# Request headers urllib3 (or http.client) would add on its own unless told not to.
_LIBRARY_DEFAULT_HEADERS = ("user-agent", "accept-encoding")


class UpstreamError(Exception):
    """A request to the upstream failed; carries the method and URL (which hold no secret)."""

    kind = "error"

    def __init__(self, message: str, *, method: str, url: str) -> None:
        super().__init__(message)
        self.method = method
        self.url = url

    @property
    def code(self) -> str:
        """The error code a client is told: ``upstream_`` and the kind."""
        return f"upstream_{self.kind}"


class UpstreamNotConfigured(UpstreamError):
    """No upstream URL is set: not a failure of the upstream, answered 503 rather than 502."""

    kind = "not_configured"


class UpstreamTimeout(UpstreamError, TimeoutError):
    kind = "timeout"


class UpstreamConnectionError(UpstreamError, ConnectionError):
    kind = "connection_error"


class UpstreamTlsError(UpstreamConnectionError):
    kind = "tls_error"


class UpstreamProtocolError(UpstreamError):
    kind = "protocol_error"


class UpstreamResponseTooLarge(UpstreamError):
    """The upstream's answer is longer than PROXY_RESPONSE_LIMIT."""

    kind = "response_too_large"


class _PauseHonouringRetry(Retry):
    """Does not retry an answer whose Retry-After asks for a pause: the upstream guard pauses
    every request for it instead (UPSTREAM_RETRY_AFTER_MAX_SECONDS)."""

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if has_retry_after and status_code in self.RETRY_AFTER_STATUS_CODES:
            return False
        return super().is_retry(method, status_code, has_retry_after)


def retry_policy(retries: int, *, honour_retry_after: bool = False) -> Retry:
    policy = _PauseHonouringRetry if honour_retry_after else Retry
    return policy(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=0,
        redirect=False,
        allowed_methods=RETRYABLE_METHODS,
        status_forcelist=RETRY_STATUSES,
        backoff_factor=RETRY_BACKOFF_FACTOR_S,
        backoff_max=RETRY_BACKOFF_MAX_S,
        # An upstream Retry-After could hold the client for minutes; our backoff is bounded.
        respect_retry_after_header=False,
        raise_on_status=False,
        raise_on_redirect=False,
    )


# A request whose body may already have reached the upstream is sent once.
SINGLE_ATTEMPT = Retry(total=0, redirect=False, raise_on_status=False, raise_on_redirect=False)


def join_url(base_url: str, path: str, query: str = "") -> str:
    """Append a path (and raw query) to the base URL, keeping the base's own path."""
    if not path.startswith("/"):
        path = "/" + path
    url = base_url.rstrip("/") + path
    return f"{url}?{query}" if query else url


def our_error(exc: Exception, *, method: str, url: str, reading_body: bool) -> UpstreamError:
    """The one place where library errors become ours (``reading_body``: the headers had
    arrived and the body was being read)."""
    reason: object = exc
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        reason = exc.reason
    if isinstance(reason, urllib3.exceptions.ProtocolError) and len(reason.args) > 1:
        # "Connection aborted.": what went wrong is the second argument.
        reason = reason.args[1]
    if isinstance(reason, urllib3.exceptions.NewConnectionError):  # refused, unresolvable
        return UpstreamConnectionError("could not connect to the upstream", method=method, url=url)
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return UpstreamTimeout("connecting to the upstream timed out", method=method, url=url)
    if isinstance(reason, (urllib3.exceptions.TimeoutError, TimeoutError)):
        if reading_body:
            return UpstreamTimeout(
                "the upstream stopped sending its response", method=method, url=url
            )
        return UpstreamTimeout("the upstream did not answer in time", method=method, url=url)
    if isinstance(reason, urllib3.exceptions.SSLError):
        return UpstreamTlsError("TLS handshake with the upstream failed", method=method, url=url)
    if isinstance(reason, OSError) and not reading_body:  # reset or closed before an answer
        return UpstreamConnectionError("could not connect to the upstream", method=method, url=url)
    return UpstreamProtocolError("the upstream sent a broken response", method=method, url=url)


# What the ladder above is given: everything urllib3 and http.client raise while sending a
# request or reading its answer.
_LIBRARY_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


class UpstreamResponse:
    """An upstream answer whose headers have arrived. Its body is read on demand: ``buffer``
    reads it into ``body`` when it is small enough, ``chunks`` passes it on piece by piece.
    Whoever holds a response that is not ``complete`` must iterate or ``close`` it."""

    def __init__(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        body: bytes = b"",
        elapsed_ms: float = 0.0,
        *,
        raw: urllib3.BaseHTTPResponse | None = None,
        method: str = "GET",
        url: str = "",
        limit_bytes: int | None = None,
        on_error: Callable[[UpstreamError], None] | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body  # the body, or while not ``complete`` the part read so far
        self.elapsed_ms = elapsed_ms
        self._raw = raw  # None once the body has been read in full, or the response closed
        self._method = method
        self._url = url
        self._limit_bytes = limit_bytes
        self._on_error = on_error
        self._received = len(body)

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    @property
    def complete(self) -> bool:
        """Whether ``body`` holds the whole body."""
        return self._raw is None

    @property
    def content_length(self) -> int | None:
        """The body's length as the upstream framed it (None when chunked or unknown)."""
        if self._raw is None:
            return len(self.body)
        remaining = self._raw.length_remaining
        return None if remaining is None else self._received + remaining

    def buffer(self, most_bytes: int) -> bool:
        """Read the rest of the body into ``body`` if the whole body is at most ``most_bytes``;
        say whether it was. A longer body is read only a little past that bound (its start
        stays in ``body`` for ``chunks``), or not at all when its length is known."""
        if self._raw is None:
            return True
        length = self.content_length
        if length is not None and length > most_bytes:
            return False
        parts = [self.body]
        size = len(self.body)
        while size <= most_bytes:
            piece = self._read(min(CHUNK_BYTES, most_bytes + 1 - size), reading=False)
            if not piece:
                break
            parts.append(piece)
            size += len(piece)
        self.body = b"".join(parts)
        return self._raw is None

    def chunks(self) -> Iterator[bytes]:
        """The body from its start: what was read already, then the rest as it arrives. Raises
        UpstreamError when the upstream fails (or the body outgrows PROXY_RESPONSE_LIMIT)
        part-way; the connection is closed then."""
        if self.body:
            yield self.body
        while self._raw is not None:
            piece = self._read(CHUNK_BYTES, reading=True)
            if piece:
                yield piece

    def close(self) -> None:
        """Done with the body: a connection whose body was not read to its end is closed, never
        handed to another request."""
        raw, self._raw = self._raw, None
        if raw is not None:
            raw.close()

    def _read(self, most_bytes: int, *, reading: bool) -> bytes:
        """One piece of the body (b"" at its end, when the connection has gone back to the
        pool). ``reading``: pieces are passed on as they come (read1), not gathered."""
        raw = self._raw
        assert raw is not None
        try:
            if reading:
                piece = raw.read1(most_bytes, decode_content=False)
            else:
                piece = raw.read(most_bytes, decode_content=False)
        except _LIBRARY_ERRORS as exc:
            self.close()
            error = our_error(exc, method=self._method, url=self._url, reading_body=True)
            self._failed(error, "the upstream failed while its body was read")
            raise error from exc
        if not piece:
            self._raw = None
            raw.release_conn()
            return b""
        self._received += len(piece)
        if self._limit_bytes is not None and self._received > self._limit_bytes:
            self.close()
            error = UpstreamResponseTooLarge(
                f"the upstream response is longer than {self._limit_bytes} bytes",
                method=self._method,
                url=self._url,
            )
            self._failed(error, "the upstream response outgrew PROXY_RESPONSE_LIMIT")
            raise error
        return piece

    def _failed(self, error: UpstreamError, message: str) -> None:
        if self._on_error is not None:
            self._on_error(error)
        log.warning(
            message,
            extra={"kind": error.kind, "received_bytes": self._received, "method": self._method},
        )


class UpstreamClient:
    """Sends requests to HTTP_CLIENT_BASE_URL; one instance per worker process."""

    def __init__(
        self,
        base_url: str | None,
        *,
        timeout_ms: int,
        retries: int,
        api_key: str = "",
        pool_size: int = 100,
        response_limit_bytes: int | None = None,
        honour_retry_after: bool = False,
        metrics: Metrics | None = None,
        guard: UpstreamGuard | None = None,
    ) -> None:
        self.base_url = base_url
        self._metrics = metrics
        self.guard = guard
        self.timeout_s = timeout_ms / 1000
        # The longest one request may take: connect and read timeouts for every attempt, plus
        # the pauses between attempts.
        self.max_duration_s = (retries + 1) * 2 * self.timeout_s + retries * RETRY_BACKOFF_MAX_S
        self.response_limit_bytes = response_limit_bytes
        self._api_key = api_key
        self._retrying = retry_policy(retries, honour_retry_after=honour_retry_after)
        self._timeout = Timeout(connect=self.timeout_s, read=self.timeout_s)
        self._pool: urllib3.HTTPConnectionPool | None = None
        self._base_path = ""
        self._auth: dict[str, str] = {}
        if base_url:
            self._pool, self._base_path, self._auth = _connection_pool(base_url, pool_size)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        metrics: Metrics | None = None,
        guard: UpstreamGuard | None = None,
    ) -> UpstreamClient:
        return cls(
            settings.upstream_base_url,
            timeout_ms=settings.upstream_timeout_ms,
            retries=settings.upstream_retries,
            api_key=settings.upstream_api_key,
            pool_size=settings.worker_connections,
            response_limit_bytes=settings.proxy_response_limit_bytes,
            honour_retry_after=settings.upstream_retry_after_max_s > 0,
            metrics=metrics,
            guard=guard,
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> UpstreamResponse:
        """Send one request (retried per policy) and read its whole answer; the body is
        returned exactly as received. For answers of any size use ``open``."""
        response = self.open(method, path, query=query, headers=headers, body=body)
        try:
            response.body = b"".join(response.chunks())
        finally:
            response.close()
        return response

    def open(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> UpstreamResponse:
        """Send one request (retried per policy) and return once the answer's headers are in;
        a short body of known length is read along, a longer one is left for the caller to
        read or close. An answer longer than PROXY_RESPONSE_LIMIT by its content-length is
        refused here (UpstreamResponseTooLarge), before any of it is read."""
        method = method.upper()
        if self.guard is None:
            try:
                response = self._send(method, path, query, headers, body)
            except UpstreamError as exc:
                self._count_error(exc)
                raise
        else:
            # Raises UpstreamRefused when the guard holds the request back; the slot it holds
            # is given back once the answer's headers are in (a long body streaming to the
            # client does not hold it).
            with self.guard.passage(method, join_url(self.base_url or "", path, query)) as way:
                try:
                    response = self._send(method, path, query, headers, body)
                except UpstreamError as exc:
                    way.failed(exc)
                    self._count_error(exc)
                    raise
                way.answered(response.status, response.header("retry-after"))
        if self._metrics is not None:
            self._metrics.observe_upstream(method, response.elapsed_ms / 1000)
        return response

    def _count_error(self, error: UpstreamError) -> None:
        if self._metrics is not None:
            self._metrics.upstream_errors.labels(error.kind).inc()

    def _send(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str] | None,
        body: bytes | None,
    ) -> UpstreamResponse:
        if self._pool is None or not self.base_url:
            raise UpstreamNotConfigured("HTTP_CLIENT_BASE_URL is not set", method=method, url=path)
        url = join_url(self.base_url, path, query)
        target = join_url(self._base_path, path, query)
        sent_headers = {**self._auth, **(headers or {})}
        if self._api_key:
            sent_headers["api_key"] = self._api_key
        for name in _LIBRARY_DEFAULT_HEADERS:
            # Only what the proxy chose goes out: no python-urllib3 user agent, no
            # accept-encoding of http.client's own.
            sent_headers.setdefault(name, SKIP_HEADER)
        # A body is never sent twice, whatever the method.
        retryable = method in RETRYABLE_METHODS and not body
        started = time.perf_counter()
        try:
            raw = self._pool.urlopen(
                method,
                target,
                body=body,
                headers=sent_headers,
                retries=self._retrying if retryable else SINGLE_ATTEMPT,
                redirect=False,
                assert_same_host=False,
                timeout=self._timeout,
                preload_content=False,
                # Undecoded bytes: content-encoding and content-length stay true to the body.
                decode_content=False,
            )
        except _LIBRARY_ERRORS as exc:
            raise our_error(exc, method=method, url=url, reading_body=False) from exc
        response = UpstreamResponse(
            raw.status,
            list(raw.headers.items()),
            raw=raw,
            method=method,
            url=url,
            limit_bytes=self.response_limit_bytes,
            on_error=self._count_error,
        )
        length = response.content_length
        limit = self.response_limit_bytes
        if limit is not None and length is not None and length > limit:
            response.close()
            raise UpstreamResponseTooLarge(
                f"the upstream response is {length} bytes, longer than the limit of {limit}",
                method=method,
                url=url,
            )
        if length is not None and length <= READ_AHEAD_BYTES:
            response.buffer(READ_AHEAD_BYTES)
        response.elapsed_ms = (time.perf_counter() - started) * 1000
        return response


class _FinalResponse(http.client.HTTPResponse):
    """Reads past interim (1xx) responses to the final one. http.client skips only
    100 Continue; a 102 Processing or 103 Early Hints would otherwise be taken for the answer
    and the real one left on the connection (RFC 9110 section 15.2: a client must be able to
    parse and ignore interim responses)."""

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]
            # 101 switches protocols and is the answer; 100 is skipped by http.client itself.
            if status < 102 or status >= 200:
                return version, status, reason
            http.client.parse_headers(self.fp)  # the interim response's fields, dropped


class _HTTPConnection(urllib3.connection.HTTPConnection):
    response_class = _FinalResponse


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    response_class = _FinalResponse


def _connection_pool(
    base_url: str, pool_size: int
) -> tuple[urllib3.HTTPConnectionPool, str, dict[str, str]]:
    """The pool for the base URL's origin, the base path, and the basic auth header its
    credentials stand for (as requests would have sent them)."""
    parts = parse_url(base_url)
    auth = make_headers(basic_auth=unquote(parts.auth)) if parts.auth else {}
    host = parts.host or ""
    pool: urllib3.HTTPConnectionPool
    if parts.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(
            host,
            parts.port,
            maxsize=pool_size,
            block=False,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
        )
        pool.ConnectionCls = _HTTPSConnection
    else:
        pool = urllib3.HTTPConnectionPool(host, parts.port, maxsize=pool_size, block=False)
        pool.ConnectionCls = _HTTPConnection
    return pool, (parts.path or "").rstrip("/"), auth
