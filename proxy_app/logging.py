"""JSON-lines logging for the app and gunicorn: one object per line, request id on every record,
secrets scrubbed before anything is written."""

from __future__ import annotations

import contextvars
import logging
import logging.config
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

import orjson

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Client keys look like pk_<id>_<secret>; a log line must never carry one, whoever wrote it.
_API_KEY_PATTERN = re.compile(r"pk_[A-Za-z0-9]{6,}_[A-Za-z0-9_-]{16,}")
_REDACTED = "[REDACTED]"
_secrets: tuple[str, ...] = ()

# LogRecord attributes that are plumbing, not content.
_RESERVED = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "request_id"}
)


def set_request_id(request_id: str | None) -> contextvars.Token[str | None]:
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)


def current_request_id() -> str | None:
    return _request_id.get()


def register_secrets(values: Iterable[str]) -> None:
    """Values that must never be written, whatever logger or library tries to."""
    global _secrets
    _secrets = tuple(sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True))


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, _REDACTED)
    if "pk_" in text:
        text = _API_KEY_PATTERN.sub(_REDACTED, text)
    return text


class JsonFormatter(logging.Formatter):
    """Renders a record as one JSON object; extra= fields become top-level keys."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def _timestamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # the date and time change once a second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or _request_id.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = orjson.dumps(entry, default=str).decode()
        return redact(line)


def logging_config(level: str) -> dict[str, Any]:
    """A dictConfig shared by the app and gunicorn so every line on stdout has the same form."""
    upper = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": sys.stdout}
        },
        "root": {"level": upper, "handlers": ["stdout"]},
        "loggers": {
            "gunicorn.error": {"level": upper, "handlers": [], "propagate": True},
            # Our own after_request hook writes the one line per request.
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            # urllib3 logs full URLs (queries included) at debug level.
            "urllib3": {"level": "WARNING"},
        },
    }


def configure(level: str) -> None:
    # Records need none of what logging gathers for every one by default: the lines carry no
    # source location, thread, process or multiprocessing names (the logging HOWTO's
    # "Optimization" settings).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.config.dictConfig(logging_config(level))
