"""``POST /internal/cache/invalidate``: drop cached responses by exact target (every variant, or
one), by path prefix, or all of them; ``dryRun`` only counts."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from proxy_app import services
from proxy_app.admin_auth import require_admin_token
from proxy_app.audit import audit
from proxy_app.cache import policy
from proxy_app.errors import RedisOutage, answer_redis_outages
from proxy_app.forwarding import (
    forward_request_headers,
    forwarded_request_headers,
    strip_gateway_prefix,
)
from proxy_app.redis import RedisUnavailable
from proxy_app.responses import json_response
from proxy_app.validation import JsonBoolean, load_json_body

bp = Blueprint("admin_cache", __name__, url_prefix="/internal/cache")
bp.before_request(require_admin_token)
answer_redis_outages(
    bp,
    RedisOutage(
        "cache_unavailable", "The cache backend (Redis) is unavailable; nothing was invalidated."
    ),
)

_PATH = validate.Length(min=1, max=4096)


class InvalidateSchema(Schema):
    class Meta:
        unknown = RAISE

    scope = fields.String(required=True, validate=validate.OneOf(["exact", "prefix", "all"]))
    # Absent means None; an explicit null is refused like any other wrong type.
    path = fields.String(load_default=None, allow_none=False, validate=_PATH)
    pathPrefix = fields.String(load_default=None, allow_none=False, validate=_PATH)
    strict = JsonBoolean(load_default=False)
    headers = fields.Dict(
        keys=fields.String(), values=fields.String(), load_default=None, allow_none=False
    )
    dryRun = JsonBoolean(load_default=False)

    @validates_schema
    def _consistent(self, data: dict[str, Any], **_: object) -> None:
        scope = data.get("scope")
        problems: dict[str, list[str]] = {}
        if scope == "exact" and not data.get("path"):
            problems["path"] = ["Required when scope is 'exact'."]
        if scope == "prefix" and not data.get("pathPrefix"):
            problems["pathPrefix"] = ["Required when scope is 'prefix'."]
        if data.get("strict") and scope != "exact":
            problems["strict"] = ["Only applies to scope 'exact'."]
        for name in ("path", "pathPrefix"):
            value = data.get(name)
            if value and not strip_gateway_prefix(value).startswith("/"):
                problems.setdefault(name, []).append("Must start with '/'.")
        if problems:
            raise ValidationError(problems)


_SCHEMA = InvalidateSchema()


@bp.post("/invalidate")
def invalidate() -> Response:
    body = load_json_body(_SCHEMA)
    scope, dry_run = body["scope"], body["dryRun"]
    store = services.proxy_cache().store
    try:
        if scope == "exact" and body["strict"]:
            path, _, query = strip_gateway_prefix(body["path"]).partition("?")
            # The same headers the proxy keys on, defaults included (no accept-encoding sent
            # means identity).
            settings = services.settings()
            added = settings.proxy_forward_request_headers
            headers = forward_request_headers(
                (body["headers"] or {}).items(), "", forwarded_request_headers(added)
            )
            key = policy.cache_key(path, query, headers, added)
            matched = int(store.exists(key))
            deleted = 0 if dry_run or not matched else int(store.delete(key))
        else:
            if scope == "exact":
                pattern = policy.target_pattern(strip_gateway_prefix(body["path"]))
            elif scope == "prefix":
                pattern = policy.prefix_pattern(strip_gateway_prefix(body["pathPrefix"]))
            else:
                pattern = policy.KEY_PREFIX + "*"
            matched, deleted = store.scan_delete(pattern, dry_run=dry_run)
    except RedisUnavailable:
        audit("cache.invalidate", "unavailable", scope=scope)
        raise
    audit(
        "cache.invalidate",
        "ok",
        scope=scope,
        dry_run=dry_run,
        matched=matched,
        deleted=deleted,
        path=body["path"],
        path_prefix=body["pathPrefix"],
    )
    return json_response(
        {"ok": True, "scope": scope, "dryRun": dry_run, "matched": matched, "deleted": deleted}
    )
