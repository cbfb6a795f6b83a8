"""JSON request bodies for the admin API, validated by marshmallow schemas; problems become one
400 that names each bad field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import request
from marshmallow import Schema, ValidationError, fields

from proxy_app.errors import BadRequest

LONE_SURROGATE = "Not valid Unicode: contains a lone UTF-16 surrogate escape (\\ud800-\\udfff)."


class JsonBoolean(fields.Boolean):
    """``true`` or ``false`` and nothing else: marshmallow's Boolean also takes ``1``, ``"yes"``
    and the like, which a JSON API documented as boolean refuses."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


class JsonInteger(fields.Integer):
    """A JSON integer: ``3`` or ``3.0`` (JSON, and JSON Schema's ``integer``, do not tell them
    apart), never ``true``, ``"3"`` or ``3.5``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return super()._deserialize(value, attr, data, **kwargs)


def load_json_body(schema: Schema) -> dict[str, Any]:
    if not request.is_json:
        raise BadRequest(
            "The body must be JSON (content-type: application/json).", code="invalid_body"
        )
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.", code="invalid_body")
    try:
        _refuse_lone_surrogates(body)
        loaded: dict[str, Any] = schema.load(body)
    except ValidationError as exc:
        fields = exc.normalized_messages()  # type: ignore[no-untyped-call]
        raise BadRequest(
            "Invalid fields: " + ", ".join(sorted(fields)) + ".",
            code="validation_failed",
            fields=fields,
        ) from None
    return loaded


def _refuse_lone_surrogates(body: dict[str, Any]) -> None:
    """JSON lets ``"\\ud800"`` through as text that cannot be encoded (Redis, logs, headers);
    such a field is refused like any other invalid value."""
    bad = {name: [LONE_SURROGATE] for name, value in body.items() if _has_lone_surrogate(value)}
    if bad:
        raise ValidationError(bad)


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False
