"""The scenarios ``python -m bench`` runs, in two tables.

``LOAD_SCENARIOS``: wrk loads, run in alternating rounds and reported as medians, each with its
throughput ratio to the ``upstream`` scenario and, optionally, a goal relative to another load
scenario. Adding one is one more row; e.g. a bare Flask hello reference (which the cache hit's
goal names) would be ``LoadScenario("flask-hello", "bare Flask hello (2 workers)", prepare)``
where ``prepare`` starts the app through the ``Stack`` and returns its ``Target``.

``PROBES``: counted, sequential or one-shot measurements that run once after the loads and
return their own labelled report lines (Redis commands per request, the stampede).

Every process a scenario needs is started through the ``Stack`` the first time it is asked for,
so ``--only`` starts only what the chosen scenarios use.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import secrets
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Mapping

import requests

from bench.harness import (
    LoadResult,
    Processes,
    RedisStats,
    RedisUsage,
    create_api_key,
    gateway_counters,
    upstream_counts,
    wrk,
)

# The request headers of every client here (wrk, requests, http.client), plus a client key for a
# gateway that wants one. The gateway's cache key covers Accept and Accept-Encoding, so warm-ups
# and loads must send the same ones.
BENCH_HEADERS: Mapping[str, str] = {"Accept": "application/json", "Accept-Encoding": "identity"}
# Sequential requests per Redis-commands probe: cache hits, pass-throughs (fewer: while the
# gateway keeps a short "pass" marker after an unstored load, each one waits ~20 ms).
COUNTED_HITS = 2000
COUNTED_PASS_THROUGHS = 500
# How long the stampede's upstream takes to answer, seconds.
SLOW_UPSTREAM_DELAY_S = 0.3
# Per-request client timeout in the probes, seconds.
CLIENT_TIMEOUT_S = 30.0
# How the bench waits for a gateway's counters to stop moving after a load, seconds.
SETTLE_INTERVAL_S = 0.25
SETTLE_MAX_S = 10.0
# The load scenario every other one's ratio is taken against.
REFERENCE = "upstream"


class BenchError(SystemExit):
    """A scenario found the system not in the state it measures (e.g. a warm-up was not a MISS);
    exits with the message, after every process is stopped."""


@dataclasses.dataclass(frozen=True)
class Options:
    duration_s: int
    connections: int
    rounds: int
    workers: int
    stampede: int


class Stack:
    """The processes scenarios run against, each started on first use and stopped by
    ``Processes``. Gateways share the private Redis; the admin token (random per run, never
    printed) lets the bench read the gateways' cache outcomes and create a client key (with a
    rate limit too high to matter) when the gateway checks ``x-api-key``."""

    def __init__(self, processes: Processes, workers: int) -> None:
        self._processes = processes
        self.workers = workers
        self.admin_token = secrets.token_urlsafe(24)
        self._api_keys: dict[str, str] = {}  # gateway URL -> client key

    def headers(self, url: str) -> dict[str, str]:
        """What a client sends to ``url``: BENCH_HEADERS, and a key when a gateway wants one."""
        headers = dict(BENCH_HEADERS)
        for gateway, key in self._api_keys.items():
            if url.startswith(gateway + "/"):
                headers["x-api-key"] = key
        return headers

    @functools.cached_property
    def nginx(self) -> str:
        """The fast upstream: ``/nostore/*`` no-store, ``/cacheable/*`` max-age=3600."""
        return self._processes.nginx()

    @functools.cached_property
    def _redis(self) -> tuple[str, int]:
        return self._processes.redis()

    @property
    def redis_url(self) -> str:
        return self._redis[0]

    @functools.cached_property
    def redis_stats(self) -> RedisStats:
        return RedisStats(self._redis[1])

    @functools.cached_property
    def gateway(self) -> str:
        """The gateway in front of nginx."""
        return self._gateway(self.nginx)

    @functools.cached_property
    def slow_upstream(self) -> str:
        return self._processes.slow_upstream(SLOW_UPSTREAM_DELAY_S)

    @functools.cached_property
    def slow_gateway(self) -> str:
        """A second gateway, in front of the slow upstream."""
        return self._gateway(self.slow_upstream)

    def _gateway(self, upstream: str) -> str:
        env = {
            "HTTP_CLIENT_BASE_URL": upstream,
            "CACHE_REDIS_URL": self.redis_url,
            "ADMIN_API_TOKEN": self.admin_token,
            "API_KEYS_RATE_LIMIT_MAX_REQUESTS": "10000000",
        }
        url = self._processes.gateway(env, workers=self.workers)
        key = create_api_key(url, self.admin_token)
        if key is not None:
            self._api_keys[url] = key
        return url

    def close(self) -> None:
        if "redis_stats" in self.__dict__:
            self.redis_stats.close()


# --- load scenarios (wrk) --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """What a load scenario puts load on; ``gateway`` when that is a gateway whose counters
    (cache outcomes, Redis errors) are read around each run."""

    url: str
    headers: Mapping[str, str]
    gateway: str | None = None


@dataclasses.dataclass(frozen=True)
class Goal:
    """Throughput of at least ``min_ratio`` times that of the load scenario ``reference``."""

    min_ratio: float
    reference: str
    description: str


@dataclasses.dataclass(frozen=True)
class LoadScenario:
    name: str  # for --only
    label: str
    prepare: Callable[[Stack], Target]  # starts what it needs, warms up; runs once before rounds
    goal: Goal | None = None


@dataclasses.dataclass(frozen=True)
class LoadRun:
    result: LoadResult
    counters: Counter[str]  # the gateway's counters during the run; empty for others


def _settled_counters(stack: Stack, gateway: str | None) -> Counter[str]:
    """The gateway's counters once requests still in flight when wrk stopped have finished
    (two readings SETTLE_INTERVAL_S apart agree; at most SETTLE_MAX_S), so that they are
    neither missed here nor counted in the next scenario."""
    if gateway is None:
        return Counter()
    counters = gateway_counters(gateway, stack.admin_token)
    deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < deadline:
        time.sleep(SETTLE_INTERVAL_S)
        latest = gateway_counters(gateway, stack.admin_token)
        if latest == counters:
            break
        counters = latest
    return counters


def run_load(target: Target, stack: Stack, options: Options) -> LoadRun:
    before = _settled_counters(stack, target.gateway)
    result = wrk(
        target.url,
        duration_s=options.duration_s,
        connections=options.connections,
        headers=dict(target.headers),
    )
    return LoadRun(result, _settled_counters(stack, target.gateway) - before)


def _session(headers: Mapping[str, str]) -> requests.Session:
    session = requests.Session()
    session.headers.clear()
    session.headers.update(headers)
    return session


def _warm(session: requests.Session, url: str) -> None:
    """One request stores the entry (MISS), the next is served from it (HIT)."""
    for expected in ("MISS", "HIT"):
        response = session.get(url, timeout=CLIENT_TIMEOUT_S)
        got = response.headers.get("x-cache")
        if response.status_code != 200 or got != expected:
            raise BenchError(
                f"warm-up of {url}: expected 200 with x-cache {expected}, "
                f"got {response.status_code} with x-cache {got}"
            )


def _prepare_hit(stack: Stack) -> Target:
    url = f"{stack.gateway}/api/v1/cacheable/items"
    with _session(stack.headers(url)) as session:
        _warm(session, url)
    return Target(url, stack.headers(url), gateway=stack.gateway)


def _prepare_passthrough(stack: Stack) -> Target:
    url = f"{stack.gateway}/api/v1/nostore/items"
    return Target(url, stack.headers(url), gateway=stack.gateway)


def _prepare_upstream(stack: Stack) -> Target:
    url = f"{stack.nginx}/nostore/items"
    return Target(url, stack.headers(url))


LOAD_SCENARIOS: tuple[LoadScenario, ...] = (
    LoadScenario(REFERENCE, "upstream (nginx) directly", _prepare_upstream),
    LoadScenario("passthrough", "gateway pass-through (no-store)", _prepare_passthrough),
    LoadScenario(
        "hit",
        "gateway cache hit (warmed)",
        _prepare_hit,
        goal=Goal(0.80, "flask-hello", "a bare Flask hello app under gunicorn/gevent"),
    ),
)


# --- probes (counted, run once) --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Probe:
    name: str  # for --only
    run: Callable[[Stack, Options], list[str]]  # the report lines


def _per_request(
    calls: Counter[str], requests_made: int, failed: Counter[str] | None = None
) -> str:
    parts = []
    for name, count in calls.most_common():
        if count <= 0:
            continue
        failures = failed[name] if failed else 0
        note = f" (failed {failures / requests_made:.2f})" if failures > 0 else ""
        parts.append(f"{name}={count / requests_made:.2f}{note}")
    return ", ".join(parts) or "none"


def _counted(stack: Stack, url: str, expected: str, count: int, *, warm: bool) -> RedisUsage:
    """What Redis ran during ``count`` sequential GETs of ``url`` over one keep-alive
    connection; every answer must be a 200 with x-cache ``expected``."""
    answers: Counter[str] = Counter()
    with _session(stack.headers(url)) as session:
        if warm:
            _warm(session, url)
        else:
            session.get(url, timeout=CLIENT_TIMEOUT_S)  # opens the connection outside the count
        with stack.redis_stats.measure() as usage:
            for _ in range(count):
                response = session.get(url, timeout=CLIENT_TIMEOUT_S)
                answers[f"{response.status_code} {response.headers.get('x-cache', '-')}"] += 1
    if set(answers) != {f"200 {expected}"}:
        raise BenchError(f"counted requests to {url}: expected only 200 {expected}, got {answers}")
    return usage


@dataclasses.dataclass(frozen=True)
class _CountedCase:
    label: str
    path: str  # on the gateway in front of nginx
    expected: str  # the x-cache every counted answer must carry
    count: int
    warm: bool
    goal: float | None = None  # most commands the gateway may send per request


_REDIS_CASES = (
    _CountedCase(
        "cache hit", "/api/v1/cacheable/redis-probe", "HIT", COUNTED_HITS, warm=True, goal=1.0
    ),
    _CountedCase(
        "pass-through (no-store)",
        "/api/v1/nostore/redis-probe",
        "BYPASS",
        COUNTED_PASS_THROUGHS,
        warm=False,
    ),
)


def _redis_probe(stack: Stack, _options: Options) -> list[str]:
    lines = []
    for case in _REDIS_CASES:
        n = case.count
        usage = _counted(stack, stack.gateway + case.path, case.expected, n, warm=case.warm)
        counts = usage.counts
        sent = sum(usage.sent.values())
        verdict = ""
        if case.goal is not None:
            met = "met" if sent / n <= case.goal + 1e-9 else "NOT met"
            verdict = f"   goal <= {case.goal:.2f} (one round trip): {met}"
        lines += [
            f"redis commands per {case.label} (INFO commandstats, incl. inside scripts): "
            f"{counts.total / n:.2f}   [{n} sequential GETs, all 200 x-cache {case.expected}]",
            f"  by command, per request: {_per_request(counts.calls, n, counts.failed)}",
            f"redis commands sent per {case.label} (MONITOR, not counting those scripts run): "
            f"{sent / n:.2f}{verdict}",
            f"  by command, per request: {_per_request(usage.sent, n)}"
            + (f"; inside scripts: {_per_request(usage.scripted, n)}" if usage.scripted else ""),
        ]
        monitored = sent + sum(usage.scripted.values())
        if monitored != counts.total:
            lines.append(
                f"  note: MONITOR saw {monitored} commands, commandstats counted {counts.total}"
            )
    return lines


def _stampede_probe(stack: Stack, options: Options) -> list[str]:
    n = options.stampede
    gateway = urllib.parse.urlsplit(stack.slow_gateway)
    upstream_path = f"/cacheable/stampede-{secrets.token_hex(6)}"
    path = f"/api/v1{upstream_path}"
    headers = {**stack.headers(stack.slow_gateway + path), "Connection": "close"}
    barrier = threading.Barrier(n + 1, timeout=CLIENT_TIMEOUT_S)
    answers: list[tuple[str, str]] = []  # (status, x-cache)
    answers_lock = threading.Lock()

    def client() -> None:
        answer = ("error", "-")
        connection = http.client.HTTPConnection(
            gateway.hostname or "127.0.0.1", gateway.port, timeout=CLIENT_TIMEOUT_S
        )
        try:
            try:
                connection.connect()
            finally:
                barrier.wait()  # all connect first, then all send at once
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
            answer = (str(response.status), response.getheader("x-cache") or "-")
        except Exception as exc:
            answer = (f"error:{type(exc).__name__}", "-")
        finally:
            connection.close()
            with answers_lock:
                answers.append(answer)

    with stack.redis_stats.measure() as usage:
        threads = [threading.Thread(target=client, daemon=True) for _ in range(n)]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.monotonic()
        deadline = started + CLIENT_TIMEOUT_S + 5
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - started
    with answers_lock:
        finished = list(answers)
    reached = upstream_counts(stack.slow_upstream).get(upstream_path, 0)

    statuses = Counter(status for status, _ in finished)
    unanswered = n - len(finished)
    if unanswered:
        statuses["unanswered"] = unanswered
    outcomes = Counter(cache for _, cache in finished)
    miss, hit = outcomes.pop("MISS", 0), outcomes.pop("HIT", 0)
    other = sum(outcomes.values()) + unanswered
    other_detail = f" ({_counter_text(outcomes)})" if outcomes else ""
    return [
        f"stampede: {n} concurrent GETs for one cold key (one connection each, Connection: close)"
        f" -> gateway ({stack.workers} workers) -> upstream answering after "
        f"{SLOW_UPSTREAM_DELAY_S * 1000:.0f} ms",
        f"stampede requests that reached the upstream: {reached}   goal = 1: "
        f"{'met' if reached == 1 else 'NOT met'}",
        f"stampede x-cache: MISS={miss} HIT={hit} other={other}{other_detail}   "
        f"(with full coalescing: MISS=1 HIT={n - 1})",
        f"stampede statuses: {_counter_text(statuses)}   goal: all 200: "
        f"{'met' if statuses == Counter({'200': n}) else 'NOT met'}",
        f"stampede wall time (all sent -> last answer): {elapsed:.2f} s",
        f"stampede redis commands sent by the gateway (MONITOR; total "
        f"{sum(usage.sent.values())}): {_counter_text(usage.sent)}",
        f"stampede redis commands run inside scripts (total {sum(usage.scripted.values())}): "
        f"{_counter_text(usage.scripted)}",
    ]


def _counter_text(counter: Counter[str]) -> str:
    return " ".join(f"{key}={count}" for key, count in sorted(counter.items())) or "none"


PROBES: tuple[Probe, ...] = (
    Probe("redis", _redis_probe),
    Probe("stampede", _stampede_probe),
)

SCENARIO_NAMES: tuple[str, ...] = tuple(s.name for s in LOAD_SCENARIOS) + tuple(
    p.name for p in PROBES
)
