"""What may cross the gateway: the upstream path judged safe, the request headers allowed out,
and the response headers allowed back."""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from proxy_app import headers as header_names
from proxy_app.memo import remembered

#: Where the proxied API lives on the gateway: ``/api/v1/<path>`` goes upstream as ``/<path>``.
GATEWAY_PREFIX = "/api/v1"
#: The methods the gateway proxies (any other is refused with 405).
PROXIED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

# Representation, conditional, identity and tracing headers; everything else stays here
# (cookie, authorization, host, x-api-key, a caller's api_key, forwarded/x-forwarded-*, hop-by-hop).
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "content-type",
        "content-language",
        "user-agent",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "traceparent",
        "tracestate",
        "baggage",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
        "x-correlation-id",
    }
)

# Upstream response headers a client never sees: framing (the server sets it for the bytes it
# sends), cookies and server identity, the upstream's own auth challenges and rate-limit
# counters (the client's key and limits are the gateway's), the names the gateway sets itself
# (its own must not be duplicated or overridden), and headers about the upstream's origin
# rather than the gateway's (alternative services).
HIDDEN_RESPONSE_HEADERS = header_names.HOP_BY_HOP_HEADERS | frozenset(
    {
        "content-length",
        "set-cookie",
        "set-cookie2",
        "server",
        "x-powered-by",
        "www-authenticate",
        "proxy-authenticate",
        "proxy-authentication-info",
        header_names.RATELIMIT,
        header_names.RATELIMIT_POLICY,
        header_names.CACHE,
        header_names.CACHE_KEY_HASH,
        header_names.REQUEST_ID,
        header_names.AGE,
        "alt-svc",
    }
)
# Whole families: the upstream's rate-limit and quota counters, and its CORS answers (CORS is the
# gateway's decision, made per request; an upstream's would leak or contradict it).
HIDDEN_RESPONSE_HEADER_PREFIXES = ("x-ratelimit-", "ratelimit-", "x-quota-", "access-control-")

_SCHEME_PREFIX = re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*:[/\\]")
_PERCENT_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# Enough decoding rounds to see through double and triple encoding; deeper nesting is refused.
_MAX_DECODE_ROUNDS = 4


def is_proxied(path: str) -> bool:
    """Whether a gateway path is under GATEWAY_PREFIX."""
    return path == GATEWAY_PREFIX or path.startswith(GATEWAY_PREFIX + "/")


def strip_gateway_prefix(path: str) -> str:
    """Operators may write ``/api/v1/things``; the cache and bypass rules speak upstream paths."""
    if is_proxied(path):
        return path[len(GATEWAY_PREFIX) :] or "/"
    return path


def split_raw_uri(raw_uri: str) -> tuple[str, str]:
    """The path and the raw query string exactly as the client sent them."""
    if raw_uri.startswith(("http://", "https://")):  # absolute-form request target
        after_scheme = raw_uri.split("://", 1)[1]
        slash = after_scheme.find("/")
        raw_uri = after_scheme[slash:] if slash >= 0 else "/"
    path, _, query = raw_uri.partition("?")
    return path, query


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """A request target judged: the upstream path (None when refused, ``refusal`` then says
    why) and the normalised raw query."""

    path: str | None
    query: str
    refusal: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyRequest:
    """What a proxied request asks of the upstream, worked out once before the key check."""

    target: str | None  # the upstream path; None when the path was refused
    refusal: str | None  # why the path was refused
    query: str
    forwarded: dict[str, str]
    client_headers: list[tuple[str, str]]  # every request header, for Vary
    cache_key: str | None  # the entry a GET/HEAD may be answered from; None: no cache use


# Clients repeat their request targets: up to 256 characters, the 2,048 most recent are
# remembered once judged (at most about 1.5 MB per worker).
@remembered(most=2048, longest=256)
def judge_target(raw_uri: str) -> Target:
    """The upstream target for a raw request URI (path and query as the client sent them)."""
    raw_path, raw_query = split_raw_uri(raw_uri)
    query = normalize_percent_encoding(raw_query)
    refusal = target_refusal(raw_path, query)
    if refusal is not None:
        return Target(None, query, refusal)
    return Target(upstream_path(raw_path), query)


def target_refusal(raw_path: str, raw_query: str) -> str | None:
    """Why a gateway path and query may not be sent upstream (they could leave the upstream
    origin), or None."""
    if not is_proxied(raw_path):
        return f"The path is not under {GATEWAY_PREFIX}."
    problem = path_problem(raw_path[len(GATEWAY_PREFIX) :] or "/") or _query_problem(raw_query)
    if problem:
        return f"The path was refused: {problem}."
    return None


def upstream_path(raw_path: str) -> str:
    """The upstream path for a gateway path that ``target_refusal`` let through, still
    percent-encoded."""
    return normalize_percent_encoding(raw_path[len(GATEWAY_PREFIX) :] or "/")


def normalize_percent_encoding(text: str) -> str:
    """RFC 3986 normalisation: percent-encoded unreserved characters decoded, other escapes in
    upper case. Equivalent forms then share a cache entry and meet the same bypass rules, and
    the upstream gets what the HTTP client would send anyway."""
    if "%" not in text:
        return text
    return _PERCENT_ESCAPE.sub(_normalized_escape, text)


def _normalized_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def path_problem(path: str) -> str | None:
    """Why a raw upstream path is unsafe, or None. Every decoding of it is judged, so encoded
    and double-encoded variants are caught like the plain ones."""
    try:
        current = path.encode("ascii")
    except UnicodeEncodeError:
        return "non-ASCII characters must be percent-encoded"
    for _ in range(_MAX_DECODE_ROUNDS):
        problem = _decoded_path_problem(current)
        if problem:
            return problem
        decoded = unquote_to_bytes(current)
        if decoded == current:
            return None
        current = decoded
    return "too many levels of percent-encoding"


def _decoded_path_problem(path: bytes) -> str | None:
    if any(byte < 0x20 or byte == 0x7F for byte in path):
        return "control characters"
    if b"\\" in path:
        return "backslashes"
    if path.startswith(b"//"):
        return "a network-path reference (//host)"
    if _SCHEME_PREFIX.match(path.lstrip(b"/")):
        return "an absolute URL"
    if any(segment in (b".", b"..") for segment in path.split(b"/")):
        return "dot segments"
    return None


def _query_problem(query: str) -> str | None:
    if any(ord(ch) < 0x20 or ord(ch) >= 0x7F for ch in query) or "#" in query:
        return "the query string holds characters that must be percent-encoded"
    return None


def forwarded_request_headers(added: Iterable[str]) -> frozenset[str]:
    """The allowlist with the names an operator added (PROXY_FORWARD_REQUEST_HEADERS), built
    once."""
    return FORWARDED_REQUEST_HEADERS | frozenset(name.lower() for name in added)


# Lower-cased header names by WSGI environ key: clients repeat the same few (bounded: names are
# the client's choice).
_HEADER_NAMES: dict[str, str] = {}
_HEADER_NAMES_MOST = 512
_CONTENT_KEYS = {"CONTENT_TYPE": "content-type", "CONTENT_LENGTH": "content-length"}


def client_header_items(environ: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every request header as (lower-cased name, value), read straight off the WSGI environ:
    what ``request.headers`` would list, without building its title-cased names."""
    items = []
    names = _HEADER_NAMES
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = names.get(key)
            if name is None:
                name = key[5:].lower().replace("_", "-")
                if len(names) < _HEADER_NAMES_MOST:
                    names[key] = name
            items.append((name, value))
        elif key in _CONTENT_KEYS and value:
            items.append((_CONTENT_KEYS[key], value))
    return items


def forward_request_headers(
    headers: Iterable[tuple[str, str]],
    request_id: str,
    allowed: frozenset[str] = FORWARDED_REQUEST_HEADERS,
) -> dict[str, str]:
    """The ``allowed`` client headers (from ``forwarded_request_headers``), plus our request
    id; the upstream key is added later."""
    forwarded: dict[str, str] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered in allowed:
            forwarded[lowered] = f"{forwarded[lowered]}, {value}" if lowered in forwarded else value
    # Without this the upstream may compress for an encoding the client never asked for.
    forwarded.setdefault("accept-encoding", "identity")
    forwarded[header_names.REQUEST_ID] = request_id
    return forwarded


def body_type_allowed(mimetype: str, allowed: Iterable[str]) -> bool:
    """Whether a request body's media type (lowercased, without parameters) is among the
    ``allowed`` ranges: ``type/subtype``, ``type/*``, ``type/*+suffix`` or ``*/*``."""
    kind, _, subtype = mimetype.partition("/")
    for media_range in allowed:
        range_kind, _, range_subtype = media_range.partition("/")
        if range_kind == "*":
            return True
        if range_kind != kind or not subtype:
            continue
        if range_subtype in ("*", subtype):
            return True
        if range_subtype.startswith("*+") and subtype.endswith(range_subtype[1:]):
            return True
    return False


def is_json_type(mimetype: str) -> bool:
    return mimetype == "application/json" or mimetype.endswith("+json")


def hidden_response_headers(operator_hidden: Iterable[str]) -> frozenset[str]:
    """The response header names never passed on: the fixed ones and the operator's
    (PROXY_HIDE_RESPONSE_HEADERS), built once."""
    return HIDDEN_RESPONSE_HEADERS | frozenset(name.lower() for name in operator_hidden)


def filter_response_headers(
    headers: Iterable[tuple[str, str]],
    upstream_base_url: str,
    hidden: frozenset[str] = HIDDEN_RESPONSE_HEADERS,
) -> list[tuple[str, str]]:
    """The upstream's end-to-end response headers, names lowercased, without the ``hidden``
    ones (from ``hidden_response_headers``) and those its Connection header names; a Location
    into the upstream becomes a gateway path."""
    lowered_headers = [(name.lower(), value) for name, value in headers]
    connection_named = {
        token.strip().lower()
        for name, value in lowered_headers
        if name == "connection"
        for token in value.split(",")
    }
    passed = []
    for lowered, value in lowered_headers:
        if (
            lowered in hidden
            or lowered in connection_named
            or lowered.startswith(HIDDEN_RESPONSE_HEADER_PREFIXES)
        ):
            continue
        if lowered in ("location", "content-location"):
            value = gateway_location(value, upstream_base_url)
        passed.append((lowered, value))
    return passed


def gateway_location(location: str, upstream_base_url: str) -> str:
    """Map a Location that points into the upstream (absolute, or origin-relative under the
    base path) to the gateway path a client should follow; any other value is left alone."""
    base = upstream_base_url.rstrip("/")
    if location.startswith("//"):
        return location
    prefix = urlsplit(base).path.rstrip("/") if location.startswith("/") else base
    if prefix and location == prefix:
        return GATEWAY_PREFIX + "/"
    if location.startswith((prefix + "/", prefix + "?")):
        return GATEWAY_PREFIX + location[len(prefix) :]
    return location
