"""``/api/v1/<path>``: judge the request, send it upstream, hand back a filtered response."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import orjson
from flask import Blueprint, Response, request
from werkzeug.datastructures import Headers
from werkzeug.routing import PathConverter

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

from proxy_app import headers as header_names
from proxy_app import request_state, services
from proxy_app.access import check as access_check
from proxy_app.access.check import AccessGate
from proxy_app.cache.http import ProxyCache, Served
from proxy_app.cache.policy import key_hash
from proxy_app.cache.store import Prefetched
from proxy_app.errors import (
    ApiError,
    BadGateway,
    BadRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
    answer_redis_outages,
)
from proxy_app.forwarding import (
    GATEWAY_PREFIX,
    PROXIED_METHODS,
    ProxyRequest,
    body_type_allowed,
    client_header_items,
    forward_request_headers,
    is_json_type,
    judge_target,
)
from proxy_app.http_connection import ResponseAborted
from proxy_app.logging import reset_request_id, set_request_id
from proxy_app.request_state import RequestState
from proxy_app.upstream import UpstreamError, UpstreamNotConfigured, UpstreamResponse
from proxy_app.upstream_guard import UpstreamRefused

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class AnyPathConverter(PathConverter):
    """Matches every path, including ``//host`` forms, so the proxy can judge them itself."""

    regex = r"[\s\S]*"  # anything, newlines included
    part_isolating = False  # the match spans slashes


def blueprint(
    gate: AccessGate, cache: ProxyCache, forwarded_headers: frozenset[str], *, read_along: bool
) -> Blueprint:
    """The proxy's routes and hooks, around the app's services. ``read_along``: keys and cache
    share a Redis, so the key check reads the cache entry in the same round trip."""
    bp = Blueprint("proxy", __name__)
    answer_redis_outages(bp, access_check.OUTAGE)

    @bp.before_request
    def admit_request() -> None:
        """Plan the request, then the key check and rate limit; for a GET or HEAD that may be
        answered from the cache, the entry is read along with the key check when it can be."""
        state = request_state.current()
        plan = state.proxy = plan_request(state.request_id, cache, forwarded_headers)
        also_read = plan.cache_key if read_along else None
        admission = gate.admit(request.environ, path=plan.target or "", also_read=also_read)
        state.key_id = admission.key_id
        state.access = admission.decision
        read = admission.decision.read_along
        if also_read is not None and read is not None:
            state.prefetched = Prefetched(also_read, read or None)
        gate.enforce_limit(admission)

    def charge_deferred(state: RequestState, plan: ProxyRequest) -> None:
        """For a plan whose cache hits are free: charge a request that goes to the upstream
        after all (a second round trip, on the way to a slower one)."""
        method = request.method
        reaches_upstream = method not in ("GET", "HEAD") or not cache.answerable(
            plan.cache_key, state.prefetched, plan.forwarded, plan.client_headers
        )
        if reaches_upstream:
            admission = gate.admit(request.environ, path=plan.target or "", charge=True)
            state.access = admission.decision
            gate.enforce_limit(admission)

    @bp.after_request
    def add_rate_limit_headers(response: Response) -> Response:
        """Every answer to a known key says where its limits stand."""
        access = request_state.current().access
        if access is not None and access.limits:
            # Appended: no answer carries these names before this point (upstream ones are not
            # passed on), so there is nothing to replace.
            response.headers.extend(access.headers())
        return response

    @bp.after_request
    def mark_uncached(response: Response) -> Response:
        """Answers the gateway made itself (401, 429, 400, 502, ...) came from no cache either."""
        response.headers.setdefault(header_names.CACHE, "BYPASS")
        return response

    methods = list(PROXIED_METHODS)

    @bp.route(
        GATEWAY_PREFIX, defaults={"path": ""}, methods=methods, provide_automatic_options=False
    )
    @bp.route(GATEWAY_PREFIX + "/<anypath:path>", methods=methods, provide_automatic_options=False)
    def proxy(path: str) -> Response:
        state = request_state.current()
        plan = state.proxy
        assert plan is not None  # made by admit_request, which ran first
        if plan.target is None:  # refused: plan.refusal says why
            raise BadRequest(str(plan.refusal), code="invalid_path")
        method = request.method
        body = _request_body(method)
        if state.access is not None and state.access.outcome == "deferred":
            charge_deferred(state, plan)
        with _upstream_errors_as_responses():
            if method in ("GET", "HEAD"):
                served = cache.fetch(
                    method,
                    plan.target,
                    plan.query,
                    plan.forwarded,
                    plan.cache_key,
                    state.prefetched,
                    plan.client_headers,
                )
            else:
                served = cache.forward_write(method, plan.target, plan.query, plan.forwarded, body)
        return client_response(served, method, state)

    return bp


def plan_request(
    request_id: str, cache: ProxyCache, forwarded_headers: frozenset[str]
) -> ProxyRequest:
    """What the request asks of the upstream: the target judged, the headers to forward and,
    for a GET or HEAD that may be answered from the cache, the entry's key."""
    judged = judge_target(_raw_uri())
    client_headers = client_header_items(request.environ)
    forwarded = forward_request_headers(client_headers, request_id, forwarded_headers)
    cache_key = None
    if judged.path is not None and request.method in ("GET", "HEAD"):
        cache_key = cache.lookup_key(
            judged.path, judged.query, forwarded, [name for name, _ in client_headers]
        )
    return ProxyRequest(
        judged.path, judged.refusal, judged.query, forwarded, client_headers, cache_key
    )


@contextlib.contextmanager
def _upstream_errors_as_responses() -> Iterator[None]:
    try:
        yield
    except UpstreamNotConfigured as exc:
        raise ServiceUnavailable(
            "No upstream is configured (HTTP_CLIENT_BASE_URL).", code=exc.code
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
            f"The upstream request failed: {exc}.", code=exc.code, kind=exc.kind
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


def client_response(served: Served, method: str, state: RequestState) -> Response:
    """The client's copy: status, body bytes and safe headers, plus what the cache did. A body
    still arriving from the upstream is passed on piece by piece as the server sends it."""
    headers = [*served.headers, (header_names.CACHE, served.outcome.value)]
    if served.age_s is not None:
        headers.append((header_names.AGE, str(served.age_s)))
    if served.stream is not None:
        streamed_length = served.stream.content_length
        if streamed_length is not None:
            # Known up front: the server sends the body as it is, without chunked framing.
            headers.append(("content-length", str(streamed_length)))
        body = StreamedBody(served.stream, state.request_id)
        response = UpstreamAnswer(body, status=served.status, headers=headers)
    else:
        response = UpstreamAnswer(served.body, status=served.status, headers=headers)
    settings = services.settings()
    if settings.cache_debug and served.key is not None:
        response.headers[header_names.CACHE_KEY_HASH] = key_hash(served.key)
    if method == "HEAD" and served.upstream is not None and served.outcome == "BYPASS":
        length = served.upstream.header("content-length")
        if length is not None and length.isdigit():
            response.headers["content-length"] = length
    state.cache = served.outcome.value
    if served.upstream is not None:
        state.upstream_status = served.upstream.status
        state.upstream_ms = round(served.upstream.elapsed_ms, 2)
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
            contentType=mimetype or None,
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
