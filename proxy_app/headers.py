"""Header names more than one room needs, kept in one place (this module imports nothing, so the
settings, which the gunicorn master loads, can use it too)."""

from __future__ import annotations

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
