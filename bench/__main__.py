"""``python -m bench``: load the gateway and print requests/s and latency percentiles.

Scenarios run in alternating rounds so that drift on a shared machine hits all of them alike;
medians of the rounds are printed.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

from bench.harness import LoadResult, Processes, wrk


def _median(results: list[LoadResult]) -> LoadResult:
    return LoadResult(
        requests_per_s=statistics.median(r.requests_per_s for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        non_2xx=sum(r.non_2xx for r in results),
        errors=sum(r.errors for r in results),
    )


def _row(name: str, result: LoadResult, reference: LoadResult | None) -> str:
    ratio = f"{result.requests_per_s / reference.requests_per_s:5.2f}x" if reference else "   --"
    return (
        f"{name:<34} {result.requests_per_s:>9.0f} req/s  p50 {result.p50_ms:>7.2f} ms  "
        f"p99 {result.p99_ms:>7.2f} ms  {ratio}  non-2xx {result.non_2xx}  errors {result.errors}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10, help="seconds per scenario and round")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    args = parser.parse_args()

    with Processes() as processes:
        upstream = processes.nginx()
        redis_url, _ = processes.redis()
        gateway = processes.gateway(
            {"HTTP_CLIENT_BASE_URL": upstream, "CACHE_REDIS_URL": redis_url},
            workers=args.workers,
        )
        scenarios: dict[str, Callable[[], LoadResult]] = {
            "upstream (nginx) directly": lambda: wrk(
                f"{upstream}/nostore/items", duration_s=args.duration, connections=args.connections
            ),
            "gateway pass-through (no-store)": lambda: wrk(
                f"{gateway}/api/v1/nostore/items",
                duration_s=args.duration,
                connections=args.connections,
            ),
        }
        rounds: dict[str, list[LoadResult]] = {name: [] for name in scenarios}
        for _ in range(args.rounds):
            for name, run in scenarios.items():
                rounds[name].append(run())

    medians = {name: _median(results) for name, results in rounds.items()}
    reference = medians["upstream (nginx) directly"]
    print(
        f"wrk: {args.connections} connections, {args.duration}s x {args.rounds} rounds "
        f"(medians); gateway workers: {args.workers}"
    )
    for name, result in medians.items():
        print(_row(name, result, reference if result is not reference else None))


if __name__ == "__main__":
    main()
