"""``/internal/plans``: named sets of rate limits and a quota that keys are put on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response
from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates,
    validates_schema,
)

from proxy_app import services
from proxy_app.access.keys import iso, utc_now
from proxy_app.access.plans import (
    DEFAULT_PLAN,
    QUOTA_PERIODS,
    Limit,
    Plan,
    PlanInUse,
    Quota,
)
from proxy_app.admin_auth import require_admin_token
from proxy_app.audit import audit
from proxy_app.errors import Conflict, NotFound, RedisOutage, answer_redis_outages
from proxy_app.redis import RedisUnavailable
from proxy_app.responses import json_response as _json
from proxy_app.validation import JsonBoolean, JsonInteger, load_json_body

bp = Blueprint("admin_plans", __name__, url_prefix="/internal/plans")
bp.before_request(require_admin_token)
answer_redis_outages(
    bp,
    RedisOutage("keys_unavailable", "The key store (Redis) is unavailable; nothing was changed."),
)

PLAN_NAME = validate.Regexp(
    r"^[a-z0-9][a-z0-9_-]{0,62}\Z",  # \Z: '$' would also let a trailing newline through
    error="1 to 63 lower-case letters, digits, '-' or '_', starting with a letter or digit.",
)
MAX_LIMITS = 10
MAX_WINDOW_S = 31 * 86_400


class LimitSchema(Schema):
    class Meta:
        unknown = RAISE

    max = JsonInteger(required=True, validate=validate.Range(1, 1_000_000_000))
    windowSeconds = JsonInteger(required=True, validate=validate.Range(1, MAX_WINDOW_S))

    @validates_schema
    def _countable(self, data: dict[str, int], **_: object) -> None:
        # One request a microsecond at most: finer than that, Redis' clock cannot tell
        # requests apart, and a limit that high limits nothing.
        if data["max"] > data["windowSeconds"] * 1_000_000:
            raise ValidationError("At most 1,000,000 requests per second of window.", "max")

    @post_load
    def _limit(self, data: dict[str, int], **_: object) -> Limit:
        return Limit(data["max"], data["windowSeconds"])


class QuotaSchema(Schema):
    class Meta:
        unknown = RAISE

    max = JsonInteger(required=True, validate=validate.Range(1, 1_000_000_000_000))
    period = fields.String(required=True, validate=validate.OneOf(QUOTA_PERIODS))

    @post_load
    def _quota(self, data: dict[str, Any], **_: object) -> Quota:
        return Quota(data["max"], data["period"])


def limits_field(*, required: bool) -> fields.List[Any]:
    validators: list[Callable[[Any], Any]] = [validate.Length(1, MAX_LIMITS), _distinct_windows]
    if required:
        return fields.List(fields.Nested(LimitSchema), required=True, validate=validators)
    return fields.List(
        fields.Nested(LimitSchema), allow_none=True, load_default=None, validate=validators
    )


def _distinct_windows(limits: list[Limit]) -> None:
    windows = [limit.window_s for limit in limits]
    if len(set(windows)) != len(windows):
        raise ValidationError("Each limit needs a window of its own.")


class PlanBodySchema(Schema):
    class Meta:
        unknown = RAISE

    limits = limits_field(required=True)
    quota = fields.Nested(QuotaSchema, load_default=None, allow_none=True)
    cacheHitsFree = JsonBoolean(load_default=False)
    shareByOwner = JsonBoolean(load_default=False)


class CreatePlanSchema(PlanBodySchema):
    name = fields.String(required=True, validate=PLAN_NAME)

    @validates("name")
    def _not_reserved(self, value: str, **_: object) -> None:
        if value == DEFAULT_PLAN:
            raise ValidationError(
                "'default' is the settings' limit (API_KEYS_RATE_LIMIT_*); pick another name."
            )


_CREATE = CreatePlanSchema()
_REPLACE = PlanBodySchema()


def _refuse_default(name: str) -> None:
    if name == DEFAULT_PLAN:
        raise Conflict(
            "The plan 'default' is the settings' limit (API_KEYS_RATE_LIMIT_*).",
            code="plan_reserved",
        )


def _not_found(name: str) -> NotFound:
    return NotFound(f"No plan named {name!r}.", code="plan_not_found")


def _plan(name: str, body: dict[str, Any], created_at: str | None) -> Plan:
    now = iso(utc_now())
    return Plan(
        name=name,
        limits=tuple(body["limits"]),
        quota=body["quota"],
        cache_hits_free=body["cacheHitsFree"],
        share_by_owner=body["shareByOwner"],
        created_at=created_at or now,
        updated_at=now,
    )


@bp.post("")
def create() -> Response:
    body = load_json_body(_CREATE)
    plan = _plan(body["name"], body, None)
    try:
        created = services.plan_registry().create(plan)
    except RedisUnavailable:
        audit("plan.create", "unavailable", plan=plan.name)
        raise
    if not created:
        audit("plan.create", "exists", plan=plan.name)
        raise Conflict(f"A plan named {plan.name!r} exists.", code="plan_exists")
    audit("plan.create", "ok", plan=plan.name)
    return _json(plan.to_json(keys=0), 201)


@bp.get("")
def list_plans() -> Response:
    plans = services.plan_registry().list()
    return _json({"items": [plan.to_json(keys=keys) for plan, keys in plans]})


@bp.get("/<name>")
def show(name: str) -> Response:
    registry = services.plan_registry()
    plan = registry.get(name)
    keys = registry.key_count(name) if plan is not None else 0
    if plan is None:
        raise _not_found(name)
    return _json(plan.to_json(keys=keys))


@bp.put("/<name>")
def replace(name: str) -> Response:
    _refuse_default(name)
    body = load_json_body(_REPLACE)
    registry = services.plan_registry()
    try:
        current = registry.get(name)
        plan = _plan(name, body, current.created_at if current else None)
        replaced = current is not None and registry.replace(plan)
        keys = registry.key_count(name) if replaced else 0
    except RedisUnavailable:
        audit("plan.replace", "unavailable", plan=name)
        raise
    if not replaced:
        audit("plan.replace", "not_found", plan=name)
        raise _not_found(name)
    audit("plan.replace", "ok", plan=name)
    return _json(plan.to_json(keys=keys))


@bp.delete("/<name>")
def delete(name: str) -> Response:
    _refuse_default(name)
    try:
        deleted = services.plan_registry().delete(name)
    except PlanInUse as in_use:
        audit("plan.delete", "in_use", plan=name)
        raise Conflict(
            f"{in_use.keys} API keys are on the plan {name!r}; move them first.",
            code="plan_in_use",
            keys=in_use.keys,
        ) from None
    except RedisUnavailable:
        audit("plan.delete", "unavailable", plan=name)
        raise
    if not deleted:
        audit("plan.delete", "not_found", plan=name)
        raise _not_found(name)
    audit("plan.delete", "ok", plan=name)
    return _json({"ok": True})
