"""HTTP header names the gateway reads or sets itself, kept in one place (this module imports
nothing, so the settings, which the gunicorn master loads, can use it too)."""

from __future__ import annotations

#: The client's API key (``pk_<id>_<secret>``), checked in front of every proxied request.
API_KEY = "x-api-key"
#: The request's id: taken from the client when well-formed, else made; sent upstream and back.
REQUEST_ID = "x-request-id"
#: What the cache did for this answer: HIT, MISS, STALE, REVALIDATED or BYPASS.
CACHE = "x-cache"
#: A hash of the cache key an answer was looked up under (with CACHE_DEBUG only).
CACHE_KEY_HASH = "x-cache-key-hash"
#: The key's rate limit, its remaining requests and the seconds until it is whole again.
RATELIMIT_LIMIT = "x-ratelimit-limit"
RATELIMIT_REMAINING = "x-ratelimit-remaining"
RATELIMIT_RESET = "x-ratelimit-reset"
#: The IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers) with the same content.
RATELIMIT = "ratelimit"
RATELIMIT_POLICY = "ratelimit-policy"
#: A key's quota: its size, what is left of it and the seconds until it refills.
QUOTA_LIMIT = "x-quota-limit"
QUOTA_REMAINING = "x-quota-remaining"
QUOTA_RESET = "x-quota-reset"
#: ``grace`` on an answer let through on a worker's memory while the keys' Redis was away.
AUTH_MODE = "x-auth-mode"
#: Seconds to wait before trying again (429, 503).
RETRY_AFTER = "retry-after"
#: The age of an answer served from a cache, in seconds (RFC 9111 section 5.1).
AGE = "age"
#: Who made an admin change, for the audit log (free text, chosen by the admin client).
ADMIN_ACTOR = "x-admin-actor"

# RFC 9110 section 7.6.1: they describe one connection, not the message; a peer may name more
# in its Connection header.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
