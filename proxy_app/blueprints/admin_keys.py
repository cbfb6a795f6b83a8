"""``/internal/api-keys``: create, list, revoke, activate and delete client API keys."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from flask import Blueprint, Response
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates

from proxy_app import services
from proxy_app.admin_auth import require_admin_token
from proxy_app.audit import audit
from proxy_app.errors import NotFound, ServiceUnavailable
from proxy_app.redis import RedisUnavailable
from proxy_app.responses import json_response as _json
from proxy_app.validation import load_json_body

bp = Blueprint("admin_keys", __name__, url_prefix="/internal/api-keys")
bp.before_request(require_admin_token)

_TEXT = validate.Length(min=1, max=200)


class CreateKeySchema(Schema):
    class Meta:
        unknown = RAISE

    owner = fields.String(required=True, validate=_TEXT)
    label = fields.String(load_default=None, allow_none=True, validate=_TEXT)
    contact = fields.String(load_default=None, allow_none=True, validate=_TEXT)
    createdBy = fields.String(load_default=None, allow_none=True, validate=_TEXT)
    expiresAt = fields.AwareDateTime(
        load_default=None,
        allow_none=True,
        format="iso",
        default_timezone=dt.UTC,
        error_messages={"invalid": "Not an ISO 8601 date-time (e.g. 2027-01-31T00:00:00Z)."},
    )

    @validates("expiresAt")
    def _in_the_future(self, value: dt.datetime | None, **_: object) -> None:
        if value is None:
            return
        try:
            in_utc = value.astimezone(dt.UTC)
        except OverflowError:  # e.g. 9999-12-31T23:59:59-05:00 lies after the year 9999 in UTC
            raise ValidationError(
                "Out of range: must lie within the years 1 to 9999 in UTC."
            ) from None
        if in_utc <= dt.datetime.now(dt.UTC):
            raise ValidationError("Must be in the future.")


_CREATE = CreateKeySchema()


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The key store (Redis) is unavailable; nothing was changed.", code="keys_unavailable"
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
        )
    except RedisUnavailable:
        audit("api_key.create", "unavailable", owner=body["owner"])
        raise _unavailable() from None
    audit("api_key.create", "ok", key_id=record.key_id, owner=record.owner)
    return _json({**record.to_json(), "apiKey": raw_key}, 201)


@bp.get("")
def list_keys() -> Response:
    try:
        records = services.key_registry().list()
    except RedisUnavailable:
        raise _unavailable() from None
    return _json({"items": [record.to_json() for record in records]})


@bp.get("/<key_id>")
def show(key_id: str) -> Response:
    try:
        record = services.key_registry().get(key_id)
    except RedisUnavailable:
        raise _unavailable() from None
    if record is None:
        raise NotFound(f"No API key with id {key_id!r}.", code="api_key_not_found")
    return _json(record.to_json())


def _lifecycle(action: str, change: Callable[[str], bool], key_id: str) -> Response:
    registry = services.key_registry()
    try:
        record = registry.get(key_id)
        changed = change(key_id) if record is not None else False
    except RedisUnavailable:
        audit(f"api_key.{action}", "unavailable", key_id=key_id)
        raise _unavailable() from None
    if record is None or not changed:
        audit(f"api_key.{action}", "not_found", key_id=key_id)
        raise NotFound(f"No API key with id {key_id!r}.", code="api_key_not_found")
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
