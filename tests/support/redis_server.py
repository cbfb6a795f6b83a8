"""A private redis-server on a free port, which a test may stop and start again."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

import redis

from tests.support.net import free_port, port_open, wait_until


def redis_server_executable() -> str:
    """The redis-server to start; a missing one is an error, never a reason to skip."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError(
            "redis-server is not installed; the test command installs it (apt-get install "
            "redis-server)"
        )
    return executable


class RedisServer:
    def __init__(self) -> None:
        self.executable = redis_server_executable()
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="proxy-app-test-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
        wait_until(lambda: not port_open(self.port), 5, "redis-server to close its port")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.exceptions.ConnectionError:
            return False

    def cleanup(self) -> None:
        if self.process is not None:
            self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
