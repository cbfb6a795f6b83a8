"""The client for the one upstream API: pooled connections, timeouts, a retry policy, and the
place where requests/urllib3 errors become ours."""

from __future__ import annotations

import dataclasses
import http.cookiejar
import time
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from proxy_app.memo import remembered
from proxy_app.metrics import Metrics
from proxy_app.settings import Settings

# Methods whose repetition cannot change anything upstream and that carry no body to resend.
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
# Gateway-ish statuses that say "try again", not "your request is wrong".
RETRY_STATUSES = frozenset({502, 503, 504})
# Short backoff between attempts (0.05 s, 0.1 s, ...): the client is waiting.
RETRY_BACKOFF_FACTOR_S = 0.05
# No single backoff pause may exceed this, whatever the attempt.
RETRY_BACKOFF_MAX_S = 1.0


class UpstreamError(Exception):
    """A request to the upstream failed; carries the method and URL (which hold no secret)."""

    kind = "upstream_error"

    def __init__(self, message: str, *, method: str, url: str) -> None:
        super().__init__(message)
        self.method = method
        self.url = url


class UpstreamNotConfigured(UpstreamError):
    kind = "upstream_not_configured"


class UpstreamTimeout(UpstreamError, TimeoutError):
    kind = "timeout"


class UpstreamConnectionError(UpstreamError, ConnectionError):
    kind = "connection_error"


class UpstreamTlsError(UpstreamConnectionError):
    kind = "tls_error"


class UpstreamProtocolError(UpstreamError):
    kind = "protocol_error"


@dataclasses.dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: Sequence[tuple[str, str]]
    body: bytes
    elapsed_ms: float

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


class _RejectAllCookies(http.cookiejar.DefaultCookiePolicy):
    """The session is shared by every client: a cookie set for one must never reach another."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False


def retry_policy(retries: int) -> Retry:
    return Retry(
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


def _session(max_retries: Retry, pool_size: int) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc credentials from the environment
    session.headers.clear()  # no python-requests defaults: only what the proxy chose to send
    session.cookies.set_policy(_RejectAllCookies())
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=max_retries)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _prepare(
    method: str, url: str, headers: Mapping[str, str], body: bytes | None, *, url_auth: bool
) -> requests.PreparedRequest:
    """What ``requests.Request(...).prepare()`` builds, with each URL's preparation (parsing,
    IDNA, requoting) done once, and the URL's credentials looked for only when it has some."""
    prepared = requests.PreparedRequest()
    prepared.prepare_method(method)
    prepared.url = _prepared_url(url)
    prepared.prepare_headers(headers)
    prepared.prepare_cookies(None)  # an empty jar: none are kept, but requests expects one
    prepared.prepare_body(body, None)
    if url_auth:
        prepared.prepare_auth(None, url)
    prepared.prepare_hooks(None)
    return prepared


# The same few URLs come back again and again: up to 512 characters, the 1,024 most recent are
# remembered (at most about 1 MB per worker).
@remembered(most=1024, longest=512)
def _prepared_url(url: str) -> str:
    prepared = requests.PreparedRequest()
    prepared.prepare_url(url, None)
    return str(prepared.url)


def join_url(base_url: str, path: str, query: str = "") -> str:
    """Append a path (and raw query) to the base URL, keeping the base's own path."""
    if not path.startswith("/"):
        path = "/" + path
    url = base_url.rstrip("/") + path
    return f"{url}?{query}" if query else url


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
        metrics: Metrics | None = None,
    ) -> None:
        self.base_url = base_url
        self._metrics = metrics
        self.timeout_s = timeout_ms / 1000
        # The longest one request may take: connect and read timeouts for every attempt, plus
        # the pauses between attempts.
        self.max_duration_s = (retries + 1) * 2 * self.timeout_s + retries * RETRY_BACKOFF_MAX_S
        self._api_key = api_key
        # Credentials in the base URL become basic auth, as requests would send them.
        self._url_auth = bool(base_url) and "@" in urlsplit(base_url or "").netloc
        self._retrying = _session(retry_policy(retries), pool_size)
        self._single_attempt = _session(
            Retry(total=0, redirect=False, raise_on_status=False), pool_size
        )

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> UpstreamClient:
        return cls(
            settings.upstream_base_url,
            timeout_ms=settings.upstream_timeout_ms,
            retries=settings.upstream_retries,
            api_key=settings.upstream_api_key,
            pool_size=settings.worker_connections,
            metrics=metrics,
        )

    def close(self) -> None:
        self._retrying.close()
        self._single_attempt.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> UpstreamResponse:
        """Send one request (retried per policy); the body is returned exactly as received."""
        try:
            response = self._send(method.upper(), path, query, headers, body)
        except UpstreamError as exc:
            if self._metrics is not None:
                self._metrics.upstream_errors.labels(exc.kind).inc()
            raise
        if self._metrics is not None:
            self._metrics.observe_upstream(method.upper(), response.elapsed_ms / 1000)
        return response

    def _send(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str] | None,
        body: bytes | None,
    ) -> UpstreamResponse:
        if not self.base_url:
            raise UpstreamNotConfigured("HTTP_CLIENT_BASE_URL is not set", method=method, url=path)
        url = join_url(self.base_url, path, query)
        sent_headers = dict(headers or {})
        if self._api_key:
            sent_headers["api_key"] = self._api_key
        # A body is never sent twice, whatever the method.
        retryable = method in RETRYABLE_METHODS and not body
        session = self._retrying if retryable else self._single_attempt
        started = time.perf_counter()
        try:
            # Prepared here and sent as is: no merging of session headers, cookies or
            # environment settings, none of which the proxy wants.
            prepared = _prepare(method, url, sent_headers, body, url_auth=self._url_auth)
            response = session.send(
                prepared,
                stream=True,
                timeout=(self.timeout_s, self.timeout_s),
                allow_redirects=False,
                proxies={},
            )
            try:
                # Undecoded bytes: content-encoding and content-length stay true to the body.
                raw_body = response.raw.read(decode_content=False)
                raw_headers = list(response.raw.headers.items())
            finally:
                response.close()
        except requests.exceptions.ConnectTimeout as exc:
            raise UpstreamTimeout(
                "connecting to the upstream timed out", method=method, url=url
            ) from exc
        except requests.exceptions.ReadTimeout as exc:
            raise UpstreamTimeout(
                "the upstream did not answer in time", method=method, url=url
            ) from exc
        except requests.exceptions.SSLError as exc:
            raise UpstreamTlsError(
                "TLS handshake with the upstream failed", method=method, url=url
            ) from exc
        except requests.exceptions.ConnectionError as exc:
            reason = getattr(exc.args[0], "reason", None) if exc.args else None
            # NewConnectionError (refused, unreachable) subclasses urllib3's TimeoutError.
            refused = isinstance(reason, urllib3.exceptions.NewConnectionError)
            if isinstance(reason, urllib3.exceptions.TimeoutError) and not refused:
                raise UpstreamTimeout(
                    "the upstream did not answer in time", method=method, url=url
                ) from exc
            raise UpstreamConnectionError(
                "could not connect to the upstream", method=method, url=url
            ) from exc
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise UpstreamTimeout(
                "the upstream stopped sending its response", method=method, url=url
            ) from exc
        except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException) as exc:
            raise UpstreamProtocolError(
                "the upstream sent a broken response", method=method, url=url
            ) from exc
        elapsed_ms = (time.perf_counter() - started) * 1000
        return UpstreamResponse(response.status_code, raw_headers, raw_body, elapsed_ms)
