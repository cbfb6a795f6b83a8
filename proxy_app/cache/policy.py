"""HTTP caching decisions of a shared cache (RFC 9111, RFC 5861): which requests may use the
cache, which responses may be stored, for how long they are fresh and may be served stale, and
the Redis key of a response variant. Pure functions: no I/O."""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import functools
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence

from proxy_app.settings import Settings

KEY_PREFIX = "proxy:GET:"
INDEX_PREFIX = "proxy:index:"
VARIANT_SEPARATOR = "#"  # never part of a request target: it would start a fragment

# Request headers that select a representation; every cache key covers them.
VARIANT_HEADERS = ("accept", "accept-encoding", "accept-language")
# Conditional request headers the cache answers itself (after fetching a full response).
CONDITIONAL_HEADERS = ("if-none-match", "if-modified-since")
# With these a client asks about a specific stored state; such requests go straight upstream.
PRECONDITION_HEADERS = ("if-match", "if-unmodified-since", "if-range", "range")
# Cacheable statuses: the 2xx family minus 204 (no content) and 206 (partial content).
UNCACHEABLE_2XX = frozenset({204, 206})
# Responses larger than this are passed through, never stored.
MAX_STORED_BODY_BYTES = 8 * 1024 * 1024
# An entry that carries a validator is kept this long after it stops being usable, so that an
# expired entry can be revalidated with a conditional request instead of refetched in full.
VALIDATOR_RETENTION_S = 600.0

_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")
_DIRECTIVE = re.compile(
    r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^,]*))?\s*(?:,|$)'
)


def parse_cache_control(values: Iterable[str]) -> dict[str, str | None]:
    """Cache-Control directives, names lowercased; ``max-age=60`` -> {"max-age": "60"}."""
    directives: dict[str, str | None] = {}
    for value in values:
        for match in _DIRECTIVE.finditer(value):
            name, argument = match.group(1).lower(), match.group(2)
            if argument is not None:
                argument = argument.strip()
                if argument.startswith('"') and argument.endswith('"') and len(argument) >= 2:
                    argument = argument[1:-1]
            directives.setdefault(name, argument)
    return directives


# A member of a Structured Fields Dictionary (RFC 8941) as targeted fields use them: a key,
# optionally an integer, token or string, optionally parameters.
_SF_MEMBER = re.compile(
    r'[a-z*][a-z0-9_.*-]*(?:=(?:-?\d{1,15}|"(?:[^"\\]|\\["\\])*"|[A-Za-z*][^,;\s"]*))?(?:;[^,]*)?'
)


_SF_INTEGER = re.compile(r"-?[0-9]{1,15}")
_INTEGER_DIRECTIVES = frozenset({"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"})


def _right_type(member: str) -> bool:
    """Whether a targeted field's member gives a directive that takes seconds an integer
    (``max-age="60"`` is a string: the field is invalid, RFC 9213 section 2.1)."""
    key, has_value, value = member.partition(";")[0].partition("=")
    if key.lower() not in _INTEGER_DIRECTIVES:
        return True
    return bool(has_value) and _SF_INTEGER.fullmatch(value.strip()) is not None


def targeted_fields(settings: Settings) -> tuple[str, ...]:
    """The targeted cache-control fields this cache obeys (RFC 9213), most specific first: the
    gateway's own, then CDN-Cache-Control."""
    own = (settings.cache_control_field,) if settings.cache_control_field else ()
    return own + (("cdn-cache-control",) if settings.cache_cdn_control else ())


def control_directives(
    headers: Sequence[tuple[str, str]], targeted: Sequence[str] = ()
) -> dict[str, str | None]:
    """The directives this cache follows: those of the first targeted field present and valid,
    which then replaces Cache-Control entirely for this cache (RFC 9213 section 2.1); else
    Cache-Control's. A targeted field that is not a valid dictionary is ignored."""
    for name in targeted:
        values = header_values(headers, name)
        if not values:
            continue
        members = [member.strip() for value in values for member in value.split(",")]
        if all(_SF_MEMBER.fullmatch(member) and _right_type(member) for member in members):
            return parse_cache_control(values)
    return parse_cache_control(header_values(headers, "cache-control"))


def delta_seconds(directives: Mapping[str, str | None], name: str) -> int | None:
    """A directive's non-negative integer argument, or None when absent or malformed."""
    raw = directives.get(name)
    if raw is None or not raw.isdigit():
        return None
    return int(raw)


def http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


_DAY_NAMES = "Mon|Tue|Wed|Thu|Fri|Sat|Sun"
_LONG_DAY_NAMES = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH = "(" + "|".join(_MONTHS) + ")"
_TIME = r"(\d\d):(\d\d):(\d\d)"
# The three HTTP-date forms of RFC 9110 section 5.6.7, exactly as written there (names are
# case-sensitive, one space between parts, always GMT).
_IMF_FIXDATE = re.compile(rf"(?:{_DAY_NAMES}), (\d\d) {_MONTH} (\d{{4}}) {_TIME} GMT")
_RFC850_DATE = re.compile(rf"(?:{_LONG_DAY_NAMES}), (\d\d)-{_MONTH}-(\d\d) {_TIME} GMT")
_ASCTIME_DATE = re.compile(rf"(?:{_DAY_NAMES}) {_MONTH} ([ \d]\d) {_TIME} (\d{{4}})")


def strict_http_date(value: str | None) -> float | None:
    """An HTTP-date in one of its three exact forms, or None for anything else: an Expires
    that is not one means "already expired" (RFC 9111 section 5.3), so a lenient reading of a
    malformed value would make a response fresh that is not."""
    if not value:
        return None
    value = value.strip(" \t")
    if match := _IMF_FIXDATE.fullmatch(value):
        day, month, year, hour, minute, second = match.groups()
    elif match := _RFC850_DATE.fullmatch(value):
        day, month, short_year, hour, minute, second = match.groups()
        # Two-digit years: the one that is not more than 50 years in the future (section 5.6.7).
        this_year = datetime.datetime.now(datetime.UTC).year
        year_number = this_year - this_year % 100 + int(short_year)
        if year_number > this_year + 50:
            year_number -= 100
        year = str(year_number)
    elif match := _ASCTIME_DATE.fullmatch(value):
        month, day, hour, minute, second, year = match.groups()
    else:
        return None
    try:
        parsed = datetime.datetime(
            int(year),
            _MONTHS.index(month) + 1,
            int(day),
            int(hour),
            int(minute),
            int(second),
            tzinfo=datetime.UTC,
        )
    except ValueError:  # 31 Feb, 25:00, ...
        return None
    return parsed.timestamp()


def header_values(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


def first_header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    values = header_values(headers, name)
    return values[0] if values else None


# --- keys ------------------------------------------------------------------------------------


def normalize_variant_value(name: str, value: str | None) -> str:
    """Equivalent header values map to one cache variant (case, spacing, token order)."""
    if not value:
        return ""
    tokens = [" ".join(token.split()).lower() for token in value.split(",") if token.strip()]
    if name == "accept-encoding":
        kept = []
        for token in tokens:
            coding, _, params = token.partition(";")
            if params.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
                continue
            kept.append(coding.strip())
        return ",".join(sorted(set(kept)))
    return ",".join(token.replace(" ;", ";").replace("; ", ";") for token in tokens)


def request_target(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


def variant_id(headers: Mapping[str, str], added: tuple[str, ...] = ()) -> str:
    """The variant a request selects: its representation headers, and the request headers an
    operator added to the forwarded ones (``added``), which may select anything (a tenant) and
    are therefore always part of the key, whatever the upstream's Vary says."""
    return _variant_id(
        tuple(headers.get(name) for name in VARIANT_HEADERS),
        added,
        tuple(headers.get(name) for name in added),
    )


@functools.lru_cache(maxsize=4096)
def _variant_id(
    values: tuple[str | None, ...], added: tuple[str, ...], added_values: tuple[str | None, ...]
) -> str:
    # Clients send few distinct combinations: hash each once per worker, not once per request.
    material = "\n".join(
        f"{name}:{normalize_variant_value(name, value)}"
        for name, value in zip(VARIANT_HEADERS, values, strict=True)
    )
    # Added headers are compared exactly (tenant "A" is not tenant "a"), and a missing header
    # is not an empty one.
    for name, value in zip(added, added_values, strict=True):
        material += f"\n+{name}" + ("!" if value is None else f"={value.strip()}")
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def cache_key(
    path: str, query: str, headers: Mapping[str, str], added: tuple[str, ...] = ()
) -> str:
    """``proxy:GET:<path>?<query>#<variant>``: readable up to the variant, so that operators can
    invalidate by path or prefix with SCAN; the variant hashes the representation headers and
    the ``added`` forwarded ones."""
    variant = variant_id(headers, added)
    return f"{KEY_PREFIX}{request_target(path, query)}{VARIANT_SEPARATOR}{variant}"


def index_key(target: str) -> str:
    """The set of variant keys stored for one request target."""
    return f"{INDEX_PREFIX}{target}"


def key_hash(key: str) -> str:
    """What CACHE_DEBUG shows: identifies an entry without revealing the path or query."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def glob_escape(text: str) -> str:
    return _GLOB_SPECIALS.sub(r"\\\1", text)


def target_pattern(target: str) -> str:
    """SCAN pattern matching every variant of exactly this request target."""
    return f"{KEY_PREFIX}{glob_escape(target)}{VARIANT_SEPARATOR}*"


def prefix_pattern(prefix: str) -> str:
    return f"{KEY_PREFIX}{glob_escape(prefix)}*"


# --- requests --------------------------------------------------------------------------------


def path_is_bypassed(path: str, bypass_prefixes: Iterable[str]) -> bool:
    """Prefixes match whole segments: ``/auth`` covers ``/auth`` and ``/auth/x``, but not
    ``/authors``."""
    for prefix in bypass_prefixes:
        if prefix.endswith("/"):
            if path.startswith(prefix) or path == prefix.rstrip("/"):
                return True
        elif path == prefix or path.startswith(prefix + "/"):
            return True
    return False


def request_bypass_reason(
    path: str, client_header_names: Iterable[str], bypass_prefixes: Iterable[str]
) -> str | None:
    """Why this GET/HEAD must not use the cache, or None."""
    names = {name.lower() for name in client_header_names}
    if "authorization" in names:
        return "authorization"
    if names.intersection(PRECONDITION_HEADERS):
        return "precondition"
    if path_is_bypassed(path, bypass_prefixes):
        return "bypass_path"
    return None


# --- responses -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Freshness:
    """How a stored response may be used, in seconds relative to when it was received."""

    lifetime_s: float
    initial_age_s: float
    stale_while_revalidate_s: float
    stale_if_error_s: float
    always_revalidate: bool

    @property
    def fresh_for_s(self) -> float:
        return max(0.0, self.lifetime_s - self.initial_age_s)


def unstorable_reason(
    status: int, headers: Sequence[tuple[str, str]], body_size: int, targeted: Sequence[str] = ()
) -> str | None:
    """Why a response to a GET must not be stored, or None when it may be (``targeted``: from
    ``targeted_fields``)."""
    if not 200 <= status < 300 or status in UNCACHEABLE_2XX:
        return "status"
    directives = control_directives(headers, targeted)
    if "no-store" in directives:
        return "no-store"
    if "private" in directives:
        return "private"
    if header_values(headers, "set-cookie"):
        return "set-cookie"
    vary = {v.strip().lower() for value in header_values(headers, "vary") for v in value.split(",")}
    if "*" in vary:
        return "vary-star"
    if body_size > MAX_STORED_BODY_BYTES:
        return "too-large"
    return None


def vary_header_names(headers: Sequence[tuple[str, str]]) -> list[str]:
    names = {
        v.strip().lower() for value in header_values(headers, "vary") for v in value.split(",")
    }
    return sorted(name for name in names if name and name != "*")


def selecting_value(
    name: str, forwarded: Mapping[str, str], client_headers: Sequence[tuple[str, str]]
) -> str | None:
    """The request's value of a header named by Vary (RFC 9111 section 4.1): the forwarded one,
    else what the client sent (lower-cased names, several lines combined), so that a response
    varying on a header the gateway does not forward is still matched on it."""
    value = forwarded.get(name)
    if value is not None or not client_headers:
        return value
    values = [item for header, item in client_headers if header == name]
    return ", ".join(values) if values else None


def has_validator(headers: Sequence[tuple[str, str]]) -> bool:
    return bool(first_header(headers, "etag") or first_header(headers, "last-modified"))


def freshness(
    headers: Sequence[tuple[str, str]],
    settings: Settings,
    *,
    request_time: float,
    response_time: float,
) -> Freshness:
    """Freshness lifetime, age on arrival and stale windows of a response (RFC 9111 section 4.2,
    RFC 5861); the settings supply the gateway's defaults."""
    default_stale_s = float(settings.cache_stale_ttl_s)
    if settings.cache_ignore_upstream_control:
        return Freshness(
            lifetime_s=float(settings.cache_ttl_default_s),
            initial_age_s=0.0,
            stale_while_revalidate_s=default_stale_s,
            stale_if_error_s=default_stale_s,
            always_revalidate=False,
        )
    directives = control_directives(headers, targeted_fields(settings))
    date_value = http_date(first_header(headers, "date"))
    s_maxage = delta_seconds(directives, "s-maxage")
    max_age = delta_seconds(directives, "max-age")
    lifetime: float
    if s_maxage is not None:
        lifetime = s_maxage
    elif max_age is not None:
        lifetime = max_age
    elif first_header(headers, "expires") is not None:
        expires = strict_http_date(first_header(headers, "expires"))
        # An invalid Expires (such as "0") means already expired.
        lifetime = max(0.0, expires - (date_value or response_time)) if expires else 0.0
    else:
        lifetime = float(settings.cache_ttl_default_s)

    always_revalidate = "no-cache" in directives
    if always_revalidate:
        lifetime = 0.0
    # must-revalidate/proxy-revalidate forbid stale use; s-maxage implies proxy-revalidate,
    # so only the origin's explicit stale-* directives may open a stale window then.
    forbid_stale = "must-revalidate" in directives or "proxy-revalidate" in directives
    # The default stale window belongs to the API-acceleration mode; with CACHE_TTL_DEFAULT=0
    # (a strictly standard cache) only the origin may permit stale use.
    default_allowed = settings.cache_ttl_default_s > 0 and not (
        forbid_stale or always_revalidate or s_maxage is not None
    )
    swr = delta_seconds(directives, "stale-while-revalidate")
    sie = delta_seconds(directives, "stale-if-error")
    stale_while_revalidate = (
        0.0
        if forbid_stale
        else float(swr if swr is not None else (default_stale_s if default_allowed else 0))
    )
    stale_if_error = (
        0.0
        if forbid_stale
        else float(sie if sie is not None else (default_stale_s if default_allowed else 0))
    )

    age_header = first_header(headers, "age")
    # A line listing several values ("7200, 0") counts by its first, as a second line would not.
    first_age = age_header.split(",", 1)[0].strip() if age_header else ""
    age_value = int(first_age) if first_age.isdigit() else 0
    apparent_age = max(0.0, response_time - date_value) if date_value else 0.0
    corrected_age = age_value + max(0.0, response_time - request_time)
    return Freshness(
        lifetime_s=lifetime,
        initial_age_s=max(apparent_age, corrected_age),
        stale_while_revalidate_s=stale_while_revalidate,
        stale_if_error_s=stale_if_error,
        always_revalidate=always_revalidate,
    )


def worth_storing(fresh: Freshness, validator: bool) -> bool:
    """A response that can never be served (already stale, no stale window, no validator to
    revalidate it with) is not worth a Redis write."""
    return (
        fresh.fresh_for_s > 0
        or fresh.stale_while_revalidate_s > 0
        or fresh.stale_if_error_s > 0
        or validator
    )


# --- conditional requests --------------------------------------------------------------------


def _etags(value: str) -> list[str]:
    return [tag.strip().removeprefix("W/") for tag in value.split(",") if tag.strip()]


def not_modified(
    request_headers: Mapping[str, str], response_headers: Sequence[tuple[str, str]]
) -> bool:
    """Whether a client's If-None-Match / If-Modified-Since is satisfied by this response, so a
    304 answers it (RFC 9110 section 13.2.2; weak comparison for If-None-Match)."""
    if_none_match = request_headers.get("if-none-match")
    if if_none_match is not None:
        etag = first_header(response_headers, "etag")
        if if_none_match.strip() == "*":
            return True
        if etag is None:
            return False
        return etag.strip().removeprefix("W/") in _etags(if_none_match)
    since = http_date(request_headers.get("if-modified-since"))
    if since is None:
        return False
    modified = http_date(first_header(response_headers, "last-modified"))
    return modified is not None and modified <= since


# Headers a 304 carries (RFC 9110 section 15.4.5).
NOT_MODIFIED_HEADERS = frozenset(
    {"cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified"}
)
