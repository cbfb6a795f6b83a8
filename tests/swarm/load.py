"""Bounded keyed load through Traefik for scripts/check_swarm.sh; prints a JSON summary.

Sends GET requests at a fixed total rate from a few threads, each on a keep-alive HTTPS
connection to the loopback entrypoint with the stack's Host (SNI and header), until the stop
file appears or the time limit passes. A failed request is any answer but 2xx, or an error,
or no answer within the timeout; 503s are also timed, to measure a Redis restart's window.
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import threading
import time
from collections import Counter
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--rate", type=float, default=40)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout-s", type=float, default=10)
    parser.add_argument("--max-s", type=float, default=300)
    parser.add_argument("--stop-file", type=Path, required=True)
    args = parser.parse_args()

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # Traefik's default certificate on loopback
    lock = threading.Lock()
    outcomes: Counter[str] = Counter()
    unavailable: list[float] = []
    started = time.monotonic()
    started_wall = time.time()
    interval_s = args.threads / args.rate

    def worker() -> None:
        connection: http.client.HTTPSConnection | None = None
        next_at = time.monotonic()
        while not args.stop_file.exists() and time.monotonic() - started < args.max_s:
            next_at += interval_s
            if connection is None:
                connection = http.client.HTTPSConnection(
                    "127.0.0.1", args.port, timeout=args.timeout_s, context=context
                )
            sent_at = time.monotonic()
            try:
                connection.request(
                    "GET", args.path, headers={"host": args.host, "x-api-key": args.key}
                )
                response = connection.getresponse()
                response.read()
                outcome = str(response.status)
                if response.getheader("connection", "").lower() == "close":
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
                if connection is not None:
                    connection.close()
                connection = None
            with lock:
                outcomes[outcome] += 1
                if outcome == "503":
                    unavailable.append(sent_at - started)
            time.sleep(max(0.0, next_at - time.monotonic()))

    threads = [threading.Thread(target=worker) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = sum(outcomes.values())
    ok = sum(count for outcome, count in outcomes.items() if outcome.startswith("2"))
    window_s = (max(unavailable) - min(unavailable)) if unavailable else 0.0
    summary = {
        "requests": total,
        "failed": total - ok,
        "outcomes": dict(outcomes),
        "unavailable_503_window_s": round(window_s, 2),
        # Wall-clock times of the first and the last 503, to set against Docker's events.
        "first_503_at": round(started_wall + min(unavailable), 3) if unavailable else None,
        "last_503_at": round(started_wall + max(unavailable), 3) if unavailable else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
