"""Every environment variable the service reads, declared once and loaded into frozen Settings.

Nothing else in the package reads ``os.environ``: the entry point passes the environment here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values
from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate

from proxy_app import headers
from proxy_app.forwarding import strip_gateway_prefix

LOG_LEVELS = ("debug", "info", "warning", "error")
SENTINEL_SCHEME = "redis+sentinel"
REDIS_URL_SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME)
DEFAULT_BODY_TYPES = ("application/json", "application/*+json")
# Request headers an operator may not add to the forwarded ones: credentials (the client's and
# the gateway's), the client's routing and connection, and framing the HTTP client sets itself.
UNFORWARDABLE_REQUEST_HEADERS = headers.HOP_BY_HOP_HEADERS | frozenset(
    {
        headers.API_KEY,
        "api_key",
        "cookie",
        "authorization",
        "proxy-authorization",
        "host",
        "forwarded",
        "content-length",
    }
)


def _secret() -> Any:
    """A secret setting: never shown (repr, start-up log, error lines), stripped of nothing,
    readable from a ``<NAME>_FILE``, and scrubbed from every log line."""
    return dataclasses.field(default="", repr=False, metadata={"secret": True})


class SettingsError(Exception):
    """Raised with every problem found, one human-readable line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    host: str = "0.0.0.0"  # noqa: S104 - a container's service listens on all its interfaces
    port: int = 3000
    log_level: str = "info"
    web_concurrency: int = 2
    worker_connections: int = 1000
    graceful_timeout_s: int = 30
    keepalive_s: int = 95
    shutdown_drain_s: int = 0
    client_request_timeout_s: int = 30
    upstream_base_url: str | None = None
    upstream_timeout_ms: int = 10_000
    upstream_retries: int = 2
    upstream_api_key: str = _secret()
    # Sparing the upstream (proxy_app/upstream_guard.py); each off unless set.
    upstream_max_concurrency: int | None = None  # per worker; None: unlimited
    upstream_queue_timeout_ms: int = 100
    upstream_rate_limit: int | None = None  # requests per second across replicas; None: none
    upstream_retry_after_max_s: int = 0  # 0: an upstream's Retry-After pauses nothing
    upstream_breaker_failures: int = 0  # 0: no circuit breaker
    upstream_breaker_cooldown_s: int = 30
    proxy_body_limit_bytes: int = 1_048_576
    proxy_response_limit_bytes: int | None = None  # None: upstream answers of any size
    proxy_hide_response_headers: tuple[str, ...] = ()  # lowercased names
    proxy_forward_request_headers: tuple[str, ...] = ()  # lowercased names
    proxy_body_types: tuple[str, ...] = DEFAULT_BODY_TYPES  # lowercased media ranges
    cors_allowed_origins: tuple[str, ...] = ()  # lowercased origins, or ("*",); empty: no CORS
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-For is believed
    cache_redis_url: str = "redis://127.0.0.1:6379/0"
    cache_ttl_default_s: int = 300
    cache_stale_ttl_s: int = 60
    cache_ignore_upstream_control: bool = False
    # RFC 9213 targeted fields: the gateway's own (lowercased; empty: none) and CDN-Cache-Control.
    cache_control_field: str = "gateway-cache-control"
    cache_cdn_control: bool = True
    cache_bypass_paths: tuple[str, ...] = ()
    cache_debug: bool = False
    api_keys_redis_url: str = "redis://127.0.0.1:6379/0"
    api_keys_redis_prefix: str = "api-keys"
    rate_limit_window_s: int = 60
    rate_limit_max_requests: int = 120
    outage_grace_s: int = 0  # 0: keyed requests fail closed while the keys' Redis is away
    outage_share: int = 1  # workers x replicas sharing the traffic, for grace's local limits
    redis_timeout_ms: int = 250
    admin_api_token: str = _secret()
    admin_auth_max_failures: int = 10
    version: str = "dev"
    deployment_id: str | None = None
    # Set by the entry point, not by the environment: where workers write their metric samples.
    metrics_multiproc_dir: str | None = None

    def masked(self) -> dict[str, Any]:
        """The resolved settings for the start-up log line; secrets shown only as set or empty."""
        shown = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            shown[name] = "(set)" if shown[name] else "(empty)"
        for name in ("cache_redis_url", "api_keys_redis_url"):
            shown[name] = mask_url_password(shown[name])
        return shown

    def secret_values(self) -> list[str]:
        """The values of the secret settings, for the log redaction."""
        return [getattr(self, name) for name in SECRET_FIELDS]


SECRET_FIELDS = tuple(
    field.name for field in dataclasses.fields(Settings) if field.metadata.get("secret")
)


def mask_url_password(url: str) -> str:
    """``redis://:secret@host`` -> ``redis://:***@host``; URLs without a password are unchanged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo = f"{parts.username or ''}:***"
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{userinfo}@{host}").geturl()


def _http_base_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("not an absolute http(s) URL")
    if parts.query or parts.fragment:
        raise ValidationError("must not carry a query string or fragment")
    if parts.username or parts.password:
        raise ValidationError("must not carry credentials (use HTTP_CLIENT_API_KEY)")


@dataclasses.dataclass(frozen=True, slots=True)
class SentinelURL:
    """``redis+sentinel://[[user]:password@]host1:26379,host2:26379/<master-name>/<db>``: the
    sentinels to ask, the name of the master they watch, and the database and credentials for
    the master (the sentinels themselves are asked without credentials)."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int
    username: str | None
    password: str | None


_SENTINEL_HOST = re.compile(
    r"^(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+))(?::(?P<port>\d{1,5}))?$"
)
_SENTINEL_PATH = re.compile(r"^/(?P<name>[A-Za-z0-9._-]+)(?:/(?P<db>\d{1,2}))?/?$")


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse the Sentinel form of a Redis URL; ValueError names what is wrong with it.

    Written here because urllib's parser reads one host per URL and redis-py takes the sentinels
    as a list, not as a URL."""
    scheme, sep, rest = url.partition("://")
    if scheme != SENTINEL_SCHEME or not sep:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    if "?" in rest or "#" in rest:
        raise ValueError("must not carry a query string or fragment")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for item in hosts.split(","):
        match = _SENTINEL_HOST.match(item.strip())
        if match is None:
            raise ValueError(f"has an invalid sentinel address {item.strip()!r}")
        port = int(match["port"] or 26379)
        if not 0 < port < 65536:
            raise ValueError(f"has an invalid port in {item.strip()!r}")
        sentinels.append((match["ipv6"] or match["host"], port))
    path_match = _SENTINEL_PATH.match(slash + path)
    if path_match is None:
        raise ValueError("must name the master after the hosts: /<master-name>[/<db>]")
    return SentinelURL(
        sentinels=tuple(sentinels),
        master_name=path_match["name"],
        db=int(path_match["db"] or 0),
        username=username,
        password=password,
    )


def _redis_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in REDIS_URL_SCHEMES:
        raise ValidationError("not a redis://, rediss://, unix:// or redis+sentinel:// URL")
    if parts.scheme == SENTINEL_SCHEME:
        try:
            parse_sentinel_url(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        return
    if parts.scheme != "unix" and not parts.hostname:
        raise ValidationError("has no host")
    try:
        parts.port  # noqa: B018 - urlsplit validates the port lazily
    except ValueError:
        raise ValidationError("has an invalid port") from None


def _path_prefixes(value: str) -> None:
    for prefix in _split_csv(value):
        if not prefix.startswith("/"):
            raise ValidationError(f"prefix {prefix!r} does not start with '/'")


# RFC 9110 section 5.1: a field name is a token.
_FIELD_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _header_names(value: str) -> None:
    for name in _split_csv(value):
        if not _FIELD_NAME.match(name):
            raise ValidationError(f"{name!r} is not a header name")


def _forwardable_header_names(value: str) -> None:
    _header_names(value)
    for name in _split_csv(value):
        lowered = name.lower()
        if lowered in UNFORWARDABLE_REQUEST_HEADERS or lowered.startswith("x-forwarded-"):
            raise ValidationError(f"{name!r} must never be forwarded")


_MEDIA_NAME = r"[a-z0-9!#$&^_.+-]+"
_MEDIA_RANGE = re.compile(
    rf"^(\*/\*|{_MEDIA_NAME}/(\*|\*\+{_MEDIA_NAME}|{_MEDIA_NAME}))$", re.IGNORECASE
)


def _media_ranges(value: str) -> None:
    ranges = _split_csv(value)
    if not ranges:
        raise ValidationError("names no media type")
    for media_range in ranges:
        if not _MEDIA_RANGE.match(media_range):
            raise ValidationError(f"{media_range!r} is not a media type")


def _origins(value: str) -> None:
    origins = _split_csv(value)
    if "*" in origins:
        if len(origins) > 1:
            raise ValidationError("'*' allows every origin and stands alone")
        return
    for origin in origins:
        parts = urlsplit(origin)
        try:
            parts.port  # noqa: B018 - urlsplit validates the port lazily
        except ValueError:
            raise ValidationError(f"{origin!r} has an invalid port") from None
        if (
            parts.scheme.lower() not in ("http", "https")
            or not parts.hostname
            or parts.username is not None
            or origin.rstrip("/") != f"{parts.scheme}://{parts.netloc}"
            or origin.endswith("/")
        ):
            raise ValidationError(f"{origin!r} is not an origin (scheme://host[:port])")


def _networks(value: str) -> None:
    for network in _split_csv(value):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValidationError(f"{network!r} is not an IP address or CIDR network") from None


def _split_csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _lowered_names(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name.lower() for name in _split_csv(value)))


def _int(env: str, expected: str, low: int, high: int | None = None) -> fields.Integer:
    return fields.Integer(
        data_key=env,
        strict=False,
        validate=validate.Range(min=low, max=high),
        metadata={"expected": expected},
        error_messages={"invalid": "not an integer"},
    )


def _bool(env: str) -> fields.Boolean:
    return fields.Boolean(
        data_key=env,
        metadata={"expected": "true or false"},
        error_messages={"invalid": "not a boolean"},
    )


def _str(env: str, expected: str, *validators: Any) -> fields.String:
    return fields.String(data_key=env, validate=list(validators), metadata={"expected": expected})


class _SettingsSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    host = _str(
        "HOST",
        "an IP address such as 0.0.0.0 or 127.0.0.1",
        validate.Regexp(r"^[0-9A-Fa-f.:]{2,45}$", error="not an IP address"),
    )
    port = _int("PORT", "an integer from 1 to 65535", 1, 65535)
    log_level = _str(
        "LOG_LEVEL",
        "one of " + ", ".join(LOG_LEVELS),
        validate.OneOf(LOG_LEVELS, error="not a known level"),
    )
    web_concurrency = _int("WEB_CONCURRENCY", "an integer from 1 to 64", 1, 64)
    worker_connections = _int("WORKER_CONNECTIONS", "an integer from 10 to 100000", 10, 100_000)
    graceful_timeout_s = _int("GRACEFUL_TIMEOUT", "seconds, an integer from 1 to 600", 1, 600)
    keepalive_s = _int("KEEPALIVE", "seconds, an integer from 1 to 3600", 1, 3600)
    client_request_timeout_s = _int(
        "CLIENT_REQUEST_TIMEOUT", "seconds, an integer from 1 to 600", 1, 600
    )
    shutdown_drain_s = _int("SHUTDOWN_DRAIN_SECONDS", "seconds, an integer from 0 to 300", 0, 300)
    upstream_base_url = _str(
        "HTTP_CLIENT_BASE_URL", "an http(s) URL such as https://api.example.com/v4", _http_base_url
    )
    upstream_timeout_ms = _int(
        "HTTP_CLIENT_TIMEOUT", "milliseconds, an integer from 1 to 600000", 1, 600_000
    )
    upstream_retries = _int("HTTP_CLIENT_RETRIES", "an integer from 0 to 10", 0, 10)
    upstream_api_key = _str("HTTP_CLIENT_API_KEY", "any string")
    upstream_max_concurrency = _int(
        "UPSTREAM_MAX_CONCURRENCY",
        "an integer from 1 to 100000 (requests in flight per worker); unset for no limit",
        1,
        100_000,
    )
    upstream_queue_timeout_ms = _int(
        "UPSTREAM_QUEUE_TIMEOUT_MS", "milliseconds, an integer from 0 to 60000", 0, 60_000
    )
    upstream_rate_limit = _int(
        "UPSTREAM_RATE_LIMIT",
        "requests per second, an integer from 1 to 1000000; unset for no limit",
        1,
        1_000_000,
    )
    upstream_retry_after_max_s = _int(
        "UPSTREAM_RETRY_AFTER_MAX_SECONDS",
        "seconds, an integer from 0 (off) to 3600",
        0,
        3600,
    )
    upstream_breaker_failures = _int(
        "UPSTREAM_BREAKER_FAILURES", "an integer from 0 (off) to 1000", 0, 1000
    )
    upstream_breaker_cooldown_s = _int(
        "UPSTREAM_BREAKER_COOLDOWN_SECONDS", "seconds, an integer from 1 to 3600", 1, 3600
    )
    proxy_body_limit_bytes = _int(
        "PROXY_BODY_LIMIT", "bytes, an integer from 0 to 104857600", 0, 100 * 1024 * 1024
    )
    proxy_response_limit_bytes = _int(
        "PROXY_RESPONSE_LIMIT",
        "bytes, an integer from 1024 to 1099511627776 (1 TiB); unset for no limit",
        1024,
        1024**4,
    )
    proxy_hide_response_headers = _str(
        "PROXY_HIDE_RESPONSE_HEADERS",
        "comma-separated header names such as x-internal-trace,x-backend",
        _header_names,
    )
    proxy_forward_request_headers = _str(
        "PROXY_FORWARD_REQUEST_HEADERS",
        "comma-separated header names such as idempotency-key,prefer,x-tenant "
        "(never credentials, host, forwarded, content-length or hop-by-hop headers)",
        _forwardable_header_names,
    )
    proxy_body_types = _str(
        "PROXY_BODY_TYPES",
        "comma-separated media types such as application/json,application/*+json,text/*",
        _media_ranges,
    )
    cors_allowed_origins = _str(
        "CORS_ALLOWED_ORIGINS",
        "comma-separated origins such as https://app.example.com,http://localhost:5173, or *",
        _origins,
    )
    trusted_proxies = _str(
        "TRUSTED_PROXIES",
        "comma-separated IP addresses or CIDR networks such as 10.0.0.0/8,fd00::/8",
        _networks,
    )
    cache_redis_url = _str("CACHE_REDIS_URL", "a URL such as redis://127.0.0.1:6379/0", _redis_url)
    cache_ttl_default_s = _int("CACHE_TTL_DEFAULT", "seconds, an integer >= 0", 0)
    cache_stale_ttl_s = _int("CACHE_STALE_TTL", "seconds, an integer >= 0", 0)
    cache_ignore_upstream_control = _bool("CACHE_IGNORE_UPSTREAM_CONTROL")
    cache_control_field = _str(
        "CACHE_CONTROL_FIELD",
        "a header name such as gateway-cache-control, or empty for none",
        _header_names,
    )
    cache_cdn_control = _bool("CACHE_CDN_CONTROL")
    cache_bypass_paths = _str(
        "CACHE_BYPASS_PATHS",
        "comma-separated path prefixes such as /auth,/users/me",
        _path_prefixes,
    )
    cache_debug = _bool("CACHE_DEBUG")
    api_keys_redis_url = _str(
        "API_KEYS_REDIS_URL", "a URL such as redis://127.0.0.1:6379/0", _redis_url
    )
    api_keys_redis_prefix = _str(
        "API_KEYS_REDIS_PREFIX",
        "letters, digits, '-', '_', ':' or '.'",
        validate.Regexp(r"^[A-Za-z0-9_.:-]{1,64}$", error="not a valid Redis key prefix"),
    )
    rate_limit_window_s = _int(
        "API_KEYS_RATE_LIMIT_WINDOW_SECONDS", "seconds, an integer from 1 to 86400", 1, 86_400
    )
    rate_limit_max_requests = _int(
        "API_KEYS_RATE_LIMIT_MAX_REQUESTS", "an integer from 1 to 10000000", 1, 10_000_000
    )
    outage_grace_s = _int(
        "API_KEYS_OUTAGE_GRACE_SECONDS", "seconds, an integer from 0 to 86400", 0, 86_400
    )
    outage_share = _int("API_KEYS_OUTAGE_SHARE", "an integer from 1 to 10000", 1, 10_000)
    redis_timeout_ms = _int(
        "REDIS_TIMEOUT_MS", "milliseconds, an integer from 1 to 10000", 1, 10_000
    )
    admin_api_token = _str("ADMIN_API_TOKEN", "any string")
    admin_auth_max_failures = _int(
        "ADMIN_AUTH_MAX_FAILURES", "an integer from 1 to 1000000", 1, 1_000_000
    )
    version = _str("GIT_SHA", "a version string", validate.Length(min=1, max=80))
    deployment_id = _str(
        "DEPLOY_ID",
        "letters, digits, '-', '_' or '.', at most 80",
        validate.Regexp(r"^[A-Za-z0-9_.-]{1,80}$", error="not a valid deployment id"),
    )

    @post_load
    def _to_settings(self, data: dict[str, Any], **_: Any) -> Settings:
        if data.get("log_level"):
            data["log_level"] = data["log_level"].lower()
        if "cache_bypass_paths" in data:
            data["cache_bypass_paths"] = tuple(
                strip_gateway_prefix(p) for p in _split_csv(data["cache_bypass_paths"])
            )
        if "proxy_hide_response_headers" in data:
            data["proxy_hide_response_headers"] = _lowered_names(
                data["proxy_hide_response_headers"]
            )
        if "cache_control_field" in data:
            data["cache_control_field"] = data["cache_control_field"].strip().lower()
        if "trusted_proxies" in data:
            data["trusted_proxies"] = tuple(
                str(ipaddress.ip_network(network, strict=False))
                for network in _split_csv(data["trusted_proxies"])
            )
        for name in ("proxy_forward_request_headers", "proxy_body_types", "cors_allowed_origins"):
            if name in data:
                data[name] = _lowered_names(data[name])
        if "api_keys_redis_url" not in data and "cache_redis_url" in data:
            data["api_keys_redis_url"] = data["cache_redis_url"]
        if data.get("upstream_base_url"):
            data["upstream_base_url"] = data["upstream_base_url"].rstrip("/")
        else:
            data.pop("upstream_base_url", None)
        return Settings(**data)


_EMPTY_MEANS_UNSET = frozenset(
    {"HTTP_CLIENT_BASE_URL", "API_KEYS_REDIS_URL", "GIT_SHA", "DEPLOY_ID", "PROXY_BODY_TYPES"}
)
_SCHEMA = _SettingsSchema()
_FIELDS_BY_ENV = {str(field.data_key): field for field in _SCHEMA.fields.values()}
ENV_NAMES = tuple(_FIELDS_BY_ENV)
_SECRET_ENVS = frozenset(str(_SCHEMA.fields[name].data_key) for name in SECRET_FIELDS)


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Validate the environment; raise SettingsError naming every bad variable.

    A secret may instead come from a file named by ``<NAME>_FILE`` (Docker and Swarm secrets
    are mounted as files), so that it never sits in the service's environment."""
    environ, problems = _with_secret_files(environ)
    raw: dict[str, str] = {}
    for env, field in _FIELDS_BY_ENV.items():
        value = environ.get(env)
        if value is None:
            continue
        if env == "LOG_LEVEL":
            value = value.lower()
        # An empty value means "use the default", except for free-form strings.
        if value.strip() == "" and not isinstance(field, fields.String):
            continue
        if value.strip() == "" and env in _EMPTY_MEANS_UNSET:
            continue
        raw[env] = value if env in _SECRET_ENVS else value.strip()
    raw.setdefault("WEB_CONCURRENCY", str(os.cpu_count() or 1))
    try:
        settings: Settings = _SCHEMA.load(raw)
    except ValidationError as exc:
        messages = exc.normalized_messages()  # type: ignore[no-untyped-call]
        raise SettingsError(problems + _describe(messages, raw)) from None
    if problems:
        raise SettingsError(problems)
    return settings


def _with_secret_files(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The environment with each ``<SECRET>_FILE`` read into ``<SECRET>``."""
    resolved = dict(environ)
    problems = []
    for env in _SECRET_ENVS:
        path = environ.get(f"{env}_FILE", "").strip()
        if not path:
            continue
        if environ.get(env):
            problems.append(f"{env}_FILE: set together with {env} (expected one of the two)")
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                resolved[env] = handle.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(
                f"{env}_FILE={path!r}: cannot be read ({type(exc).__name__}) "
                "(expected a readable file holding the secret)"
            )
    return resolved, problems


def _shown_value(env: str, value: str, *, secret: bool) -> str:
    """A bad value as the error line shows it: secrets hidden, URL credentials masked."""
    if secret:
        return "(hidden)"
    if env.endswith("_URL") and "@" in value:
        try:
            return repr(mask_url_password(value))
        except ValueError:
            return "(hidden: it holds credentials)"
    return repr(value)


def _describe(messages: dict[str, Any], raw: Mapping[str, str]) -> list[str]:
    problems = []
    for env in sorted(messages):
        field = _FIELDS_BY_ENV[env]
        reasons = messages[env]
        reason = "; ".join(str(r) for r in reasons) if isinstance(reasons, list) else str(reasons)
        shown = _shown_value(env, raw.get(env, ""), secret=env in _SECRET_ENVS)
        problems.append(f"{env}={shown}: {reason} (expected {field.metadata['expected']})")
    return problems


def from_environment(dotenv_path: str = ".env") -> Settings:
    """Settings from the process environment; a ``.env`` file (in the working directory) fills
    in what the environment does not set."""
    environ: dict[str, str] = {}
    if os.path.isfile(dotenv_path):
        environ.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    environ.update(os.environ)
    return load_settings(environ)
