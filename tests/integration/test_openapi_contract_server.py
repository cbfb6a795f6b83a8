"""Schemathesis over the admin API's OpenAPI document (proxy_app/openapi.json) against the real
gateway and a real redis-server: every operation with positive and negative data, the stateful
links between them, unauthenticated and unsupported-method probes. No 5xx, no answer that the
document does not describe, and the admin token never shows in its output."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from proxy_app.blueprints.admin_openapi import DOCUMENT_PATH
from tests.support.gateway import Gateway

pytestmark = pytest.mark.integration

CONFIG_PATH = Path(__file__).with_name("schemathesis.toml")
# The run takes well under a minute; this only stops a hung one.
RUN_TIMEOUT_S = 300


def run_schemathesis(base_url: str, admin_token: str, workdir: Path) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(CONFIG_PATH),
            "--no-color",
            "run",
            str(DOCUMENT_PATH),
            "--url",
            base_url,
            "--checks",
            "all",
            "--workers",
            "1",
        ],
        cwd=workdir,
        env={**os.environ, "PROXY_APP_TEST_ADMIN_TOKEN": admin_token},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    # Checked before the output can appear in any assertion message.
    assert admin_token not in output, "the admin token appeared in schemathesis' output"
    assert result.returncode == 0, output[-12000:]
    return output


def test_schemathesis_finds_no_server_error_and_no_answer_the_document_does_not_describe(
    redis_url: str, tmp_path: Path
) -> None:
    admin_token = secrets.token_urlsafe(32)
    gateway = Gateway(
        {
            "CACHE_REDIS_URL": redis_url,
            "ADMIN_API_TOKEN": admin_token,
            # Schemathesis sends many wrong tokens from one address, and checks once per
            # operation that a wrong token gets 401; the throttle would answer 429 after 10.
            "ADMIN_AUTH_MAX_FAILURES": "1000000",
        }
    )
    try:
        gateway.start()
        output = run_schemathesis(gateway.url, admin_token, tmp_path)
        log = gateway.output()
    finally:
        gateway.stop()
    assert admin_token not in log, "the admin token appeared in the gateway's log"

    assert "No issues found" in output, output[-4000:]
    selected = re.search(r"Selected: (\d+)/(\d+)", output)
    tested = re.search(r"Tested: (\d+)", output)
    links = re.search(r"API Links:\s+(\d+) covered / \d+ selected / (\d+) total", output)
    assert selected, output[-4000:]
    assert tested, output[-4000:]
    assert links, output[-4000:]
    assert selected.group(1) == selected.group(2) == tested.group(1)
    assert int(links.group(2)) > 0
    assert links.group(1) == links.group(2)
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in output, output[-4000:]
