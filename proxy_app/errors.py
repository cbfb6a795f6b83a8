"""The API error family and the one place where errors become JSON responses."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from flask import Blueprint, Flask, Response
from werkzeug.exceptions import HTTPException

from proxy_app import headers as header_names
from proxy_app.redis import RedisUnavailable
from proxy_app.responses import json_response

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the client is told about: status, a stable code and a readable message."""

    status = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}
        self.details = details


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class TooManyRequests(ApiError):
    status = 429
    code = "rate_limited"


class BadGateway(ApiError):
    status = 502
    code = "bad_gateway"


class ServiceUnavailable(ApiError):
    status = 503
    code = "service_unavailable"


@dataclasses.dataclass(frozen=True, slots=True)
class RedisOutage:
    """What a Redis outage means to the client of one room: a 503 with this code and message."""

    code: str
    message: str
    retry_after_s: int | None = None


def error_document(code: str, message: str, **details: Any) -> dict[str, Any]:
    """The body of every error answer, the server's own included. Detail keys are camelCase."""
    return {"error": code, "message": message, **details}


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    **details: Any,
) -> Response:
    response = json_response(error_document(code, message, **details), status)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _http_code(exc: HTTPException) -> str:
    name = (exc.name or "error").lower()
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def answer_redis_outages(bp: Blueprint, outage: RedisOutage) -> None:
    """Answer a Redis outage in the blueprint's requests (RedisUnavailable raised anywhere in
    them) with its own 503."""
    headers = {}
    if outage.retry_after_s is not None:
        headers[header_names.RETRY_AFTER] = str(outage.retry_after_s)

    def _redis_outage(_exc: RedisUnavailable) -> Response:
        return error_response(503, outage.code, outage.message, headers)

    bp.register_error_handler(RedisUnavailable, _redis_outage)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers, **exc.details)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        headers = {k: v for k, v in exc.get_headers() if k.lower() not in ("content-type",)}
        message = exc.description or exc.name
        if status == 413:
            return error_response(
                413, "payload_too_large", "The request body exceeds the configured limit.", headers
            )
        return error_response(status, _http_code(exc), message, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "An unexpected error occurred.")
