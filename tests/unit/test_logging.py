from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import gevent
import pytest

from proxy_app.logging import (
    JsonFormatter,
    current_request_id,
    redact,
    register_secrets,
    reset_request_id,
    set_request_id,
)


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)
    register_secrets([])


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_record_is_one_json_object_with_extra_fields(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    token = set_request_id("req-1")
    try:
        logger.info("request", extra={"status": 200, "path": "/api/v1/x"})
    finally:
        reset_request_id(token)
    (line,) = _lines(stream)
    assert line["msg"] == "request"
    assert line["level"] == "info"
    assert line["request_id"] == "req-1"
    assert line["status"] == 200
    assert line["path"] == "/api/v1/x"


def test_request_ids_stay_with_their_own_greenlet_under_gevent(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured

    def handle(request_id: str, pause_s: float) -> None:
        token = set_request_id(request_id)
        try:
            gevent.sleep(pause_s)  # let the other greenlets run and set their own ids
            logger.info("done", extra={"expected": request_id})
        finally:
            reset_request_id(token)

    greenlets = [gevent.spawn(handle, f"req-{n}", 0.01 * (5 - n)) for n in range(5)]
    gevent.joinall(greenlets, raise_error=True)
    lines = _lines(stream)
    assert len(lines) == 5
    assert all(line["request_id"] == line["expected"] for line in lines)
    assert current_request_id() is None


def test_registered_secrets_and_api_keys_are_redacted(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    register_secrets(["admin-token-value-xyz", "up-key-1234"])
    leaked_key = "pk_ab12cd34_" + "s" * 43
    logger.warning("oops %s %s %s", "admin-token-value-xyz", "up-key-1234", leaked_key)
    text = stream.getvalue()
    assert "admin-token-value-xyz" not in text
    assert "up-key-1234" not in text
    assert leaked_key not in text
    assert text.count("[REDACTED]") == 3


def test_redact_leaves_ordinary_text_alone() -> None:
    register_secrets(["abcd1234"])
    try:
        assert redact("nothing to hide here") == "nothing to hide here"
    finally:
        register_secrets([])


def test_timestamps_are_utc_with_milliseconds_across_seconds() -> None:
    formatter = JsonFormatter()

    def stamp(created: float) -> str:
        record = logging.LogRecord("t", logging.INFO, "", 0, "m", None, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        return str(json.loads(formatter.format(record))["ts"])

    assert stamp(1700000000.125) == "2023-11-14T22:13:20.125Z"
    assert stamp(1700000000.875) == "2023-11-14T22:13:20.875Z"
    assert stamp(1700000001.5) == "2023-11-14T22:13:21.500Z"
    assert stamp(1700000000.25) == "2023-11-14T22:13:20.250Z"  # an older second again
