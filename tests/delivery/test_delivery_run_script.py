"""scripts/run.sh on a machine with nothing running: a private Redis when none is configured.

Each case runs in a network namespace of its own (`unshare --net`), so that nothing listens on
127.0.0.1:6379 there whatever runs on this machine, as on a fresh one. The checkout is a copy
of the scripts with the package linked in and the test interpreter as its virtualenv.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "admin-token-Ru63-never-printed"

needs_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root with unshare and ip for a network namespace of its own",
)

# Starts run.sh in the namespace, waits (bounded) for it to be ready, creates an API key as the
# README's quick start does, stops it with SIGTERM and reports what it saw, one fact a line.
DRIVER = r"""
set -u
ip link set lo up
cd "$CHECKOUT"
./scripts/run.sh >run.log 2>&1 &
pid=$!
for _ in $(seq 300); do
  curl -fs -o /dev/null http://127.0.0.1:3000/health/live && break
  sleep 0.1
done
for _ in $(seq 50); do
  curl -fs -o /dev/null http://127.0.0.1:3000/health/ready && break
  sleep 0.1
done
echo "READY $(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:3000/health/ready)"
echo "KEY $(curl -s -o /dev/null -w '%{http_code}' -X POST http://127.0.0.1:3000/internal/api-keys \
  -H "authorization: Bearer $ADMIN_API_TOKEN" -H 'content-type: application/json' \
  -d '{"owner": "me"}')"
redis_port=$(grep -o 'redis-server on 127.0.0.1:[0-9]*' run.log | grep -o '[0-9]*$' || true)
kill -TERM "$pid"
wait "$pid"
echo "EXIT $?"
if [ -n "$redis_port" ]; then
  if (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null; then echo "PRIVATE_REDIS_LEFT_RUNNING"
  else echo "PRIVATE_REDIS_STOPPED"; fi
fi
"""


def make_checkout(tmp_path: Path) -> Path:
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    for script in ("run.sh", "_venv.sh"):
        shutil.copy2(REPO_ROOT / "scripts" / script, checkout / "scripts" / script)
    requirements = sorted(REPO_ROOT.glob("requirements*.txt"))
    for path in requirements:
        shutil.copy2(path, checkout / path.name)
    (checkout / "proxy_app").symlink_to(REPO_ROOT / "proxy_app")
    # The test's interpreter stands in for the virtualenv, already up to date.
    venv_bin = checkout / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    (venv_bin / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    stamp = hashlib.sha256(b"".join(path.read_bytes() for path in requirements)).hexdigest()
    (checkout / ".venv" / ".installed-requirements.txt.sha256").write_text(stamp + "\n")
    return checkout


def run_in_namespace(checkout: Path, **env: str) -> tuple[dict[str, str], str]:
    result = subprocess.run(
        ["unshare", "--net", "bash", "-c", DRIVER],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(checkout),
            "CHECKOUT": str(checkout),
            "ADMIN_API_TOKEN": ADMIN_TOKEN,
            "SHUTDOWN_DRAIN_SECONDS": "0",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    facts: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition(" ")
        facts[name] = value
    log = (checkout / "run.log").read_text(errors="replace")
    assert result.returncode == 0, result.stdout + result.stderr + log
    return facts, log


@needs_namespace
def test_with_no_redis_configured_or_running_a_private_one_serves_and_stops_with_it(
    tmp_path: Path,
) -> None:
    checkout = make_checkout(tmp_path)
    facts, log = run_in_namespace(checkout)
    assert facts["READY"] == "200", log
    assert facts["KEY"] == "201", log
    assert facts["EXIT"] == "0", log
    assert "PRIVATE_REDIS_STOPPED" in facts, log
    said = [line for line in log.splitlines() if "private redis-server" in line]
    assert len(said) == 1
    assert said[0].startswith("run.sh: no Redis at 127.0.0.1:6379 and none configured")
    assert ADMIN_TOKEN not in log
    # Its data stays in the checkout (the key survives the next run), out of git's sight.
    assert any((checkout / ".local" / "redis").iterdir())
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".local/redis/appendonlydir"], cwd=REPO_ROOT, check=False
    )
    assert ignored.returncode == 0


@needs_namespace
@pytest.mark.parametrize("where", ["environment", ".env"])
def test_a_configured_redis_that_is_down_is_never_replaced(tmp_path: Path, where: str) -> None:
    checkout = make_checkout(tmp_path)
    url = "redis://127.0.0.1:6390/0"
    env = {"CACHE_REDIS_URL": url} if where == "environment" else {}
    if where == ".env":
        (checkout / ".env").write_text(f"CACHE_REDIS_URL={url}\n")
    facts, log = run_in_namespace(checkout, **env)
    assert facts["READY"] == "503", log  # the service runs, unready without its Redis
    assert facts["EXIT"] == "0", log
    assert "private redis-server" not in log
    assert "PRIVATE_REDIS_STOPPED" not in facts
    assert not (checkout / ".local").exists()
