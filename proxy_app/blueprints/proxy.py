"""``/api/v1/<path>``: judge the request, send it upstream, hand back a filtered response."""

from __future__ import annotations

import orjson
from flask import Blueprint, Response, g, request
from werkzeug.routing import PathConverter

from proxy_app import services
from proxy_app.errors import (
    BadGateway,
    BadRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from proxy_app.forwarding import (
    filter_response_headers,
    forward_request_headers,
    split_raw_uri,
    upstream_path,
)
from proxy_app.upstream import UpstreamError, UpstreamNotConfigured, UpstreamResponse

PROXIED_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class AnyPathConverter(PathConverter):
    """Matches every path, including ``//host`` forms, so the proxy can judge them itself."""

    regex = r"[\s\S]*"  # anything, newlines included
    part_isolating = False  # the match spans slashes


bp = Blueprint("proxy", __name__)


@bp.route(
    "/api/v1", defaults={"path": ""}, methods=PROXIED_METHODS, provide_automatic_options=False
)
@bp.route("/api/v1/<anypath:path>", methods=PROXIED_METHODS, provide_automatic_options=False)
def proxy(path: str) -> Response:
    raw_path, raw_query = split_raw_uri(_raw_uri())
    target = upstream_path(raw_path, raw_query)
    body = _json_body()
    headers = forward_request_headers(request.headers.items(), g.request_id)
    try:
        upstream_response = services.upstream().request(
            request.method, target, query=raw_query, headers=headers, body=body
        )
    except UpstreamNotConfigured:
        raise ServiceUnavailable(
            "No upstream is configured (HTTP_CLIENT_BASE_URL).", code="upstream_not_configured"
        ) from None
    except UpstreamError as exc:
        services.metrics().upstream_errors.labels(exc.kind).inc()
        raise BadGateway(
            f"The upstream request failed: {exc}.", code=f"upstream_{exc.kind}", kind=exc.kind
        ) from None
    g.upstream_status = upstream_response.status
    g.upstream_ms = round(upstream_response.elapsed_ms, 2)
    services.metrics().upstream_latency.labels(request.method).observe(
        upstream_response.elapsed_ms / 1000
    )
    return client_response(upstream_response)


def client_response(upstream_response: UpstreamResponse) -> Response:
    """The client's copy of an upstream response: same status and body bytes, safe headers."""
    base_url = services.settings().upstream_base_url or ""
    headers = filter_response_headers(upstream_response.headers, base_url)
    response = Response(upstream_response.body, status=upstream_response.status)
    del response.headers["content-type"]
    for name, value in headers:
        response.headers.add(name, value)
    if request.method == "HEAD":
        length = upstream_response.header("content-length")
        if length is not None and length.isdigit():
            response.headers["content-length"] = length
    return response


def _raw_uri() -> str:
    environ = request.environ
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return str(raw)
    query = environ.get("QUERY_STRING", "")
    return request.script_root + request.path + (f"?{query}" if query else "")


def _json_body() -> bytes | None:
    """The request body when there is one: JSON only, within PROXY_BODY_LIMIT, bytes unchanged."""
    if request.method not in _BODY_METHODS:
        return None
    length = request.content_length
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if not length and not chunked:
        return None
    limit = services.settings().proxy_body_limit_bytes
    if length is not None and length > limit:
        raise PayloadTooLarge(
            f"The request body is {length} bytes; the limit is {limit}.", limit=limit
        )
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            "Request bodies must be JSON (content-type: application/json).",
            content_type=mimetype or None,
        )
    data = request.get_data(cache=False)  # reads at most limit + 1 bytes (MAX_CONTENT_LENGTH)
    if len(data) > limit:
        raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.", limit=limit)
    if not data:
        return None
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"The request body is not valid JSON: {exc}.", code="invalid_json"
        ) from None
    return data
