"""Processes the benchmarks drive: nginx as a fast upstream, a private redis-server, the gateway
under gunicorn + gevent, and wrk as the load generator in its own process."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
# A ~1 KB JSON document, the same for every server in the comparison.
PAYLOAD = json.dumps(
    {
        "items": [
            {"id": n, "name": f"item-{n}", "price": n * 1.25, "tags": ["a", "b"]} for n in range(14)
        ]
    }
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SystemExit(f"{tool} is required: apt-get install {package}")
    return path


class Processes:
    """Starts processes and stops every one of them on exit, whatever happened."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="proxy-app-bench-"))
        self._started: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for process in reversed(self._started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self._started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def start(
        self, args: list[str], env: dict[str, str] | None = None, log: str = ""
    ) -> subprocess.Popen[bytes]:
        output = open(self.workdir / (log or "process.log"), "ab")  # noqa: SIM115 - child owns it
        process = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT)
        self._started.append(process)
        return process

    def nginx(self) -> str:
        """A fast upstream: ``/nostore/*`` says no-store, ``/cacheable/*`` max-age=3600."""
        port = free_port()
        body = PAYLOAD.replace("'", "\\'")
        temp = self.workdir / "nginx"
        temp.mkdir()
        config = temp / "nginx.conf"
        config.write_text(
            f"""
worker_processes 1;
daemon off;
pid {temp}/nginx.pid;
error_log {temp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    default_type application/json;
    location /cacheable/ {{ add_header Cache-Control "max-age=3600"; return 200 '{body}'; }}
    location / {{ add_header Cache-Control "no-store"; return 200 '{body}'; }}
  }}
}}
"""
        )
        self.start([require("nginx", "nginx"), "-c", str(config)], log="nginx.log")
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/")
        return url

    def redis(self) -> tuple[str, int]:
        port = free_port()
        self.start(
            [
                require("redis-server", "redis-server"),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            log="redis.log",
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return f"redis://127.0.0.1:{port}/0", port
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def gateway(self, env: dict[str, str], workers: int = 2) -> str:
        port = free_port()
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "PYTHONPATH": str(REPO_ROOT),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WEB_CONCURRENCY": str(workers),
            "LOG_LEVEL": "warning",
            **env,
        }
        self.start([sys.executable, "-m", "proxy_app"], env=full_env, log=f"gateway-{port}.log")
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health/live")
        return url


@dataclasses.dataclass(frozen=True)
class LoadResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    errors: int


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _latency_ms(text: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    if not match:
        raise ValueError(f"no {percentile}% latency in wrk output:\n{text}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def wrk(
    url: str,
    *,
    duration_s: int,
    connections: int,
    threads: int = 2,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    args = [
        require("wrk", "wrk"),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout",
        "5s",
        "--latency",
    ]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    output = subprocess.run(
        [*args, url], capture_output=True, text=True, check=True, timeout=duration_s + 60
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if rps is None:
        raise ValueError(f"unexpected wrk output:\n{output}")
    return LoadResult(
        requests_per_s=float(rps.group(1)),
        p50_ms=_latency_ms(output, "50"),
        p99_ms=_latency_ms(output, "99"),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )
