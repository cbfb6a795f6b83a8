"""``/api/v1/<path>``: judge the request, send it upstream, hand back a filtered response."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import orjson
from flask import Blueprint, Response, g, request
from werkzeug.datastructures import Headers
from werkzeug.routing import PathConverter

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

from proxy_app import services
from proxy_app.access.check import add_rate_limit_headers, charge_deferred, enforce_api_key
from proxy_app.cache.http import Served
from proxy_app.cache.policy import key_hash
from proxy_app.errors import (
    ApiError,
    BadGateway,
    BadRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from proxy_app.forwarding import (
    body_type_allowed,
    client_header_items,
    forward_request_headers,
    is_json_type,
    judge_target,
)
from proxy_app.http_connection import ResponseAborted
from proxy_app.logging import reset_request_id, set_request_id
from proxy_app.upstream import UpstreamError, UpstreamNotConfigured, UpstreamResponse
from proxy_app.upstream_guard import UpstreamRefused

PROXIED_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class AnyPathConverter(PathConverter):
    """Matches every path, including ``//host`` forms, so the proxy can judge them itself."""

    regex = r"[\s\S]*"  # anything, newlines included
    part_isolating = False  # the match spans slashes


bp = Blueprint("proxy", __name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyRequest:
    """What the request asks of the upstream, worked out once before the key check."""

    target: str | None  # the upstream path; None when the path was refused
    refusal: BadRequest | None
    query: str
    forwarded: dict[str, str]
    client_headers: list[tuple[str, str]]  # every request header, for Vary
    cache_key: str | None  # the entry a GET/HEAD may be answered from; None: no cache use


def plan_request() -> None:
    """before_request, ahead of the key check: judge the target and, for a GET or HEAD that may
    be answered from the cache, name the entry so the key check can read it along (one Redis
    round trip for both, when keys and cache share a Redis)."""
    judged = judge_target(_raw_uri())
    client_headers = client_header_items(request.environ)
    forwarded = forward_request_headers(client_headers, g.request_id, services.forwarded_headers())
    refusal = None
    if judged.refusal is not None:
        refusal = BadRequest(judged.refusal, code="invalid_path")
    cache_key = None
    if judged.path is not None and request.method in ("GET", "HEAD"):
        cache_key = services.proxy_cache().lookup_key(
            judged.path, judged.query, forwarded, [name for name, _ in client_headers]
        )
    g.proxy_request = ProxyRequest(
        judged.path, refusal, judged.query, forwarded, client_headers, cache_key
    )
    redis = services.redis()
    if redis.keys is redis.cache:
        g.cache_prefetch_key = cache_key


bp.before_request(plan_request)
bp.before_request(enforce_api_key)
bp.after_request(add_rate_limit_headers)


@bp.after_request
def _mark_uncached(response: Response) -> Response:
    """Answers the gateway made itself (401, 429, 400, 502, ...) came from no cache either."""
    response.headers.setdefault("x-cache", "BYPASS")
    return response


@bp.route(
    "/api/v1", defaults={"path": ""}, methods=PROXIED_METHODS, provide_automatic_options=False
)
@bp.route("/api/v1/<anypath:path>", methods=PROXIED_METHODS, provide_automatic_options=False)
def proxy(path: str) -> Response:
    planned: ProxyRequest = g.proxy_request
    if planned.target is None:
        raise planned.refusal or BadRequest("The path was refused.", code="invalid_path")
    target, raw_query, headers = planned.target, planned.query, planned.forwarded
    method = request.method
    body = _request_body(method)
    cache = services.proxy_cache()
    access = g.get("access")
    if access is not None and access.outcome == "deferred":
        # The key's plan makes cache hits free: charge only what will reach the upstream.
        reaches_upstream = method not in ("GET", "HEAD") or not cache.answerable(
            planned.cache_key, g.get("cache_prefetched"), headers, planned.client_headers
        )
        if reaches_upstream:
            charge_deferred()
    with _upstream_errors_as_responses():
        if method in ("GET", "HEAD"):
            served = cache.fetch(
                method,
                target,
                raw_query,
                headers,
                planned.cache_key,
                g.get("cache_prefetched"),
                planned.client_headers,
            )
        else:
            served = cache.forward_write(method, target, raw_query, headers, body)
    return client_response(served, method)


@contextlib.contextmanager
def _upstream_errors_as_responses() -> Iterator[None]:
    try:
        yield
    except UpstreamNotConfigured:
        raise ServiceUnavailable(
            "No upstream is configured (HTTP_CLIENT_BASE_URL).", code="upstream_not_configured"
        ) from None
    except UpstreamRefused as exc:  # held back to spare the upstream; no stored answer stood in
        raise ApiError(
            f"The upstream request was not sent: {exc}.",
            code=f"upstream_{exc.kind}",
            status=exc.status,
            headers={"retry-after": str(exc.retry_after_s)},
            kind=exc.kind,
            reason=exc.reason,
        ) from None
    except UpstreamError as exc:
        raise BadGateway(
            f"The upstream request failed: {exc}.", code=f"upstream_{exc.kind}", kind=exc.kind
        ) from None


class UpstreamAnswer(Response):
    """A response with the upstream's headers only: no content-type of Flask's own when the
    upstream sent none."""

    default_mimetype = None

    def get_wsgi_headers(self, environ: WSGIEnvironment) -> Headers:
        """The headers as they are. werkzeug's version copies them to make a relative Location
        absolute (off: ``autocorrect_location_header`` is False), to percent-encode IRIs in
        Location (these came over HTTP, so they are URIs already) and to count a body given as
        bytes for its content-length (counted already when it was set); what it does for
        bodiless statuses is still done by it."""
        status = self.status_code
        if status < 200 or status in (204, 304):
            return super().get_wsgi_headers(environ)
        return self.headers

    def get_app_iter(self, environ: WSGIEnvironment) -> Iterable[bytes]:
        """A body held in memory goes to the server as it is; werkzeug would wrap it in a
        generator and a closing iterator, needed only for a streamed body."""
        if self.is_streamed:
            return super().get_app_iter(environ)
        status = self.status_code
        if environ["REQUEST_METHOD"] == "HEAD" or status < 200 or status in (204, 304):
            return ()
        return self.response  # type: ignore[return-value]


def client_response(served: Served, method: str) -> Response:
    """The client's copy: status, body bytes and safe headers, plus what the cache did. A body
    still arriving from the upstream is passed on piece by piece as the server sends it."""
    headers = [*served.headers, ("x-cache", served.outcome.value)]
    if served.age_s is not None:
        headers.append(("age", str(served.age_s)))
    if served.stream is not None:
        streamed_length = served.stream.content_length
        if streamed_length is not None:
            # Known up front: the server sends the body as it is, without chunked framing.
            headers.append(("content-length", str(streamed_length)))
        body = StreamedBody(served.stream, g.get("request_id"))
        response = UpstreamAnswer(body, status=served.status, headers=headers)
    else:
        response = UpstreamAnswer(served.body, status=served.status, headers=headers)
    settings = services.settings()
    if settings.cache_debug and served.key is not None:
        response.headers["x-cache-key-hash"] = key_hash(served.key)
    if method == "HEAD" and served.upstream is not None and served.outcome == "BYPASS":
        length = served.upstream.header("content-length")
        if length is not None and length.isdigit():
            response.headers["content-length"] = length
    g.cache = served.outcome.value
    if served.upstream is not None:
        g.upstream_status = served.upstream.status
        g.upstream_ms = round(served.upstream.elapsed_ms, 2)
    services.metrics().count_cache_outcome(served.outcome.value)
    return response


class StreamedBody:
    """The WSGI body of a streamed answer. The server iterates it and calls ``close`` when done
    or when the client went away: an upstream connection left half-read is closed then, never
    reused. An upstream failure part-way is raised from the iteration, so that the server cuts
    the client's connection instead of ending a truncated body as if it were whole."""

    def __init__(self, upstream: UpstreamResponse, request_id: str | None) -> None:
        self._upstream = upstream
        # The request's context is gone by the time the server iterates: what is logged while
        # the body passes (an upstream failing part-way) still names the request.
        self._request_id = request_id

    def __iter__(self) -> Iterator[bytes]:
        pieces = self._upstream.chunks()
        while True:
            token = set_request_id(self._request_id)
            try:
                piece = next(pieces, None)
            except UpstreamError as exc:  # logged where it happened
                raise ResponseAborted(str(exc)) from exc
            finally:
                reset_request_id(token)
            if piece is None:
                return
            yield piece

    def close(self) -> None:
        self._upstream.close()


def _raw_uri() -> str:
    environ = request.environ
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return str(raw)
    query = environ.get("QUERY_STRING", "")
    return request.script_root + request.path + (f"?{query}" if query else "")


def _request_body(method: str) -> bytes | None:
    """The request body when there is one: of a type in PROXY_BODY_TYPES (JSON ones must parse),
    within PROXY_BODY_LIMIT, bytes unchanged."""
    if method not in _BODY_METHODS:
        return None
    length = request.content_length
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if not length and not chunked:
        return None
    settings = services.settings()
    limit = settings.proxy_body_limit_bytes
    if length is not None and length > limit:
        raise PayloadTooLarge(
            f"The request body is {length} bytes; the limit is {limit}.", limit=limit
        )
    mimetype = request.mimetype
    allowed = settings.proxy_body_types
    if not body_type_allowed(mimetype, allowed):
        raise UnsupportedMediaType(
            f"Request bodies must be of these types: {', '.join(allowed)}.",
            content_type=mimetype or None,
            allowed=list(allowed),
        )
    data = request.get_data(cache=False)  # reads at most limit + 1 bytes (MAX_CONTENT_LENGTH)
    if len(data) > limit:
        raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.", limit=limit)
    if not data:
        return None
    if not is_json_type(mimetype):
        return data
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"The request body is not valid JSON: {exc}.", code="invalid_json"
        ) from None
    return data
