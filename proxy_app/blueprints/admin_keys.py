"""``/internal/api-keys``: create, list, change, roll, revoke, activate and delete client API
keys."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable
from typing import Any

import orjson
from flask import Blueprint, Response, request
from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates

from proxy_app import services
from proxy_app.access.keys import UNSET, KeyRecord, NoSuchPlan, Scopes
from proxy_app.admin_auth import require_admin_token
from proxy_app.audit import audit
from proxy_app.blueprints.admin_plans import PLAN_NAME, QuotaSchema, limits_field
from proxy_app.errors import BadRequest, Conflict, NotFound, RedisOutage, answer_redis_outages
from proxy_app.redis import RedisUnavailable
from proxy_app.responses import json_response as _json
from proxy_app.validation import JsonInteger, load_json_body

bp = Blueprint("admin_keys", __name__, url_prefix="/internal/api-keys")
bp.before_request(require_admin_token)
answer_redis_outages(
    bp,
    RedisOutage("keys_unavailable", "The key store (Redis) is unavailable; nothing was changed."),
)

_TEXT = validate.Length(min=1, max=200)
SCOPE_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
METADATA_MAX_BYTES = 2048
MAX_GRACE_S = 30 * 86_400
PAGE_MAX = 500
STATUSES = ("active", "revoked", "expired")
_LIMIT_TEXT = re.compile(r"[0-9]{1,4}")
# SSCAN's cursor and an offset into its batch. 19 digits stay below 2**64, where Redis refuses a
# cursor; SSCAN's cursors never grow beyond the size of the set's table.
_CURSOR = re.compile(r"[0-9]{1,19}(?::[0-9]{1,9})?")


class ScopesSchema(Schema):
    class Meta:
        unknown = RAISE

    methods = fields.List(
        fields.String(validate=validate.OneOf(SCOPE_METHODS)),
        load_default=list,
        validate=validate.Length(max=len(SCOPE_METHODS)),
    )
    pathPrefixes = fields.List(
        fields.String(
            validate=[
                validate.Length(1, 200),
                validate.Regexp(r"^/\S*\Z", error="A path under /api/v1 starting with '/'."),
            ]
        ),
        load_default=list,
        validate=validate.Length(max=50),
    )

    @post_load
    def _scopes(self, data: dict[str, list[str]], **_: object) -> Scopes:
        return Scopes(
            tuple(dict.fromkeys(data["methods"])), tuple(dict.fromkeys(data["pathPrefixes"]))
        )


def _network(value: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValidationError("Not an IP address or CIDR network.") from None
    if "%" in value:  # an IPv6 scope (fe80::1%eth0) names an interface of this host only
        raise ValidationError("Not an IP address or CIDR network: no IPv6 scope (%...).")


def _small_object(value: dict[str, Any]) -> None:
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        # Integers beyond 64 bits, or nesting deeper than 255 levels, cannot be shown back.
        raise ValidationError(
            "Not storable: numbers must fit in 64 bits and nesting stay within 255 levels."
        ) from None
    if size > METADATA_MAX_BYTES:
        raise ValidationError(f"At most {METADATA_MAX_BYTES} bytes of JSON.")


def _expires_at() -> fields.AwareDateTime:
    return fields.AwareDateTime(
        load_default=None,
        allow_none=True,
        format="iso",
        default_timezone=dt.UTC,
        error_messages={"invalid": "Not an ISO 8601 date-time (e.g. 2027-01-31T00:00:00Z)."},
    )


class KeyFieldsSchema(Schema):
    """The fields a key's create and change share."""

    class Meta:
        unknown = RAISE

    label = fields.String(load_default=None, allow_none=True, validate=_TEXT)
    contact = fields.String(load_default=None, allow_none=True, validate=_TEXT)
    expiresAt = _expires_at()
    plan = fields.String(load_default=None, allow_none=True, validate=PLAN_NAME)
    limits = limits_field(required=False)
    quota = fields.Nested(QuotaSchema, load_default=None, allow_none=True)
    metadata = fields.Dict(
        keys=fields.String(), load_default=None, allow_none=True, validate=_small_object
    )
    scopes = fields.Nested(ScopesSchema, load_default=None, allow_none=True)
    allowedIps = fields.List(
        fields.String(validate=_network),
        load_default=None,
        allow_none=True,
        validate=validate.Length(max=100),
    )

    @validates("expiresAt")
    def _in_the_future(self, value: dt.datetime | None, **_: object) -> None:
        if not isinstance(value, dt.datetime):  # None, or left out of a change (UNSET)
            return
        try:
            in_utc = value.astimezone(dt.UTC)
        except OverflowError:  # e.g. 9999-12-31T23:59:59-05:00 lies after the year 9999 in UTC
            raise ValidationError(
                "Out of range: must lie within the years 1 to 9999 in UTC."
            ) from None
        if in_utc <= dt.datetime.now(dt.UTC):
            raise ValidationError("Must be in the future.")


class CreateKeySchema(KeyFieldsSchema):
    owner = fields.String(required=True, validate=_TEXT)
    createdBy = fields.String(load_default=None, allow_none=True, validate=_TEXT)


class PatchKeySchema(KeyFieldsSchema):
    """Only the fields sent change; null clears one (the plan: back to 'default')."""

    class Meta:
        unknown = RAISE

    def on_bind_field(self, field_name: str, field_obj: fields.Field[Any]) -> None:
        field_obj.load_default = UNSET  # left out: unchanged


class RollSchema(Schema):
    class Meta:
        unknown = RAISE

    gracePeriodSeconds = JsonInteger(required=True, validate=validate.Range(0, MAX_GRACE_S))


_CREATE = CreateKeySchema()
_PATCH = PatchKeySchema()
_ROLL = RollSchema()
_FIELD_NAMES = {
    "label": "label",
    "contact": "contact",
    "expiresAt": "expires_at",
    "plan": "plan",
    "limits": "limits",
    "quota": "quota",
    "metadata": "metadata",
    "scopes": "scopes",
    "allowedIps": "allowed_ips",
}


def _not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key with id {key_id!r}.", code="api_key_not_found")


def _no_plan(plan: str) -> BadRequest:
    return BadRequest(
        f"Invalid fields: plan. No plan named {plan!r}.",
        code="validation_failed",
        fields={"plan": [f"No plan named {plan!r}."]},
    )


@bp.post("")
def create() -> Response:
    body = load_json_body(_CREATE)
    try:
        record, raw_key = services.key_registry().create(
            owner=body["owner"],
            label=body["label"],
            contact=body["contact"],
            expires_at=body["expiresAt"],
            created_by=body["createdBy"],
            plan=body["plan"],
            limits=body["limits"],
            quota=body["quota"],
            metadata=body["metadata"],
            scopes=body["scopes"],
            allowed_ips=body["allowedIps"],
        )
    except NoSuchPlan:
        audit("api_key.create", "no_plan", owner=body["owner"], plan=body["plan"])
        raise _no_plan(body["plan"]) from None
    except RedisUnavailable:
        audit("api_key.create", "unavailable", owner=body["owner"])
        raise
    audit("api_key.create", "ok", key_id=record.key_id, owner=record.owner, plan=record.plan)
    return _json({**record.to_json(), "apiKey": raw_key}, 201)


@bp.get("")
def list_keys() -> Response:
    query = request.args
    problems: dict[str, list[str]] = {}
    limit_text = query.get("limit", "100")
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses.
    limit = int(limit_text) if _LIMIT_TEXT.fullmatch(limit_text) else 0
    if not 1 <= limit <= PAGE_MAX:
        problems["limit"] = [f"An integer from 1 to {PAGE_MAX}."]
    status = query.get("status")  # given, it must be one of them: '' is not
    if status is not None and status not in STATUSES:
        problems["status"] = [f"One of: {', '.join(STATUSES)}."]
    cursor = query.get("cursor", "0")
    if not _CURSOR.fullmatch(cursor):
        problems["cursor"] = ["Not a cursor this API gave out (nextCursor)."]
    unknown = sorted(set(query) - {"limit", "status", "cursor", "owner", "plan"})
    for name in unknown:
        problems[name] = ["Unknown parameter."]
    if problems:
        raise BadRequest(
            "Invalid parameters: " + ", ".join(sorted(problems)) + ".",
            code="validation_failed",
            fields=problems,
        )
    page = services.key_registry().page(
        cursor=cursor,
        limit=limit,
        owner=query.get("owner") or None,
        status=status,
        plan=query.get("plan") or None,
    )
    return _json(
        {"items": [record.to_json() for record in page.items], "nextCursor": page.next_cursor}
    )


@bp.get("/<key_id>")
def show(key_id: str) -> Response:
    record = services.key_registry().get(key_id)
    if record is None:
        raise _not_found(key_id)
    return _json(record.to_json())


@bp.patch("/<key_id>")
def patch(key_id: str) -> Response:
    body = load_json_body(_PATCH)
    changes = {_FIELD_NAMES[name]: value for name, value in body.items() if value is not UNSET}
    if not changes:
        raise BadRequest(
            "Nothing to change: send at least one of " + ", ".join(_FIELD_NAMES) + ".",
            code="validation_failed",
            fields={"_schema": ["Send at least one of: " + ", ".join(_FIELD_NAMES) + "."]},
        )
    try:
        record = services.key_registry().update(key_id, **changes)
    except NoSuchPlan:
        audit("api_key.update", "no_plan", key_id=key_id, plan=changes.get("plan"))
        raise _no_plan(str(changes.get("plan"))) from None
    except RedisUnavailable:
        audit("api_key.update", "unavailable", key_id=key_id)
        raise
    if record is None:
        audit("api_key.update", "not_found", key_id=key_id)
        raise _not_found(key_id)
    audit("api_key.update", "ok", key_id=key_id, owner=record.owner, fields=sorted(body))
    return _json(record.to_json())


@bp.post("/<key_id>/roll")
def roll(key_id: str) -> Response:
    body = load_json_body(_ROLL)
    registry = services.key_registry()
    try:
        current = registry.get(key_id)
        if current is not None:
            _rollable(current)
        rolled = registry.roll(key_id, body["gracePeriodSeconds"]) if current else None
    except NoSuchPlan:
        # The plan was deleted between the read and the new key: the old key is unchanged.
        raise Conflict(
            "The key's plan was deleted meanwhile; nothing was changed.", code="plan_not_found"
        ) from None
    except RedisUnavailable:
        audit("api_key.roll", "unavailable", key_id=key_id)
        raise
    if rolled is None:
        audit("api_key.roll", "not_found", key_id=key_id)
        raise _not_found(key_id)
    old, new, raw_key = rolled
    audit("api_key.roll", "ok", key_id=key_id, new_key_id=new.key_id, owner=new.owner)
    return _json({**new.to_json(), "apiKey": raw_key, "previous": old.to_json()}, 201)


def _rollable(record: KeyRecord) -> None:
    if record.revoked:
        raise Conflict("A revoked key cannot be rolled.", code="api_key_revoked")
    if record.rolled_to:
        raise Conflict(
            f"This key was rolled already (to {record.rolled_to}).", code="api_key_rolled"
        )
    if record.status(int(dt.datetime.now(dt.UTC).timestamp() * 1000)) == "expired":
        raise Conflict("An expired key cannot be rolled.", code="api_key_expired")


def _lifecycle(action: str, change: Callable[[str], bool], key_id: str) -> Response:
    registry = services.key_registry()
    try:
        record = registry.get(key_id)
        changed = change(key_id) if record is not None else False
    except RedisUnavailable:
        audit(f"api_key.{action}", "unavailable", key_id=key_id)
        raise
    if record is None or not changed:
        audit(f"api_key.{action}", "not_found", key_id=key_id)
        raise _not_found(key_id)
    audit(f"api_key.{action}", "ok", key_id=key_id, owner=record.owner)
    return _json({"ok": True})


@bp.post("/<key_id>/revoke")
def revoke(key_id: str) -> Response:
    return _lifecycle("revoke", services.key_registry().revoke, key_id)


@bp.post("/<key_id>/activate")
def activate(key_id: str) -> Response:
    return _lifecycle("activate", services.key_registry().activate, key_id)


@bp.delete("/<key_id>")
def delete(key_id: str) -> Response:
    return _lifecycle("delete", services.key_registry().delete, key_id)
