"""JSON request bodies for the admin API, validated by marshmallow schemas; problems become one
400 that names each bad field."""

from __future__ import annotations

from typing import Any

from flask import request
from marshmallow import Schema, ValidationError

from proxy_app.errors import BadRequest


def load_json_body(schema: Schema) -> dict[str, Any]:
    if not request.is_json:
        raise BadRequest(
            "The body must be JSON (content-type: application/json).", code="invalid_body"
        )
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.", code="invalid_body")
    try:
        loaded: dict[str, Any] = schema.load(body)
    except ValidationError as exc:
        fields = exc.normalized_messages()  # type: ignore[no-untyped-call]
        raise BadRequest(
            "Invalid fields: " + ", ".join(sorted(fields)) + ".",
            code="validation_failed",
            fields=fields,
        ) from None
    return loaded
