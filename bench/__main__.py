"""``python -m bench``: load the gateway and print requests/s, latency percentiles, Redis commands
per request and what a cache stampede does.

Run from the repository root with the venv active; needs wrk, nginx and redis-server (apt). All
processes listen on free ports on 127.0.0.1 and are stopped at the end::

    python -m bench                                  # everything, 10 s x 3 rounds
    python -m bench --duration 3 --rounds 1          # a quick look
    python -m bench --only hit,redis                 # a subset (names below)
    python -m bench --only stampede --stampede 200   # 200 concurrent requests

Scenarios (``--only`` names):

- ``upstream``: wrk straight at nginx (``/nostore/items``), the reference for every ratio.
- ``passthrough``: wrk through the gateway at ``/api/v1/nostore/items`` (``no-store``: never
  stored).
- ``hit``: wrk through the gateway at ``/api/v1/cacheable/items`` (``max-age=3600``), warmed
  first (the warm-up must answer ``x-cache: MISS``, then ``HIT``); its goal is at least 0.80x
  a bare Flask hello app (a reference scenario still to be added).
- ``redis``: Redis commands per request, from ``INFO commandstats`` of the private redis-server
  read before and after a counted number of sequential keep-alive GETs (2,000 warmed cache
  hits, 500 pass-throughs), in total and per command. Redis counts the commands Lua scripts run
  there too, so the same window is also read with MONITOR and split into the commands the
  gateway sent (each a round trip, unless pipelined: then an upper bound) and those its scripts
  ran. The bench's own commands are left out.
- ``stampede``: ``--stampede N`` threads (default 100) each open a connection to a second
  gateway whose upstream answers after 300 ms (``bench/slow_upstream.py``, which counts requests
  per path), wait at a barrier and then all GET one never-requested path with ``Connection:
  close``. Prints how many requests reached the upstream (goal 1), the answers' ``x-cache`` and
  statuses, the wall time and the Redis commands the gateways sent.

wrk scenarios run in alternating rounds so that drift on a shared machine hits all of them
alike; medians of the rounds are printed, with the ratio to ``upstream`` and the gateway's
``x-cache`` outcomes and Redis errors during the load (from its ``/internal/metrics``). Probes
run once, after the loads.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter

from bench.harness import LoadResult, Processes
from bench.scenarios import (
    LOAD_SCENARIOS,
    PROBES,
    REFERENCE,
    SCENARIO_NAMES,
    LoadRun,
    LoadScenario,
    Options,
    Stack,
    Target,
    run_load,
)


def _median(runs: list[LoadRun]) -> LoadRun:
    results = [run.result for run in runs]
    counters: Counter[str] = Counter()
    for run in runs:
        counters.update(run.counters)
    return LoadRun(
        LoadResult(
            requests_per_s=statistics.median(r.requests_per_s for r in results),
            p50_ms=statistics.median(r.p50_ms for r in results),
            p99_ms=statistics.median(r.p99_ms for r in results),
            non_2xx=sum(r.non_2xx for r in results),
            errors=sum(r.errors for r in results),
        ),
        counters,
    )


def _row(name: str, result: LoadResult, reference: LoadResult | None) -> str:
    ratio = f"{result.requests_per_s / reference.requests_per_s:5.2f}x" if reference else "   --"
    return (
        f"{name:<34} {result.requests_per_s:>9.0f} req/s  p50 {result.p50_ms:>7.2f} ms  "
        f"p99 {result.p99_ms:>7.2f} ms  {ratio}  non-2xx {result.non_2xx}  errors {result.errors}"
    )


def _counter_lines(counters: Counter[str]) -> list[str]:
    """The gateway's x-cache outcomes and Redis errors during the load (all rounds)."""
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


def _goal_line(scenario: LoadScenario, medians: dict[str, LoadRun]) -> str | None:
    goal = scenario.goal
    if goal is None:
        return None
    text = f"  goal: >= {goal.min_ratio:.2f}x {goal.description} ({goal.reference})"
    reference = medians.get(goal.reference)
    if reference is None:
        known = {s.name for s in LOAD_SCENARIOS}
        why = "not run" if goal.reference in known else "no such scenario yet"
        return f"{text}: not measured ({why})"
    ratio = medians[scenario.name].result.requests_per_s / reference.result.requests_per_s
    return f"{text}: {ratio:.2f}x, {'met' if ratio >= goal.min_ratio else 'NOT met'}"


def _scenario_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIO_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join(SCENARIO_NAMES)}"
        )
    return names


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
        "--workers", type=_positive, default=2, help="worker processes of each gateway"
    )
    parser.add_argument(
        "--stampede",
        type=_positive,
        default=100,
        metavar="N",
        help="concurrent requests in the stampede scenario",
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
    )
    selected: list[str] = args.only
    loads = [s for s in LOAD_SCENARIOS if s.name in selected]
    probes = [p for p in PROBES if p.name in selected]

    rounds: dict[str, list[LoadRun]] = {s.name: [] for s in loads}
    probe_lines: list[str] = []
    with Processes() as processes:
        stack = Stack(processes, options.workers)
        try:
            targets: dict[str, Target] = {s.name: s.prepare(stack) for s in loads}
            for _ in range(options.rounds):
                for scenario in loads:
                    rounds[scenario.name].append(run_load(targets[scenario.name], stack, options))
            for probe in probes:
                probe_lines += probe.run(stack, options)
        finally:
            stack.close()

    if loads:
        medians = {name: _median(runs) for name, runs in rounds.items()}
        reference = medians.get(REFERENCE)
        print(
            f"wrk: {options.connections} connections, {options.duration_s}s x {options.rounds} "
            f"rounds (medians); gateway workers: {options.workers}; "
            f"ratio = req/s / {REFERENCE}" + ("" if reference else " (not run: no ratios)")
        )
        for scenario in loads:
            run = medians[scenario.name]
            is_reference = scenario.name == REFERENCE
            print(_row(scenario.label, run.result, None if is_reference else _result(reference)))
            if targets[scenario.name].gateway:
                for line in _counter_lines(run.counters):
                    print(line)
            goal = _goal_line(scenario, medians)
            if goal:
                print(goal)
    for line in probe_lines:
        print(line)


def _result(run: LoadRun | None) -> LoadResult | None:
    return run.result if run else None


if __name__ == "__main__":
    main()
