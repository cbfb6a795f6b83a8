"""``python -m bench``: load the gateway and print requests/s, latency percentiles, Redis commands
per request, memory under load and what a cache stampede does, each against its goal, and a final
summary table of the goals (met / NOT met).

Run from the repository root with the venv active; needs wrk, nginx and redis-server (apt). All
processes listen on free ports on 127.0.0.1 and are stopped at the end::

    python -m bench                                  # everything, 10 s x 3 rounds
    python -m bench --anchor /path/to/sva-bus-server # ... with the NestJS reference
    python -m bench --duration 3 --rounds 1          # a quick look
    python -m bench --only hit,redis                 # a subset (names below)
    python -m bench --only stampede --stampede 200   # 200 concurrent requests
    python -m bench --only memory --memory-seconds 10

The NestJS service the gateway replaces (sva-bus-server, NestJS on Fastify, one node process) is
the reference the gateway's throughput and latency goals are stated against. ``--anchor DIR``
names a checkout of it, built with ``npm ci && npm run build`` (the bench runs ``node
DIR/dist/main.js``, from a directory of its own so that no ``.env`` in DIR is read). It gets a
private redis-server of its own, the same nginx upstream as the gateway
(``HTTP_CLIENT_BASE_URL``), ``ADMIN_API_TOKEN`` (the bench's random one),
``API_KEYS_RATE_LIMIT_MAX_REQUESTS=10000000``, ``LOG_LEVEL=warn`` and ``NODE_ENV=production``,
and a client key made through its admin API (``POST /internal/api-keys``). It caches GET answers
in Redis by path, query, Accept and Accept-Language, honouring the upstream's Cache-Control, and
says so in ``x-cache`` (MISS, HIT, BYPASS for ``no-store``). Without ``--anchor`` its scenarios
are skipped and the goals against it say "not measured".

Scenarios (``--only`` names); every gateway request carries a client key (``x-api-key``,
created through the admin API), so hits and pass-throughs are keyed ones:

- ``upstream``: wrk straight at nginx (``/nostore/items``), a reference for the ratios.
- ``flask-hello``: wrk at a bare Flask app (``bench/hello_app.py``) answering the same ~1 KB
  JSON as nginx, under gunicorn with its stock ``gevent`` workers (``--workers``, like the
  gateway): the second reference, what Flask itself can do here.
- ``flask-hello-ours``: the same app on the product's own gunicorn worker class
  (``proxy_app.worker.GatewayWorker``); not measured (with the reason) where that class cannot
  be imported.
- ``nest-passthrough``: wrk at the NestJS service's ``/api/v1/nostore/items`` with its client
  key: a keyed pass-through of a ``no-store`` answer (the warm-up must answer ``x-cache:
  BYPASS``). Only with ``--anchor``.
- ``nest-hit``: wrk at its ``/api/v1/cacheable/items``, warmed first (the warm-up must answer
  ``x-cache: MISS``, then ``HIT``). Only with ``--anchor``. After the rounds, the RSS of its
  node process is printed.
- ``passthrough``: wrk through the gateway at ``/api/v1/nostore/items`` (``no-store``: never
  stored). Goal: at least 1.50x nest-passthrough (the ratio to flask-hello is shown too).
- ``hit``: wrk through the gateway at ``/api/v1/cacheable/items`` (``max-age=3600``), warmed
  first (the warm-up must answer ``x-cache: MISS``, then ``HIT``). Goals: at least 0.60x
  nest-hit with no non-2xx answer (nor socket error); p99 at 50 connections no higher than
  nest-hit's in the same run.

For the gateway's and the NestJS service's loads, the requests that reached nginx during the
load are printed (nginx's ``stub_status`` counter): a cache hit load should cause none, a
pass-through one as many as it answered.
- ``redis``: Redis commands per request, from ``INFO commandstats`` of the private redis-server
  read before and after a counted number of sequential keep-alive GETs (2,000 warmed cache
  hits, 500 pass-throughs), in total and per command. Redis counts the commands Lua scripts run
  there too, so the same window is also read with MONITOR and split into the commands the
  gateway sent (each a round trip, unless pipelined: then an upper bound) and those its scripts
  ran. The bench's own commands are left out. Goals, on the hits: at most 1 command sent (round
  trip) per hit on average; no command whose cost grows with the number of keys (SCAN, KEYS)
  sent or run by a script.
- ``memory``: ``--memory-seconds S`` (default 60) of wrk on a warmed keyed cache hit, then the
  resident memory (VmRSS from ``/proc``) of the gateway summed over its gunicorn master and
  workers (the master's descendants), in MB of 2^20 bytes; PSS (shared pages split among their
  sharers) is printed too. Goal: at most 150 MB. With ``--anchor``, the same load then runs on
  the NestJS service's keyed cache hit and its RSS is printed next to the gateway's (no goal).
- ``fairness``: keyed cache hits on half the connections, alone (``--duration``) and then next
  to keyless requests (401s, which need no I/O) on the other half, both to the same gateway;
  prints what each gets (req/s, p50, p99). No verdict: it shows whether a stream of cheap
  requests crowds out the others (under gevent a request that never waits never lets the other
  connections of its worker run; the gateway makes such requests yield once).
- ``stampede``: ``--stampede N`` threads (default 100) each open a connection to a second gateway
  whose upstream answers after 300 ms (``tests/support/stub_upstream.py``, which counts requests per
  path), wait at a barrier and then all GET one never-requested path with ``Connection: close``.
  Prints how many requests reached the upstream (goal 1), the answers' ``x-cache`` and statuses
  (goal all 200), the wall time and the Redis commands the gateways sent.
- ``stampede-2``: the same across two gateway instances (separate processes on separate ports,
  ``--workers`` each) sharing one Redis and the slow upstream, half the requests to each. Goals:
  exactly 1 upstream call, all 200.
- ``downloads``: a fresh gateway (``--workers``, stopped afterwards) in front of nginx, which
  serves a 512 MiB ``no-store`` file (sparse: it costs no disk). Three concurrent keyed GETs of
  it, read and discarded, while one client sends sequential keyed cache hits, each on a new
  connection so that they reach every worker. The gateway's RSS (master + workers, from
  ``/proc``) is sampled every 0.1 s. Prints each download's status and bytes, the RSS growth
  (highest sample minus before) and the hits' answers, p99 and maximum latency. Goals: growth
  under 64 MB with all three downloads complete; every hit 200 and none slower than 1 s. The
  probe gives up on downloads after 120 s, and stops reading past 6 GB of growth.
- ``shutdown``: a fresh gateway (up to 2 workers, default ``GRACEFUL_TIMEOUT``) in front of an
  upstream that answers after 1 s (``tests/support/stub_upstream.py``); 40 idle keep-alive
  connections (one request answered each, the socket left open), 10 requests waiting on the
  upstream, then SIGTERM to the gunicorn master. Prints how many of the 10 were answered 200 (goal:
  all), the exit code and the seconds from SIGTERM to exit (goal: 0 within 4 s; the probe kills the
  gateway after 45 s). Then the same with ``SHUTDOWN_DRAIN_SECONDS=3``, plus a keyed cache hit on a
  new connection every 100 ms after SIGTERM and one ``/health/ready`` 0.2 s after it. Goals: new
  requests keep being answered 200 for at least 3 s; readiness answers 503.

wrk scenarios run in alternating rounds so that drift on a shared machine hits all of them
alike; medians of the rounds are printed, with the ratios to ``upstream``, ``flask-hello`` and
the NestJS counterpart, and the gateway's ``x-cache`` outcomes and Redis errors during the load
(from its ``/internal/metrics``). Probes run once, after the loads, in the order above. The
output ends with a summary table: one line per goal, with the measured value and met / NOT met
(or not measured, with the reason, when its scenario or the reference it needs was not run).
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from pathlib import Path

from bench.harness import LoadResult, Processes, anchor_problem
from bench.scenarios import (
    HELLO,
    LOAD_SCENARIOS,
    NEST_HIT,
    NEST_PASS,
    NO_ANCHOR,
    PROBES,
    REFERENCE,
    SCENARIO_NAMES,
    LoadRun,
    Options,
    ProbeReport,
    Stack,
    Target,
    Verdict,
    anchor_memory_line,
    counter_lines,
    met_text,
    run_load,
)


def _median(runs: list[LoadRun]) -> LoadRun:
    results = [run.result for run in runs]
    counters: Counter[str] = Counter()
    for run in runs:
        counters.update(run.counters)
    counted = [run.upstream_requests for run in runs if run.upstream_requests is not None]
    return LoadRun(
        LoadResult(
            requests_per_s=statistics.median(r.requests_per_s for r in results),
            p50_ms=statistics.median(r.p50_ms for r in results),
            p99_ms=statistics.median(r.p99_ms for r in results),
            non_2xx=sum(r.non_2xx for r in results),
            errors=sum(r.errors for r in results),
        ),
        counters,
        sum(counted) if counted else None,
    )


def _ratio(result: LoadResult, reference: LoadRun | None) -> str:
    if reference is None:
        return "   --"
    return f"{result.requests_per_s / reference.result.requests_per_s:5.2f}x"


def _row(
    name: str, result: LoadResult, medians: dict[str, LoadRun], counterpart: str | None
) -> str:
    nest = medians.get(counterpart) if counterpart else None
    return (
        f"{name:<38} {result.requests_per_s:>7.0f} req/s  p50 {result.p50_ms:>7.2f} ms  "
        f"p99 {result.p99_ms:>7.2f} ms  {_ratio(result, medians.get(REFERENCE))} nginx  "
        f"{_ratio(result, medians.get(HELLO))} hello  {_ratio(result, nest)} nest  "
        f"non-2xx {result.non_2xx}  errors {result.errors}"
    )


def _summary(verdicts: list[Verdict]) -> list[str]:
    header = ("goal", "measured", "target", "verdict")
    rows = [header] + [(v.name, v.measured, v.goal, met_text(v.met)) for v in verdicts]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = ["", "summary of the goals:"]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[3]]).rstrip())
    return lines


def _scenario_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIO_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join(SCENARIO_NAMES)}"
        )
    return names


def _anchor_dir(value: str) -> Path:
    checkout = Path(value).resolve()
    problem = anchor_problem(checkout)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return checkout


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=_positive, default=10, help="seconds per scenario and round"
    )
    parser.add_argument("--connections", type=_positive, default=50)
    parser.add_argument("--rounds", type=_positive, default=3)
    parser.add_argument(
        "--workers",
        type=_positive,
        default=2,
        help="worker processes of each gateway and of flask-hello",
    )
    parser.add_argument(
        "--stampede",
        type=_positive,
        default=100,
        metavar="N",
        help="concurrent requests in the stampede scenario",
    )
    parser.add_argument(
        "--memory-seconds",
        type=_positive,
        default=60,
        metavar="S",
        help="seconds of cache-hit load before the memory probe reads the gateway's RSS",
    )
    parser.add_argument(
        "--anchor",
        type=_anchor_dir,
        metavar="DIR",
        help="a built checkout of the NestJS service the gateway replaces (npm ci && npm run "
        "build): measured as the reference of the nest-* scenarios and the gateway's goals",
    )
    parser.add_argument(
        "--only",
        type=_scenario_list,
        default=list(SCENARIO_NAMES),
        metavar="SCENARIO[,SCENARIO]",
        help=f"run only these scenarios: {', '.join(SCENARIO_NAMES)}",
    )
    args = parser.parse_args()
    options = Options(
        duration_s=args.duration,
        connections=args.connections,
        rounds=args.rounds,
        workers=args.workers,
        stampede=args.stampede,
        memory_s=args.memory_seconds,
        anchor=args.anchor,
    )
    selected: list[str] = args.only
    skipped: dict[str, str] = {}
    for scenario in LOAD_SCENARIOS:
        why = scenario.unavailable(options) if scenario.name in selected else None
        if why is not None:
            skipped[scenario.name] = why
    loads = [s for s in LOAD_SCENARIOS if s.name in selected and s.name not in skipped]
    probes = [p for p in PROBES if p.name in selected]

    rounds: dict[str, list[LoadRun]] = {s.name: [] for s in loads}
    reports: dict[str, ProbeReport] = {}
    anchor_memory: str | None = None
    with Processes() as processes:
        stack = Stack(processes, options.workers, options.anchor)
        try:
            targets: dict[str, Target] = {s.name: s.prepare(stack) for s in loads}
            for _ in range(options.rounds):
                for scenario in loads:
                    rounds[scenario.name].append(run_load(targets[scenario.name], stack, options))
            if rounds.keys() & {NEST_HIT, NEST_PASS}:
                anchor_memory = anchor_memory_line(stack)
            for probe in probes:
                reports[probe.name] = probe.run(stack, options)
        finally:
            stack.close()

    medians = {name: _median(runs) for name, runs in rounds.items()}
    verdicts: list[Verdict] = []
    if loads or skipped:
        print(
            f"wrk: {options.connections} connections, {options.duration_s}s x {options.rounds} "
            f"rounds (medians); workers per server: {options.workers}; ratios = req/s / "
            f"{REFERENCE} (nginx), / {HELLO} and / the NestJS counterpart"
        )
    if options.anchor is None and {NEST_HIT, NEST_PASS} & set(selected):
        print(f"NestJS service: {NO_ANCHOR} (its scenarios and the goals against it: not measured)")
    for scenario in LOAD_SCENARIOS:
        selected_load = scenario.name in medians
        if selected_load:
            run = medians[scenario.name]
            print(_row(scenario.label, run.result, medians, scenario.counterpart))
            if targets[scenario.name].gateway:
                for line in counter_lines(run.counters):
                    print(line)
            if run.upstream_requests is not None:
                print(f"  upstream (nginx) requests during load: {run.upstream_requests}")
        elif scenario.name in skipped:
            print(f"{scenario.label:<38} not measured ({skipped[scenario.name]})")
        for goal in scenario.goals:
            verdict = goal.verdict(scenario.name, medians, options, skipped)
            verdicts.append(verdict)
            if selected_load:
                print(
                    f"  goal: {verdict.name} {verdict.goal}: {verdict.measured}, "
                    f"{met_text(verdict.met)}"
                )
    if anchor_memory is not None:
        print(anchor_memory)
    for probe in PROBES:
        report = reports.get(probe.name)
        if report is None:
            verdicts += [goal.not_run() for goal in probe.goals]
            continue
        for line in report.lines:
            print(line)
        verdicts += report.verdicts
    for line in _summary(verdicts):
        print(line)


if __name__ == "__main__":
    main()
