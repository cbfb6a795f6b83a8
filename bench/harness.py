"""Processes the benchmarks drive: nginx as a fast upstream, a slow Python upstream that counts
requests (the tests' stub upstream), private redis-servers, the gateway under gunicorn + gevent,
the NestJS service it replaces (a built checkout, under node), and wrk as the load generator in
its own process; and the counters read from them (Redis ``INFO commandstats`` and MONITOR, the
gateway's metrics, nginx's and the slow upstream's request counts)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import redis

from bench.payload import PAYLOAD as PAYLOAD  # re-exported: the document nginx serves
from tests.support.net import free_port as free_port  # re-exported: the one the tests use

REPO_ROOT = Path(__file__).resolve().parents[1]
# The large no-store document nginx serves at BIG_PATH: a sparse file, so it costs no disk.
BIG_PATH = "/big/download.bin"
BIG_SIZE = 512 * 1024 * 1024
# nginx's request counter (stub_status); each reading counts itself as one request.
NGINX_STATUS_PATH = "/__nginx_status"


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
        # gunicorn master PID of each server started here (gateways, flask-hello), or the node
        # process of the NestJS service, by URL.
        self.master_pids: dict[str, int] = {}
        self.servers: dict[str, subprocess.Popen[bytes]] = {}

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
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        log: str = "",
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        output = open(self.workdir / (log or "process.log"), "ab")  # noqa: SIM115 - child owns it
        process = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=cwd)
        self._started.append(process)
        return process

    def _server(self, url: str, process: subprocess.Popen[bytes]) -> None:
        self.master_pids[url] = process.pid
        self.servers[url] = process

    def stop(self, url: str, timeout_s: float = 30) -> None:
        """Stops one server started here before the others (a probe's own gateway, so that
        what it leaves behind weighs on nothing measured after it)."""
        process = self.servers[url]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def nginx(self) -> str:
        """A fast upstream: ``/nostore/*`` says no-store, ``/cacheable/*`` max-age=3600,
        ``BIG_PATH`` is BIG_SIZE bytes of no-store zeros, ``NGINX_STATUS_PATH`` counts requests
        (read it with ``nginx_requests``)."""
        port = free_port()
        body = PAYLOAD.replace("'", "\\'")
        temp = self.workdir / "nginx"
        temp.mkdir()
        big = temp / "files" / BIG_PATH.lstrip("/")
        big.parent.mkdir(parents=True)
        with open(big, "wb") as sparse:
            sparse.truncate(BIG_SIZE)  # a hole: no disk blocks, reads as zeros
        # nginx started as root serves files as an unprivileged user, which must be able to
        # reach the file through the private work directory (traverse only, not list).
        self.workdir.chmod(0o711)
        big.chmod(0o644)
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
    location /big/ {{
      root {temp}/files;
      default_type application/octet-stream;
      add_header Cache-Control "no-store";
    }}
    location = {NGINX_STATUS_PATH} {{ stub_status; }}
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

    def slow_upstream(self, delay_s: float) -> str:
        """A threaded Python upstream that answers every path after ``delay_s`` with
        ``max-age=60`` JSON and counts requests per path (read them with ``upstream_counts``)."""
        port = free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO_ROOT),
        }
        body = self.workdir / "slow-upstream-body.json"
        body.write_text(PAYLOAD)
        self.start(
            [
                sys.executable,
                "-m",
                "tests.support.stub_upstream",
                "--port",
                str(port),
                "--delay",
                str(delay_s),
                "--body-file",
                str(body),
                "--cache-control",
                "max-age=60",
                "--counts-path",
                COUNTS_PATH,
            ],
            env=env,
            log="slow-upstream.log",
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(url + COUNTS_PATH)
        return url

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
        process = self.start(
            [sys.executable, "-m", "proxy_app"], env=full_env, log=f"gateway-{port}.log"
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health/live")
        self._server(url, process)
        return url

    def flask_hello(self, workers: int = 2, worker_class: str = "gevent") -> str:
        """The bare Flask reference (``bench/hello_app.py``) under gunicorn with the given
        worker class (gunicorn's stock gevent worker unless told otherwise)."""
        port = free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "PYTHONPATH": str(REPO_ROOT),
        }
        process = self.start(
            [
                sys.executable,
                "-m",
                "bench.hello_app",
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--worker-class",
                worker_class,
            ],
            env=env,
            log=f"flask-hello-{port}.log",
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/")
        self._server(url, process)
        return url

    def anchor(self, checkout: Path, env: dict[str, str]) -> str:
        """The NestJS service the gateway replaces, from a built checkout (``node
        dist/main.js``), listening on 127.0.0.1 only. It runs in a directory of its own, so
        that no ``.env`` lying in the checkout adds settings the bench did not choose."""
        port = free_port()
        home = self.workdir / "anchor"
        home.mkdir(exist_ok=True)
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "PORT": str(port),
            "NODE_ENV": "production",
            "LOG_LEVEL": "warn",
            **env,
        }
        node = require("node", "nodejs")
        # It listens on 0.0.0.0 whatever it is told; the bench only ever talks to loopback.
        process = self.start(
            [node, str(checkout / ANCHOR_ENTRY)], env=full_env, log=f"anchor-{port}.log", cwd=home
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", timeout_s=60)
        self._server(url, process)
        return url


# The built entry point of the NestJS checkout (``npm ci && npm run build``).
ANCHOR_ENTRY = "dist/main.js"


def anchor_problem(checkout: Path) -> str | None:
    """Why ``checkout`` cannot be started as the NestJS reference, or None."""
    if not (checkout / ANCHOR_ENTRY).is_file():
        return f"{checkout / ANCHOR_ENTRY} is missing: run npm ci && npm run build in {checkout}"
    if not (checkout / "node_modules").is_dir():
        return f"{checkout}/node_modules is missing: run npm ci in {checkout}"
    return None


def nginx_requests(nginx: str) -> int:
    """Requests nginx has handled so far, this reading included: between two readings, the
    requests others made are the difference minus one (the earlier reading)."""
    with urllib.request.urlopen(nginx + NGINX_STATUS_PATH, timeout=5) as response:
        text = response.read().decode()
    return parse_stub_status(text)


def parse_stub_status(text: str) -> int:
    """The ``requests`` figure of nginx's stub_status page."""
    match = re.search(r"^\s*\d+\s+\d+\s+(\d+)\s*$", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"unexpected stub_status page:\n{text}")
    return int(match.group(1))


@dataclasses.dataclass(frozen=True)
class ProcessMemory:
    """Memory of one process, from ``/proc/<pid>/status`` and ``/proc/<pid>/smaps_rollup``, in
    bytes: RSS counts every resident page it maps, shared ones (copy-on-write pages a worker
    still shares with the master) in full; PSS divides each shared page among its sharers."""

    pid: int
    rss: int
    pss: int | None  # None when smaps_rollup cannot be read


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, from the parent PID field of every ``/proc/<n>/stat``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def _kib_field(text: str, name: str) -> int | None:
    match = re.search(rf"^{name}:\s+(\d+) kB$", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def process_tree_memory(pid: int) -> list[ProcessMemory]:
    """Memory of ``pid`` and all its descendants (a gunicorn master and its workers), master
    first."""
    pids = [pid]
    pending = [pid]
    while pending:
        children = _children(pending.pop())
        pids += children
        pending += children
    memory = []
    for member in pids:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except FileNotFoundError:
            if member == pid:
                raise
            continue  # a worker that exited meanwhile
        rss = _kib_field(status, "VmRSS")
        if rss is None:  # a zombie: a worker that exited and was not reaped yet
            if member == pid:
                raise ValueError(f"no VmRSS for process {member}")
            continue
        try:
            pss = _kib_field(Path(f"/proc/{member}/smaps_rollup").read_text(), "Pss")
        except OSError:
            pss = None
        memory.append(ProcessMemory(member, rss, pss))
    return memory


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


# Where the slow upstream reports how many requests it got per path (as JSON).
COUNTS_PATH = "/__counts"


def upstream_counts(upstream: str) -> dict[str, int]:
    """Requests the slow upstream has received, per path (without the query)."""
    with urllib.request.urlopen(upstream + COUNTS_PATH, timeout=5) as response:
        counts = json.loads(response.read())
    return {str(path): int(n) for path, n in counts.items()}


@dataclasses.dataclass(frozen=True)
class CommandCounts:
    """Per-command counters from Redis ``INFO commandstats``: ``calls`` (failed calls included)
    and ``failed_calls``, keyed by command name (``get``, ``evalsha``, ``client|setinfo``)."""

    calls: Counter[str]
    failed: Counter[str]

    def __sub__(self, earlier: CommandCounts) -> CommandCounts:
        return CommandCounts(self.calls - earlier.calls, self.failed - earlier.failed)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


class RedisStats:
    """Reads ``INFO commandstats`` over one connection opened up front, so that its own
    connection set-up is not counted in a difference. The ``info`` command is left out of every
    reading: the only client that sends it is this one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        self.read()  # connect now

    def read(self) -> CommandCounts:
        raw = cast("dict[str, dict[str, Any]]", self._client.info("commandstats"))
        calls: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        for section, stats in raw.items():
            name = section.removeprefix("cmdstat_")
            if name == "info":
                continue
            calls[name] = int(stats.get("calls", 0))
            failed[name] = int(stats.get("failed_calls", 0))
        return CommandCounts(calls, failed)

    def measure(self) -> RedisUsage:
        return RedisUsage(self)

    def close(self) -> None:
        self._client.close()


class RedisUsage:
    """``with stats.measure() as usage:`` what Redis ran meanwhile, two ways.

    ``usage.counts``: the ``INFO commandstats`` difference. Redis counts the commands a Lua
    script runs there too, so an EVALSHA that runs HMGET, TIME, GET and SET counts 5.
    ``usage.sent`` / ``usage.scripted``: the same commands from MONITOR, split into those clients
    sent (each one a round trip, or part of a pipelined one) and those scripts ran inside Redis.
    MONITOR slows Redis down: use this for counting, never while measuring throughput. The
    bench's own commands (INFO, the end marker) are left out."""

    def __init__(self, stats: RedisStats) -> None:
        self._stats = stats
        self._marker = f"bench-monitor-end-{secrets.token_hex(8)}"
        self.sent: Counter[str] = Counter()
        self.scripted: Counter[str] = Counter()
        self.counts = CommandCounts(Counter(), Counter())
        self.error: BaseException | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> RedisUsage:
        port = self._stats.port
        self._marker_client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        self._marker_client.ping()  # connected before MONITOR starts: its set-up is not seen
        self._monitor_client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
        self._monitor = self._monitor_client.monitor()  # type: ignore[no-untyped-call]
        self._monitor.__enter__()  # MONITOR is on once this returns
        self._reader.start()
        self._before = self._stats.read()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.counts = self._stats.read() - self._before
            self._marker_client.echo(self._marker)
            self._reader.join(timeout=60)
        finally:
            self._monitor.__exit__(exc_type, exc, tb)
            self._monitor_client.close()
            self._marker_client.close()
        if self._reader.is_alive() and exc is None:
            raise TimeoutError("MONITOR did not deliver the end marker within 60 s")
        if self.error is not None and exc is None:
            raise RuntimeError(f"reading MONITOR failed: {self.error!r}")

    def _read(self) -> None:
        try:
            while True:
                entry = self._monitor.next_command()
                command = str(entry.get("command", ""))
                if self._marker in command:
                    return
                name = command.split(" ", 1)[0].lower()
                if entry.get("client_type") == "lua":
                    self.scripted[name] += 1
                elif name != "info":
                    self.sent[name] += 1
        except Exception as exc:
            self.error = exc


_COUNTER_LINE = re.compile(
    r'^proxy_(cache_outcomes|redis_errors)_total\{(?:outcome|redis)="([\w-]+)"\}\s+(\S+)$',
    re.MULTILINE,
)


def gateway_counters(gateway: str, admin_token: str) -> Counter[str]:
    """The gateway's counters so far (all workers), from ``/internal/metrics``: its ``x-cache``
    outcomes as ``x-cache HIT`` etc., and the Redis calls that failed or were short-circuited
    as ``redis errors cache`` etc."""
    request = urllib.request.Request(
        gateway + "/internal/metrics", headers={"Authorization": f"Bearer {admin_token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    names = {"cache_outcomes": "x-cache", "redis_errors": "redis errors"}
    return Counter(
        {
            f"{names[family]} {label}": int(float(value))
            for family, label, value in _COUNTER_LINE.findall(text)
        }
    )


def admin_post(gateway: str, admin_token: str, path: str, body: dict[str, Any]) -> Any:
    """POST a JSON body to the admin API; the decoded answer."""
    request = urllib.request.Request(
        gateway + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def create_api_key(
    gateway: str, admin_token: str, fields: dict[str, Any] | None = None
) -> str | None:
    """A client key for ``x-api-key`` from ``POST /internal/api-keys``; None when the gateway
    has no such endpoint (a version that checks no client keys)."""
    request = urllib.request.Request(
        gateway + "/internal/api-keys",
        data=json.dumps({"owner": "bench", **(fields or {})}).encode(),
        headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            created = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 405):
            return None
        raise
    return str(created["apiKey"])
