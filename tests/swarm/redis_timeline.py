"""The parts of a Redis restart's 503 window, for scripts/check_swarm.sh; prints one JSON line.

Reads `docker events --format '{{.TimeNano}} {{.Action}}'` of the Redis service's containers on
standard input and takes the load's JSON summary (tests/swarm/load.py, with the wall-clock
times of its first and last 503) as its argument. The steps, each from the one before:
SIGTERM sent to the old Redis (kill), old container gone (die), new container started
(start), its first passing probe (healthy; only then does Swarm publish its name), the last
503 through Traefik (the app's outage cool-down and Traefik's own probe).
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    summary = json.loads(sys.argv[1])
    first: dict[str, float] = {}
    for line in sys.stdin:
        stamp, _, action = line.strip().partition(" ")
        if not stamp.isdigit():
            continue
        name = action.split(":", 1)[0] if action.startswith("health_status") else action
        key = "healthy" if action == "health_status: healthy" else name
        # The first of each: the old container's kill and die, the new one's start and probe.
        first.setdefault(key, int(stamp) / 1e9)
    steps: dict[str, float | None] = {}
    order = ("kill", "die", "start", "healthy")
    previous: float | None = None
    for key in order:
        at = first.get(key)
        steps[f"{key}_s"] = round(at - previous, 2) if at is not None and previous else None
        previous = at if at is not None else previous
    last_503 = summary.get("last_503_at")
    healthy = first.get("healthy")
    steps["healthy_to_last_503_s"] = (
        round(last_503 - healthy, 2) if last_503 is not None and healthy is not None else None
    )
    first_503 = summary.get("first_503_at")
    kill = first.get("kill")
    steps["kill_to_first_503_s"] = (
        round(first_503 - kill, 2) if first_503 is not None and kill is not None else None
    )
    steps["window_s"] = summary.get("unavailable_503_window_s")
    print(json.dumps(steps))


if __name__ == "__main__":
    main()
