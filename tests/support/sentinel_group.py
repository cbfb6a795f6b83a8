"""A Redis master, one replica and three sentinels watching them, each a real process on a
free loopback port, for failover tests."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import redis

from tests.support.net import free_port, wait_until
from tests.support.redis_server import redis_server_executable

MASTER_NAME = "gateway"
DOWN_AFTER_MS = 1000


class SentinelGroup:
    def __init__(self) -> None:
        self.executable = redis_server_executable()
        self.workdir = Path(tempfile.mkdtemp(prefix="proxy-app-test-sentinel-"))
        self.master_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self) -> None:
        self._start_redis(self.master_port)
        self._start_redis(self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        wait_until(self._replica_in_sync, 15, "the replica to sync with the master")
        for port in self.sentinel_ports:
            config = self.workdir / f"sentinel-{port}.conf"
            # A sentinel rewrites its configuration file as it learns: one writable file each.
            config.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.workdir}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            self._spawn(port, [str(config), "--sentinel"])
        wait_until(self._sentinels_agree, 30, "the sentinels to find each other and the replica")

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def master_address(self) -> tuple[str, int]:
        address = self.client(self.sentinel_ports[0]).sentinel_get_master_addr_by_name(MASTER_NAME)
        assert isinstance(address, tuple | list), address
        host, port = address
        return str(host), int(port)

    def kill_master(self) -> None:
        """SIGKILL the current master: no goodbye to its clients or its replica."""
        _host, port = self.master_address()
        process = self.processes.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def cleanup(self) -> None:
        for process in self.processes.values():
            process.kill()
            process.wait(timeout=10)
        self.processes.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _start_redis(self, port: int, *extra: str) -> None:
        self._spawn(
            port,
            ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra],
        )
        wait_until(lambda: self._answers(port), 10, f"redis-server on port {port}")

    def _spawn(self, port: int, args: list[str]) -> None:
        command = [self.executable, *args]
        if "--sentinel" not in args:
            command += ["--port", str(port), "--dir", str(self.workdir)]
        self.processes[port] = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _answers(self, port: int) -> bool:
        try:
            return bool(self.client(port).ping())
        except redis.exceptions.ConnectionError:
            return False

    def _replica_in_sync(self) -> bool:
        info = self.client(self.replica_port).info("replication")
        return info.get("master_link_status") == "up"

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            try:
                state = self.client(port).sentinel_master(MASTER_NAME)
            except redis.exceptions.RedisError:
                return False
            assert isinstance(state, dict)
            if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                return False
        return True
