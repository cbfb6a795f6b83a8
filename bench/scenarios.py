"""The scenarios ``python -m bench`` runs, in two tables.

``LOAD_SCENARIOS``: wrk loads, run in alternating rounds and reported as medians, each with its
throughput ratio to the ``upstream`` (nginx) and ``flask-hello`` (a bare Flask app under the same
gunicorn/gevent set-up) scenarios and its goals: a throughput ratio to another load scenario, a
p99 latency. Adding one is one more row.

``PROBES``: counted, sequential or one-shot measurements that run once after the loads and
return their own labelled report lines and goal verdicts (Redis commands per request, memory
under load, the stampede on one and on two gateway instances).

Every goal, load or probe, ends up as one ``Verdict`` (name, measured value, goal, met or not),
which ``python -m bench`` prints in a final summary table.

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
    ProcessMemory,
    RedisStats,
    RedisUsage,
    create_api_key,
    gateway_counters,
    process_tree_memory,
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
# The load scenarios every other one's throughput ratio is printed against: nginx alone, and a
# bare Flask app under gunicorn/gevent (which the gateway's goals are stated against).
REFERENCE = "upstream"
HELLO = "flask-hello"
# Redis commands whose cost grows with the number of keys in the database.
KEY_SCALING_COMMANDS = ("scan", "keys")
# Bytes per MB in the memory figures: MiB, as /proc (kB = KiB), ps and top count.
MB = 1024 * 1024


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
    memory_s: int  # seconds of load before the memory probe reads the gateway's RSS


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

    @functools.cached_property
    def slow_gateway_b(self) -> str:
        """A third gateway, also in front of the slow upstream and sharing the same Redis: the
        second instance of a scaled-out deployment."""
        return self._gateway(self.slow_upstream)

    @functools.cached_property
    def flask_hello(self) -> str:
        """The bare Flask reference app, with as many workers as each gateway."""
        return self._processes.flask_hello(self.workers)

    def master_pid(self, url: str) -> int:
        """The gunicorn master PID of a gateway (or the hello app) started here."""
        return self._processes.master_pids[url]

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
class Verdict:
    """One goal's line in the summary: ``met`` None when it was not measured (``measured`` then
    says why)."""

    name: str
    measured: str
    goal: str
    met: bool | None


@dataclasses.dataclass(frozen=True)
class GoalSpec:
    """A goal a probe reports on, so that the summary can list it even when the probe did not
    run."""

    name: str
    goal: str

    def verdict(self, measured: str, met: bool) -> Verdict:
        return Verdict(self.name, measured, self.goal, met)

    def not_run(self, why: str = "not run") -> Verdict:
        return Verdict(self.name, f"not measured ({why})", self.goal, None)


def met_text(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not measured"}[met]


@dataclasses.dataclass(frozen=True)
class RatioGoal:
    """Throughput of at least ``min_ratio`` times that of the load scenario ``reference``; with
    ``no_failures``, also no non-2xx answer and no socket error (timeout, reset) in any round."""

    name: str
    min_ratio: float
    reference: str
    no_failures: bool = False

    def verdict(self, scenario: str, medians: Mapping[str, LoadRun], _options: Options) -> Verdict:
        goal = f">= {self.min_ratio:.2f}x {self.reference} req/s" + (
            ", 0 non-2xx" if self.no_failures else ""
        )
        for needed in (scenario, self.reference):
            if needed not in medians:
                return Verdict(self.name, f"not measured ({needed} not run)", goal, None)
        result = medians[scenario].result
        reference = medians[self.reference].result
        ratio = result.requests_per_s / reference.requests_per_s
        measured = (
            f"{ratio:.2f}x ({result.requests_per_s:.0f} / {reference.requests_per_s:.0f} req/s)"
        )
        met = ratio >= self.min_ratio
        if self.no_failures:
            measured += f", non-2xx {result.non_2xx}, socket errors {result.errors}"
            met = met and result.non_2xx == 0 and result.errors == 0
        return Verdict(self.name, measured, goal, met)


@dataclasses.dataclass(frozen=True)
class P99Goal:
    """The median over the rounds of wrk's p99 latency at most ``max_ms``, at ``connections``
    connections (not measured at any other ``--connections``); the p99 of the load scenario
    ``context`` is shown next to it when that ran."""

    name: str
    max_ms: float
    connections: int
    context: str | None = None

    def verdict(self, scenario: str, medians: Mapping[str, LoadRun], options: Options) -> Verdict:
        goal = f"<= {self.max_ms:.0f} ms at {self.connections} connections"
        if scenario not in medians:
            return Verdict(self.name, f"not measured ({scenario} not run)", goal, None)
        if options.connections != self.connections:
            why = f"run at {options.connections} connections"
            return Verdict(self.name, f"not measured ({why})", goal, None)
        p99 = medians[scenario].result.p99_ms
        measured = f"{p99:.2f} ms"
        context = medians.get(self.context) if self.context else None
        if context is not None:
            measured += f" ({self.context}: {context.result.p99_ms:.2f} ms)"
        return Verdict(self.name, measured, goal, p99 <= self.max_ms)


Goal = RatioGoal | P99Goal


@dataclasses.dataclass(frozen=True)
class LoadScenario:
    name: str  # for --only
    label: str
    prepare: Callable[[Stack], Target]  # starts what it needs, warms up; runs once before rounds
    goals: tuple[Goal, ...] = ()


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


def _prepare_flask_hello(stack: Stack) -> Target:
    url = f"{stack.flask_hello}/hello"
    return Target(url, stack.headers(url))


LOAD_SCENARIOS: tuple[LoadScenario, ...] = (
    LoadScenario(REFERENCE, "upstream (nginx) directly", _prepare_upstream),
    LoadScenario(HELLO, "bare Flask hello (gunicorn/gevent)", _prepare_flask_hello),
    LoadScenario(
        "passthrough",
        "gateway keyed pass-through (no-store)",
        _prepare_passthrough,
        goals=(RatioGoal("keyed pass-through (no-store) req/s", 0.50, HELLO),),
    ),
    LoadScenario(
        "hit",
        "gateway keyed cache hit (warmed)",
        _prepare_hit,
        goals=(
            RatioGoal("keyed cache hit req/s", 0.80, HELLO, no_failures=True),
            P99Goal("keyed cache hit p99 latency", 20.0, 50, context=HELLO),
        ),
    ),
)


# --- probes (counted, run once) --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeReport:
    lines: list[str]
    verdicts: list[Verdict]


@dataclasses.dataclass(frozen=True)
class Probe:
    name: str  # for --only
    run: Callable[[Stack, Options], ProbeReport]  # the report lines and goal verdicts
    goals: tuple[GoalSpec, ...] = ()  # every goal its verdicts may name


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


REDIS_ROUND_TRIPS_GOAL = GoalSpec(
    "redis round trips per keyed cache hit", "<= 1.00 on average (commands sent, MONITOR)"
)
REDIS_KEY_SCALING_GOAL = GoalSpec(
    "redis calls scaling with key count", "0 SCAN/KEYS in the cache-hit window"
)


@dataclasses.dataclass(frozen=True)
class _CountedCase:
    label: str
    path: str  # on the gateway in front of nginx
    expected: str  # the x-cache every counted answer must carry
    count: int
    warm: bool
    goals: bool = False  # judge the round-trip and key-scaling goals on this case


_REDIS_CASES = (
    _CountedCase(
        "keyed cache hit",
        "/api/v1/cacheable/redis-probe",
        "HIT",
        COUNTED_HITS,
        warm=True,
        goals=True,
    ),
    _CountedCase(
        "keyed pass-through (no-store)",
        "/api/v1/nostore/redis-probe",
        "BYPASS",
        COUNTED_PASS_THROUGHS,
        warm=False,
    ),
)


def _redis_probe(stack: Stack, _options: Options) -> ProbeReport:
    lines = []
    verdicts = []
    for case in _REDIS_CASES:
        n = case.count
        usage = _counted(stack, stack.gateway + case.path, case.expected, n, warm=case.warm)
        counts = usage.counts
        sent = sum(usage.sent.values())
        round_trips = ""
        if case.goals:
            verdict = REDIS_ROUND_TRIPS_GOAL.verdict(
                f"{sent / n:.2f} ({sent} commands sent in {n} hits)", sent / n <= 1.0 + 1e-9
            )
            verdicts.append(verdict)
            round_trips = f"   goal {verdict.goal}: {met_text(verdict.met)}"
        lines += [
            f"redis commands per {case.label} (INFO commandstats, incl. inside scripts): "
            f"{counts.total / n:.2f}   [{n} sequential GETs, all 200 x-cache {case.expected}]",
            f"  by command, per request: {_per_request(counts.calls, n, counts.failed)}",
            f"redis commands sent per {case.label} = round trips (MONITOR, not counting those "
            f"scripts run; pipelined commands count each, so an upper bound): "
            f"{sent / n:.2f}{round_trips}",
            f"  by command, per request: {_per_request(usage.sent, n)}"
            + (f"; inside scripts: {_per_request(usage.scripted, n)}" if usage.scripted else ""),
        ]
        monitored = sent + sum(usage.scripted.values())
        if monitored != counts.total:
            lines.append(
                f"  note: MONITOR saw {monitored} commands, commandstats counted {counts.total}"
            )
        if case.goals:
            scaling = {
                name: usage.sent[name] + usage.scripted[name] for name in KEY_SCALING_COMMANDS
            }
            found = sum(scaling.values())
            detail = " ".join(f"{name.upper()}={count}" for name, count in scaling.items())
            verdict = REDIS_KEY_SCALING_GOAL.verdict(f"{found} ({detail} in {n} hits)", found == 0)
            verdicts.append(verdict)
            lines.append(
                f"redis calls that scale with the number of keys during the {n} {case.label}s "
                f"(MONITOR, sent or inside scripts): {detail}   goal 0: {met_text(verdict.met)}"
            )
    return ProbeReport(lines, verdicts)


MEMORY_GOAL_MB = 150.0
MEMORY_GOAL = GoalSpec(
    "gateway memory (RSS, master + workers)", f"<= {MEMORY_GOAL_MB:.0f} MB after hit load"
)


def _mb(value: int) -> str:
    return f"{value / MB:.1f}"


def _memory_text(memory: list[ProcessMemory]) -> str:
    rss = sum(m.rss for m in memory)
    parts = " + ".join(_mb(m.rss) for m in memory)
    pss = [m.pss for m in memory]
    pss_text = f"; PSS {_mb(sum(p for p in pss if p is not None))} MB" if None not in pss else ""
    return f"{_mb(rss)} MB (master + {len(memory) - 1} workers: {parts}{pss_text})"


def _memory_probe(stack: Stack, options: Options) -> ProbeReport:
    url = f"{stack.gateway}/api/v1/cacheable/memory-probe"
    headers = stack.headers(url)
    with _session(headers) as session:
        _warm(session, url)
    pid = stack.master_pid(stack.gateway)
    before = process_tree_memory(pid)
    counters_before = _settled_counters(stack, stack.gateway)
    result = wrk(
        url, duration_s=options.memory_s, connections=options.connections, headers=dict(headers)
    )
    after = process_tree_memory(pid)  # at once: the memory the load left
    counters = _settled_counters(stack, stack.gateway) - counters_before
    rss = sum(m.rss for m in after)
    verdict = MEMORY_GOAL.verdict(
        f"{_mb(rss)} MB after {options.memory_s} s", rss / MB <= MEMORY_GOAL_MB
    )
    lines = [
        f"memory: {options.memory_s} s of wrk on the keyed cache hit ({options.connections} "
        f"connections): {result.requests_per_s:.0f} req/s, p99 {result.p99_ms:.2f} ms, "
        f"non-2xx {result.non_2xx}, errors {result.errors}",
        *counter_lines(counters),
        f"memory: gateway RSS before that load: {_memory_text(before)}",
        f"memory: gateway RSS after that load:  {_memory_text(after)}   "
        f"goal {verdict.goal}: {met_text(verdict.met)}   (1 MB = 2^20 bytes; "
        f"{rss / 1e6:.1f} MB of 10^6 bytes)",
    ]
    if len(after) != 1 + stack.workers:
        lines.append(f"  note: {len(after)} processes, expected 1 master + {stack.workers} workers")
    if {m.pid for m in after} != {m.pid for m in before}:
        lines.append("  note: the gateway's processes changed during the load (worker restarted?)")
    return ProbeReport(lines, [verdict])


def counter_lines(counters: Counter[str]) -> list[str]:
    """The gateway's x-cache outcomes and Redis errors during a load."""
    lines = []
    for family in ("x-cache", "redis errors"):
        counts = {
            name.removeprefix(family + " "): count
            for name, count in counters.items()
            if name.startswith(family + " ") and count > 0
        }
        total = sum(counts.values())
        parts = [f"{name}={n} ({n / total:.1%})" for name, n in sorted(counts.items())]
        lines.append(f"  {family} during load: " + (", ".join(parts) or "none"))
    return lines


@dataclasses.dataclass(frozen=True)
class _StampedeGoals:
    upstream_calls: GoalSpec
    all_ok: GoalSpec


def _stampede_goals(name: str) -> _StampedeGoals:
    return _StampedeGoals(
        GoalSpec(f"{name}: upstream calls", "exactly 1"),
        GoalSpec(f"{name}: answers", "all 200"),
    )


STAMPEDE_GOALS = _stampede_goals("stampede (1 instance)")
STAMPEDE_2_GOALS = _stampede_goals("stampede-2 (2 instances)")


def _stampede(
    stack: Stack, options: Options, gateways: list[str], name: str, goals: _StampedeGoals
) -> ProbeReport:
    """``options.stampede`` concurrent GETs of one cold key, spread evenly over ``gateways``
    (all in front of the slow upstream, sharing one Redis)."""
    n = options.stampede
    upstream_path = f"/cacheable/stampede-{secrets.token_hex(6)}"
    path = f"/api/v1{upstream_path}"
    barrier = threading.Barrier(n + 1, timeout=CLIENT_TIMEOUT_S)
    answers: list[tuple[int, str, str]] = []  # (instance, status, x-cache)
    answers_lock = threading.Lock()

    def client(instance: int) -> None:
        gateway = urllib.parse.urlsplit(gateways[instance])
        headers = {**stack.headers(gateways[instance] + path), "Connection": "close"}
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
                answers.append((instance, *answer))

    with stack.redis_stats.measure() as usage:
        threads = [
            threading.Thread(target=client, args=(i % len(gateways),), daemon=True)
            for i in range(n)
        ]
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

    statuses = Counter(status for _, status, _ in finished)
    unanswered = n - len(finished)
    if unanswered:
        statuses["unanswered"] = unanswered
    outcomes = Counter(cache for _, _, cache in finished)
    miss, hit = outcomes.pop("MISS", 0), outcomes.pop("HIT", 0)
    other = sum(outcomes.values()) + unanswered
    other_detail = f" ({_counter_text(outcomes)})" if outcomes else ""
    calls = goals.upstream_calls.verdict(f"{reached}", reached == 1)
    all_ok = statuses == Counter({"200": n})
    ok = goals.all_ok.verdict(f"{statuses['200']}/{n} answered 200", all_ok)
    per_instance = f"{n // len(gateways)}{'+' if n % len(gateways) else ''} requests each"
    instances = (
        f"one gateway ({stack.workers} workers)"
        if len(gateways) == 1
        else f"{len(gateways)} gateways (separate processes, {stack.workers} workers each, one "
        f"Redis; {per_instance})"
    )
    lines = [
        f"{name}: {n} concurrent GETs for one cold key (one connection each, Connection: close)"
        f" -> {instances} -> upstream answering after "
        f"{SLOW_UPSTREAM_DELAY_S * 1000:.0f} ms",
        f"{name} requests that reached the upstream: {reached}   goal {calls.goal}: "
        f"{met_text(calls.met)}",
        f"{name} x-cache: MISS={miss} HIT={hit} other={other}{other_detail}   "
        f"(with full coalescing: MISS=1 HIT={n - 1})",
    ]
    if len(gateways) > 1:
        for instance in range(len(gateways)):
            mine = [(status, cache) for i, status, cache in finished if i == instance]
            lines.append(
                f"  instance {instance + 1}: x-cache "
                f"{_counter_text(Counter(cache for _, cache in mine))}; statuses "
                f"{_counter_text(Counter(status for status, _ in mine))}"
            )
    lines += [
        f"{name} statuses: {_counter_text(statuses)}   goal {ok.goal}: {met_text(ok.met)}",
        f"{name} wall time (all sent -> last answer): {elapsed:.2f} s",
        f"{name} redis commands sent by the gateways (MONITOR; total "
        f"{sum(usage.sent.values())}): {_counter_text(usage.sent)}",
        f"{name} redis commands run inside scripts (total {sum(usage.scripted.values())}): "
        f"{_counter_text(usage.scripted)}",
    ]
    return ProbeReport(lines, [calls, ok])


def _stampede_probe(stack: Stack, options: Options) -> ProbeReport:
    return _stampede(stack, options, [stack.slow_gateway], "stampede", STAMPEDE_GOALS)


def _stampede_2_probe(stack: Stack, options: Options) -> ProbeReport:
    gateways = [stack.slow_gateway, stack.slow_gateway_b]
    return _stampede(stack, options, gateways, "stampede-2", STAMPEDE_2_GOALS)


def _fairness_probe(stack: Stack, options: Options) -> ProbeReport:
    """Keyed cache hits on half the connections while the other half send keyless requests
    (401s, answered without any I/O) to the same gateway: what the hits get, next to what they
    get alone on as many connections. A worker serves its connections in turn only where a
    request waits; the gateway makes I/O-free requests yield once so that they cannot crowd
    out the others."""
    url = f"{stack.gateway}/api/v1/cacheable/fairness"
    headers = stack.headers(url)
    with _session(headers) as session:
        _warm(session, url)
    share = max(1, options.connections // 2)

    def load(with_key: bool, results: dict[str, LoadResult]) -> None:
        sent = dict(headers) if with_key else dict(BENCH_HEADERS)
        name = "hits" if with_key else "keyless"
        results[name] = wrk(url, duration_s=options.duration_s, connections=share, headers=sent)

    alone: dict[str, LoadResult] = {}
    load(True, alone)
    mixed: dict[str, LoadResult] = {}
    threads = [threading.Thread(target=load, args=(k, mixed)) for k in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = [
        f"fairness: {share} connections of keyed cache hits alone: {_load_text(alone['hits'])}",
        f"fairness: the same next to {share} connections of keyless requests (401, no I/O): "
        f"hits {_load_text(mixed['hits'])}; keyless {_load_text(mixed['keyless'])}",
    ]
    return ProbeReport(lines, [])


def _load_text(result: LoadResult) -> str:
    return (
        f"{result.requests_per_s:.0f} req/s, p50 {result.p50_ms:.2f} ms, "
        f"p99 {result.p99_ms:.2f} ms, non-2xx {result.non_2xx}"
    )


def _counter_text(counter: Counter[str]) -> str:
    return " ".join(f"{key}={count}" for key, count in sorted(counter.items())) or "none"


PROBES: tuple[Probe, ...] = (
    Probe("redis", _redis_probe, (REDIS_ROUND_TRIPS_GOAL, REDIS_KEY_SCALING_GOAL)),
    Probe("memory", _memory_probe, (MEMORY_GOAL,)),
    Probe("fairness", _fairness_probe),
    Probe("stampede", _stampede_probe, (STAMPEDE_GOALS.upstream_calls, STAMPEDE_GOALS.all_ok)),
    Probe(
        "stampede-2",
        _stampede_2_probe,
        (STAMPEDE_2_GOALS.upstream_calls, STAMPEDE_2_GOALS.all_ok),
    ),
)

SCENARIO_NAMES: tuple[str, ...] = tuple(s.name for s in LOAD_SCENARIOS) + tuple(
    p.name for p in PROBES
)
