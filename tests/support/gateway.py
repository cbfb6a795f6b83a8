"""The real service, started as ``python -m proxy_app`` in a subprocess on a free port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import requests

from tests.support.net import free_port, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


class Gateway:
    def __init__(self, env: dict[str, str], *, workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            # A clean environment: only what the test chooses (no stray .env, no host settings).
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            "LOG_LEVEL": "info",
            **env,
        }
        self.workdir = tempfile.mkdtemp(prefix="proxy-app-test-gw-")
        self.log_path = Path(self.workdir) / "stdout.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.api_key: str | None = None  # sent as x-api-key by get() and request()

    def start(self, *, wait: bool = True) -> Gateway:
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy_app"],
                cwd=self.workdir,
                env={**self.env, "PYTHONPATH": str(REPO_ROOT)},
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        if wait:
            wait_until(self._live, 20, f"the gateway on port {self.port}")
        return self

    def _live(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"the gateway exited with {self.process.returncode}:\n{self.output()}"
            )
        try:
            return requests.get(f"{self.url}/health/live", timeout=2).status_code == 200
        except requests.exceptions.RequestException:  # not listening yet, or still booting
            return False

    def wait_exit(self, timeout_s: float = 20) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout_s)

    def terminate(self, timeout_s: float = 40) -> int:
        """SIGTERM, then the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.output().splitlines():
            records.append(json.loads(line))
        return records

    def create_key(self, admin_token: str, **fields: Any) -> dict[str, Any]:
        response = requests.post(
            f"{self.url}/internal/api-keys",
            json={"owner": "tests", **fields},
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    def key_headers(self, headers: dict[str, str] | None = None) -> dict[str, str]:
        merged = {"x-api-key": self.api_key} if self.api_key else {}
        merged.update(headers or {})
        return merged

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = self.key_headers(kwargs.pop("headers", None))
        return requests.request(
            method, self.url + path, timeout=kwargs.pop("timeout", 10), headers=headers, **kwargs
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
