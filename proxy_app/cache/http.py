"""The proxy's response cache: GET/HEAD answers from the CacheService, following the policy of a
shared HTTP cache; conditional revalidation upstream; conditional answers (304) to clients;
invalidation after successful writes. Only a body that may be stored is held in memory (up to
the store limit); every other body streams from the upstream to the client."""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import struct
import time
from collections.abc import Mapping, Sequence

import orjson

from proxy_app.cache import policy
from proxy_app.cache.store import CacheService, Load, LoadFailed, Outcome, Prefetched, Stored
from proxy_app.forwarding import filter_response_headers, hidden_response_headers
from proxy_app.redis import RedisUnavailable
from proxy_app.settings import Settings
from proxy_app.upstream import UpstreamClient, UpstreamError, UpstreamResponse

log = logging.getLogger(__name__)

_META_LENGTH = struct.Struct("!I")
# Upstream 304 headers that update a stored response; the rest (length, encoding) describe a
# body the 304 does not carry.
_NOT_UPDATED_BY_304 = frozenset({"content-length", "content-encoding", "transfer-encoding"})


@dataclasses.dataclass(frozen=True, slots=True)
class HttpEntry:
    """A stored response: status, the headers clients get, the body bytes, and what its age and
    variant are computed from."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    response_time: float
    initial_age_s: float
    vary: Mapping[str, str]

    def encode(self) -> bytes:
        meta = orjson.dumps(
            {
                "status": self.status,
                "headers": self.headers,
                "response_time": self.response_time,
                "initial_age": self.initial_age_s,
                "vary": self.vary,
            }
        )
        return _META_LENGTH.pack(len(meta)) + meta + self.body

    @classmethod
    def read(cls, blob: bytes) -> HttpEntry | None:
        """The entry, or None when the bytes are not one (written by something else, or by an
        older format): such an entry is treated as missing and replaced."""
        try:
            return cls.decode(blob)
        except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    @classmethod
    def decode(cls, blob: bytes) -> HttpEntry:
        (length,) = _META_LENGTH.unpack_from(blob)
        meta = orjson.loads(blob[_META_LENGTH.size : _META_LENGTH.size + length])
        return cls(
            status=meta["status"],
            headers=tuple((name, value) for name, value in meta["headers"]),
            body=blob[_META_LENGTH.size + length :],
            response_time=meta["response_time"],
            initial_age_s=meta["initial_age"],
            vary=meta["vary"],
        )

    def age_s(self, now: float) -> int:
        return int(self.initial_age_s + max(0.0, now - self.response_time))

    def matches(
        self, request_headers: Mapping[str, str], client_headers: Sequence[tuple[str, str]] = ()
    ) -> bool:
        """Whether the request selects this variant (the headers named by the response's Vary,
        in whatever order it names them; ``client_headers`` for those not forwarded)."""
        return all(
            policy.normalize_variant_value(
                name, policy.selecting_value(name, request_headers, client_headers)
            )
            == value
            for name, value in self.vary.items()
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Served:
    """What the proxy answers with, and how the cache was involved. With ``stream`` set, the
    body is that upstream answer's, still arriving (``body`` is then empty); the client's
    response passes it on and closes it."""

    status: int
    headers: Sequence[tuple[str, str]]
    body: bytes
    outcome: Outcome
    age_s: int | None = None
    key: str | None = None
    upstream: UpstreamResponse | None = None
    stream: UpstreamResponse | None = None


class ProxyCache:
    def __init__(self, store: CacheService, upstream: UpstreamClient, settings: Settings) -> None:
        self.store = store
        self.upstream = upstream
        self.settings = settings
        self._base_url = settings.upstream_base_url or ""
        self._targeted = policy.targeted_fields(settings)
        # The gateway's own cache-control field is meant for this cache alone.
        own_field = (settings.cache_control_field,) if settings.cache_control_field else ()
        self._hidden = hidden_response_headers((*settings.proxy_hide_response_headers, *own_field))
        # Entries stored before the operator hid more names still carry them: dropped on the
        # way out, a step taken only when there are such names.
        self._operator_hidden = frozenset(
            name.lower() for name in settings.proxy_hide_response_headers
        )

    def lookup_key(
        self,
        path: str,
        query: str,
        forwarded: Mapping[str, str],
        client_header_names: Sequence[str],
    ) -> str | None:
        """The key a GET/HEAD would be looked up under, or None when it bypasses the cache."""
        if policy.request_bypass_reason(
            path, client_header_names, self.settings.cache_bypass_paths
        ):
            return None
        return policy.cache_key(path, query, forwarded, self.settings.proxy_forward_request_headers)

    def answerable(
        self,
        key: str | None,
        prefetched: Prefetched | None,
        forwarded: Mapping[str, str],
        client_headers: Sequence[tuple[str, str]],
    ) -> bool:
        """Whether a GET/HEAD under ``key`` would be answered from a stored entry (fresh, or
        stale within its window) without the upstream: for plans whose cache hits are free.
        A Redis that cannot tell means no."""
        if key is None:
            return False
        try:
            if prefetched is not None and prefetched.key == key:
                stored = prefetched.stored()
            else:
                stored = self.store.get(key)
        except RedisUnavailable:
            return False
        if stored is None or time.time() >= stored.stale_until:
            return False
        entry = HttpEntry.read(stored.value)
        return entry is not None and entry.matches(forwarded, client_headers)

    def fetch(
        self,
        method: str,
        path: str,
        query: str,
        forwarded: Mapping[str, str],
        key: str | None,
        prefetched: Prefetched | None = None,
        client_headers: Sequence[tuple[str, str]] = (),
    ) -> Served:
        """Answer a GET or HEAD under ``key`` (from ``lookup_key``; None: straight upstream).
        Raises UpstreamError when the upstream failed and no stored response may stand in.
        ``prefetched``: the entry, when it was read ahead; ``client_headers``: every request
        header (lower-cased names), for a Vary naming one that is not forwarded."""
        if key is None:
            return self._pass_through(method, path, query, forwarded)
        if method == "HEAD":
            return self._head(key, path, query, forwarded, prefetched, client_headers)
        outbound = {k: v for k, v in forwarded.items() if k not in policy.CONDITIONAL_HEADERS}
        target = policy.request_target(path, query)

        # The upstream response this request's own load got, for the request log line.
        answered: list[UpstreamResponse] = []

        def loader(previous: Stored | None) -> Load:
            return self._load(path, query, outbound, previous, answered, client_headers)

        def usable(stored: Stored) -> HttpEntry | None:
            entry = HttpEntry.read(stored.value)
            if entry is None or not entry.matches(forwarded, client_headers):
                return None
            return entry

        try:
            result = self.store.wrap(
                key, loader, usable=usable, index=policy.index_key(target), prefetched=prefetched
            )
        except LoadFailed as failed:
            if isinstance(failed.unstored, UpstreamResponse):  # an error body too long to share
                return self._served_upstream(failed.unstored, Outcome.BYPASS, key)
            if isinstance(failed.fallback, UpstreamResponse):
                return self._served_upstream(failed.fallback, Outcome.BYPASS, key)
            if isinstance(failed.error, UpstreamError):
                raise failed.error from None
            raise
        if isinstance(result.unstored, UpstreamResponse):
            served = self._served_upstream(result.unstored, result.outcome, key)
            return _conditional(served, forwarded)
        # Served from the cache: decoded already, when judged usable; else this load's value.
        entry = (
            result.entry if isinstance(result.entry, HttpEntry) else HttpEntry.decode(result.value)
        )
        cached = result.outcome in (Outcome.HIT, Outcome.STALE, Outcome.REVALIDATED)
        upstream = answered[0] if answered else None
        # A fresh answer the upstream aged itself (it is a cache too) passes its Age on, with
        # the time it took to get here (RFC 9111 section 5.1).
        aged = upstream is not None and upstream.header("age") is not None
        age = entry.age_s(time.time()) if cached or aged else None
        headers = self._stored_headers(entry)
        served = Served(entry.status, headers, entry.body, result.outcome, age, key, upstream)
        return _conditional(served, forwarded)

    def forward_write(
        self,
        method: str,
        path: str,
        query: str,
        forwarded: Mapping[str, str],
        body: bytes | None,
    ) -> Served:
        """Send a POST/PUT/PATCH/DELETE upstream; a successful one drops the cached variants
        of its URL (RFC 9111 section 4.4)."""
        response = self.upstream.open(method, path, query=query, headers=forwarded, body=body)
        if 200 <= response.status < 400:
            self.invalidate(path, query)
        return self._served_upstream(response, Outcome.BYPASS, None)

    def invalidate(self, path: str, query: str) -> int:
        """Drop every stored variant of a request target (after a successful write to it)."""
        try:
            return self.store.delete_indexed(policy.index_key(policy.request_target(path, query)))
        except RedisUnavailable:
            log.warning("cache invalidation after a write was skipped: Redis is unavailable")
            return 0

    # --- internals ---------------------------------------------------------------------------

    def _load(
        self,
        path: str,
        query: str,
        outbound: Mapping[str, str],
        previous: Stored | None,
        answered: list[UpstreamResponse],
        client_headers: Sequence[tuple[str, str]],
    ) -> Load:
        stale = HttpEntry.read(previous.value) if previous is not None else None
        headers = dict(outbound)
        if stale is not None:
            etag = policy.first_header(stale.headers, "etag")
            modified = policy.first_header(stale.headers, "last-modified")
            if etag:
                headers["if-none-match"] = etag
            if modified:
                headers["if-modified-since"] = modified
        request_time = time.time()
        try:
            response = self.upstream.open("GET", path, query=query, headers=headers)
        except UpstreamError as exc:
            raise LoadFailed(error=exc) from exc
        response_time = time.time()
        answered.append(response)
        try:
            return self._judged(
                response, stale, outbound, client_headers, request_time, response_time
            )
        except UpstreamError as exc:  # the body failed (or outgrew the limit) while buffered
            raise LoadFailed(error=exc) from exc

    def _judged(
        self,
        response: UpstreamResponse,
        stale: HttpEntry | None,
        outbound: Mapping[str, str],
        client_headers: Sequence[tuple[str, str]],
        request_time: float,
        response_time: float,
    ) -> Load:
        """What a load makes of an upstream answer: stored when it may be (its body read into
        memory, up to the store limit), else handed over unread to the one caller it is for."""
        if response.status == 304 and stale is not None:
            return self._revalidated(stale, response, request_time, response_time)
        if response.status >= 500 or response.status == 429:
            # A failure (429: the upstream is overloaded too) lets a stale entry stand in
            # (stale-if-error). A short error body may be shared with the requests waiting on
            # this load.
            if response.buffer(policy.MAX_STORED_BODY_BYTES):
                raise LoadFailed(fallback=response)
            raise LoadFailed(unstored=response)
        # The headers alone may rule storing out (the size, when the upstream declared it).
        declared_size = response.content_length or 0
        if policy.unstorable_reason(
            response.status, response.headers, declared_size, self._targeted
        ):
            return Load(b"", store=False, unstored=response)
        fresh = policy.freshness(
            response.headers, self.settings, request_time=request_time, response_time=response_time
        )
        if not policy.worth_storing(fresh, policy.has_validator(response.headers)):
            return Load(b"", store=False, unstored=response)
        if not response.buffer(policy.MAX_STORED_BODY_BYTES):
            # Too large to store: what was read goes out first, the rest streams behind it.
            return Load(b"", store=False, unstored=response)
        vary = {
            name: policy.normalize_variant_value(
                name, policy.selecting_value(name, outbound, client_headers)
            )
            for name in policy.vary_header_names(response.headers)
        }
        headers = filter_response_headers(response.headers, self._base_url, self._hidden)
        if policy.first_header(headers, "date") is None:
            # Stored with the time it was received, which every later hit repeats, rather than
            # a new Date per answer that would make a stored copy look new (RFC 9110 6.6.1).
            headers.append(("date", email.utils.formatdate(response_time, usegmt=True)))
        entry = HttpEntry(
            status=response.status,
            headers=tuple(headers),
            body=response.body,
            response_time=response_time,
            initial_age_s=fresh.initial_age_s,
            vary=vary,
        )
        return _load_for(entry, fresh)

    def _revalidated(
        self,
        stale: HttpEntry,
        response: UpstreamResponse,
        request_time: float,
        response_time: float,
    ) -> Load:
        """A 304 to our conditional request: the stored body stands, with refreshed headers."""
        updates = [
            (name.lower(), value)
            for name, value in response.headers
            if name.lower() not in _NOT_UPDATED_BY_304
        ]
        updated_names = {name for name, _ in updates}
        raw = [(n, v) for n, v in stale.headers if n not in updated_names] + updates
        fresh = policy.freshness(
            raw, self.settings, request_time=request_time, response_time=response_time
        )
        entry = dataclasses.replace(
            stale,
            headers=tuple(filter_response_headers(raw, self._base_url, self._hidden)),
            response_time=response_time,
            initial_age_s=fresh.initial_age_s,
        )
        if policy.unstorable_reason(stale.status, raw, len(stale.body), self._targeted):
            # The upstream now forbids storing it (no-store, private, ...): serve it this once.
            return Load(entry.encode(), store=False)
        return _load_for(entry, fresh, revalidated=True)

    def _head(
        self,
        key: str,
        path: str,
        query: str,
        forwarded: Mapping[str, str],
        prefetched: Prefetched | None,
        client_headers: Sequence[tuple[str, str]],
    ) -> Served:
        """HEAD is answered from a fresh stored GET response; otherwise it goes upstream."""
        if prefetched is not None and prefetched.key == key:
            stored = prefetched.stored()
        else:
            try:
                stored = self.store.get(key)
            except RedisUnavailable:
                stored = None
        if stored is not None and time.time() < stored.fresh_until:
            entry = HttpEntry.read(stored.value)
            if entry is not None and entry.matches(forwarded, client_headers):
                age = entry.age_s(time.time())
                headers = self._stored_headers(entry)
                return Served(entry.status, headers, entry.body, Outcome.HIT, age, key)
        return self._pass_through("HEAD", path, query, forwarded, key)

    def _stored_headers(self, entry: HttpEntry) -> Sequence[tuple[str, str]]:
        if not self._operator_hidden:
            return entry.headers
        return [(name, value) for name, value in entry.headers if name not in self._operator_hidden]

    def _pass_through(
        self,
        method: str,
        path: str,
        query: str,
        forwarded: Mapping[str, str],
        key: str | None = None,
    ) -> Served:
        response = self.upstream.open(method, path, query=query, headers=forwarded)
        return self._served_upstream(response, Outcome.BYPASS, key)

    def _served_upstream(
        self, response: UpstreamResponse, outcome: Outcome, key: str | None
    ) -> Served:
        headers = filter_response_headers(response.headers, self._base_url, self._hidden)
        age = _upstream_age(response)
        if response.complete:
            return Served(response.status, headers, response.body, outcome, age, key, response)
        return Served(response.status, headers, b"", outcome, age, key, response, response)


def _upstream_age(response: UpstreamResponse) -> int | None:
    """The upstream's own Age, passed on with an answer that is not stored (RFC 9111 section
    5.1); an invalid one is dropped."""
    value = response.header("age")
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None


def _load_for(entry: HttpEntry, fresh: policy.Freshness, *, revalidated: bool = False) -> Load:
    retain = policy.VALIDATOR_RETENTION_S if policy.has_validator(entry.headers) else 0.0
    return Load(
        entry.encode(),
        ttl_s=fresh.fresh_for_s,
        stale_s=fresh.stale_while_revalidate_s,
        stale_if_error_s=fresh.stale_if_error_s,
        retain_s=retain,
        revalidated=revalidated,
    )


def _conditional(served: Served, forwarded: Mapping[str, str]) -> Served:
    """A 304 in place of a 200 whose validators satisfy the client's conditional request."""
    if served.status == 200 and policy.not_modified(forwarded, served.headers):
        return _not_modified(served)
    return served


def _not_modified(served: Served) -> Served:
    if served.stream is not None:
        served.stream.close()  # the body is not sent: its connection is not worth keeping
    headers = [(n, v) for n, v in served.headers if n in policy.NOT_MODIFIED_HEADERS]
    return dataclasses.replace(served, status=304, headers=headers, body=b"", stream=None)
