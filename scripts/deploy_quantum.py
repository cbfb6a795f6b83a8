#!/usr/bin/env python3
"""Deploy proxy_app to Planetary Quantum, verify it, and roll back when verification fails.

Steps: record the release that is live now (its version and deployment id from the public
/health; the image to roll back to is PREVIOUS_IMAGE, else that version's tag), render the
stack for APP_IMAGE, create its external Swarm secrets from the environment (`quantum-cli
secrets create --name <name> --file -`, the value on stdin; an existing name holds the same
value), run `quantum-cli stacks update --create --wait --stack $QUANTUM_STACK`
(falling back to `quantum-cli stack update` on CLIs that do not know `stacks`), poll
/health until enough replies in a row (each a request of its own, balanced anew) report the
expected version and Redis up (and this deploy's DEPLOY_ID, so that tasks of an earlier
deploy of the same commit do not count): more replies than tasks can be in rotation, so no
replica of the release before answers any more; then smoke-test an authenticated GET
through /api/v1 and an unauthenticated one that must get 401 (redirects count as failures
and are never followed with the key). After a
failed verification or smoke check, a release Swarm has already rolled back (/health answers
the previous version and deployment id again) is smoke-tested and reported, never deployed a
second time; otherwise the script re-deploys the previous image, verifies and smoke-tests
it. Either way it exits 1. A failed redeploy of the commit already live cannot be helped by
a rollback (configuration is not rolled back): it says so. Secret values are never printed:
command output is redacted before it is shown.

Environment (required): QUANTUM_ENDPOINT, QUANTUM_STACK, APP_IMAGE, PUBLIC_URL,
EXPECTED_VERSION, SMOKE_API_KEY, plus everything scripts/render_stack.py needs. Optional:
PREVIOUS_IMAGE, RENDER_DIR (already rendered for APP_IMAGE), SMOKE_PATH (default /api/v1,
see DEFAULT_SMOKE_PATH), QUANTUM_CLI (default quantum-cli), DEPLOY_ID (reported by the new
tasks' /health), DEPLOY_HEALTH_CONFIRMATIONS (2 x (APP_REPLICAS + 1)),
DEPLOY_VERIFY_TIMEOUT_S (480), ROLLBACK_VERIFY_TIMEOUT_S (300), SWARM_ROLLBACK_WAIT_S (90),
DEPLOY_POLL_INTERVAL_S (10), DEPLOY_HTTP_TIMEOUT_S (10), DEPLOY_CLI_TIMEOUT_S (600),
KEEP_RENDERED (0). The defaults keep
deploy, verify and rollback within the job's 45 minutes. PUBLIC_URL must be https, except on
a loopback host (tests).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SCRIPTS_DIR = Path(__file__).resolve().parent
RENDER_SCRIPT = SCRIPTS_DIR / "render_stack.py"
SHA40 = re.compile(r"^[0-9a-f]{40}$")
IMAGE_REPOSITORY = re.compile(
    r"^(?P<repository>[^@]+?)(?::[A-Za-z0-9_][A-Za-z0-9_.-]*)?(?:@sha256:[0-9a-f]{64})?$"
)
SECRET_NAMES = (
    "ADMIN_API_TOKEN",
    "HTTP_CLIENT_API_KEY",
    "SMOKE_API_KEY",
    "QUANTUM_API_KEY",
    "QUANTUM_PASSWORD",
)
# What CLIs print when a subcommand or flag does not exist in their version.
UNKNOWN_COMMAND = re.compile(
    r"unknown command|no help topic|invalid choice|unknown subcommand|is not a [a-z-]+ command",
    re.IGNORECASE,
)
SECRET_EXISTS = re.compile(r"already exists|AlreadyExists|name conflicts", re.IGNORECASE)
UNKNOWN_WAIT_FLAG = re.compile(
    r"(flag provided but not defined|unknown flag|unknown option)[^\n]*-wait", re.IGNORECASE
)
USER_AGENT = "proxy-app-deploy-verify/1"
# The gateway's own route (no trailing slash, so no redirect) forwarded to the upstream's base
# URL: a healthy release answers it whatever the upstream serves there. Because many upstreams
# answer 404 at their root, with this default the keyed request passes when the gateway
# accepted the key and the upstream answered (see smoke_accepted); a SMOKE_PATH set by the
# operator names a request that must answer 2xx.
DEFAULT_SMOKE_PATH = "/api/v1"
# What the gateway answers itself when the smoke request did not get through it to the upstream.
GATEWAY_REFUSALS = frozenset({400, 401, 403, 407, 413, 414, 429, 431})
LOOPBACK_URL = re.compile(r"^http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]+)?$")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer to judge, never a hop to take with the smoke key."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects())


class DeployConfigError(Exception):
    """Required settings are missing or malformed."""


@dataclass(frozen=True)
class Settings:
    endpoint: str
    stack: str
    image: str
    public_url: str
    expected_version: str
    smoke_api_key: str = field(repr=False)
    smoke_path: str
    previous_image: str | None
    render_dir: Path | None
    cli: list[str]
    verify_timeout_s: float
    rollback_verify_timeout_s: float
    poll_interval_s: float
    http_timeout_s: float
    cli_timeout_s: float
    keep_rendered: bool
    deploy_id: str | None = None
    health_confirmations: int = 6
    smoke_path_is_default: bool = False
    swarm_rollback_wait_s: float = 90


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise DeployConfigError(f"{name}: {raw!r} is not a number of seconds") from exc
    if value <= 0:
        raise DeployConfigError(f"{name}: must be greater than 0")
    return value


def default_confirmations(environ: Mapping[str, str]) -> int:
    """Replies in a row that confirm a release: twice the tasks a start-first update can run
    at once (APP_REPLICAS + 1), so that with round-robin balancing each of them, an old one
    included, would have answered at least once; never fewer than 3."""
    try:
        replicas = int(environ.get("APP_REPLICAS") or 2)
    except ValueError:
        replicas = 2  # the render refuses it with its own message
    return max(3, 2 * (replicas + 1))


def load_settings(environ: Mapping[str, str]) -> Settings:
    required = (
        "QUANTUM_ENDPOINT",
        "QUANTUM_STACK",
        "APP_IMAGE",
        "PUBLIC_URL",
        "EXPECTED_VERSION",
        "SMOKE_API_KEY",
    )
    missing = [name for name in required if not environ.get(name)]
    if missing:
        raise DeployConfigError("required but not set: " + ", ".join(missing))
    public_url = environ["PUBLIC_URL"].rstrip("/")
    if not re.match(r"^https://[^/\s]+", public_url) and not LOOPBACK_URL.match(public_url):
        # The smoke check sends a real client key: never in clear text over a network.
        raise DeployConfigError("PUBLIC_URL: must be an https URL such as https://api.example.com")
    smoke_path = environ.get("SMOKE_PATH") or DEFAULT_SMOKE_PATH
    if smoke_path != DEFAULT_SMOKE_PATH and not smoke_path.startswith("/api/v1/"):
        raise DeployConfigError("SMOKE_PATH: must be /api/v1 or start with /api/v1/")
    render_dir = environ.get("RENDER_DIR")
    return Settings(
        endpoint=environ["QUANTUM_ENDPOINT"],
        stack=environ["QUANTUM_STACK"],
        image=environ["APP_IMAGE"],
        public_url=public_url,
        expected_version=environ["EXPECTED_VERSION"],
        smoke_api_key=environ["SMOKE_API_KEY"],
        smoke_path=smoke_path,
        previous_image=environ.get("PREVIOUS_IMAGE") or None,
        render_dir=Path(render_dir) if render_dir else None,
        cli=shlex.split(environ.get("QUANTUM_CLI") or "quantum-cli"),
        verify_timeout_s=_number(environ, "DEPLOY_VERIFY_TIMEOUT_S", 480),
        rollback_verify_timeout_s=_number(environ, "ROLLBACK_VERIFY_TIMEOUT_S", 300),
        poll_interval_s=_number(environ, "DEPLOY_POLL_INTERVAL_S", 10),
        http_timeout_s=_number(environ, "DEPLOY_HTTP_TIMEOUT_S", 10),
        cli_timeout_s=_number(environ, "DEPLOY_CLI_TIMEOUT_S", 600),
        keep_rendered=environ.get("KEEP_RENDERED", "0") == "1",
        deploy_id=environ.get("DEPLOY_ID") or None,
        health_confirmations=int(
            _number(environ, "DEPLOY_HEALTH_CONFIRMATIONS", default_confirmations(environ))
        ),
        smoke_path_is_default=not environ.get("SMOKE_PATH"),
        swarm_rollback_wait_s=_number(environ, "SWARM_ROLLBACK_WAIT_S", 90),
    )


class Redactor:
    """Replaces every known secret value with a marker before anything is printed."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        values = {environ.get(name, "") for name in SECRET_NAMES}
        self._secrets = sorted((v for v in values if len(v) >= 4), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def log(message: str) -> None:
    print(f"deploy: {message}", flush=True)


@dataclass(frozen=True)
class HttpResult:
    status: int | None
    body: bytes
    error: str | None = None


def http_get(url: str, timeout_s: float, headers: Mapping[str, str] | None = None) -> HttpResult:
    if not url.startswith(("https://", "http://")):
        return HttpResult(None, b"", f"refusing non-http URL {url!r}")
    all_headers = {"user-agent": USER_AGENT, **(headers or {})}
    request = urllib.request.Request(url, headers=all_headers)  # noqa: S310 (scheme checked)
    try:
        # Scheme checked above: only http(s) reaches urlopen.
        with _OPENER.open(request, timeout=timeout_s) as response:  # nosec B310
            return HttpResult(response.status, response.read(65536))
    except urllib.error.HTTPError as exc:
        return HttpResult(exc.code, exc.read(65536))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return HttpResult(None, b"", f"{type(exc).__name__}: {reason}")


def reported_version(result: HttpResult) -> str | None:
    return _reported(result, "version")


def reported_deployment(result: HttpResult) -> str | None:
    return _reported(result, "deployment")


def _reported(result: HttpResult, name: str) -> str | None:
    if result.status != 200:
        return None
    try:
        document = json.loads(result.body)
    except ValueError:
        return None
    value = document.get(name) if isinstance(document, dict) else None
    return value if isinstance(value, str) else None


def image_repository(image: str) -> str:
    match = IMAGE_REPOSITORY.match(image)
    if match is None:
        raise DeployConfigError(f"APP_IMAGE: cannot tell the repository of {image!r}")
    return match.group("repository")


@dataclass(frozen=True)
class LiveRelease:
    """What served before this deploy: the image to roll back to, and how /health named it."""

    image: str | None
    version: str | None
    deployment: str | None


def record_live_release(settings: Settings) -> LiveRelease:
    """The image to roll back to (PREVIOUS_IMAGE, else the SHA the public /health reports) and
    the live version and deployment id, by which a rollback Swarm did is recognised."""
    result = http_get(f"{settings.public_url}/health", settings.http_timeout_s)
    version = reported_version(result)
    deployment = reported_deployment(result)
    log(f"live release: version={version} deployment={deployment}")
    if settings.previous_image:
        log(f"previous image (given): {settings.previous_image}")
        return LiveRelease(settings.previous_image, version, deployment)
    if version is None or SHA40.match(version) is None:
        detail = result.error or f"status {result.status}, version {version!r}"
        log(f"no previous image recorded: the live /health does not report a git SHA ({detail})")
        return LiveRelease(None, version, deployment)
    previous = f"{image_repository(settings.image)}:{version}"
    log(f"previous image (from the live /health): {previous}")
    return LiveRelease(previous, version, deployment)


def smoke_accepted(status: int | None, *, default_path: bool) -> bool:
    """Whether the keyed smoke request's answer shows a working release."""
    if status is None:
        return False
    if not default_path:
        return 200 <= status < 300
    # The default path reaches the upstream's base URL, whose own answer (often a 404 at an
    # API's root) cannot be known here: any upstream answer below 500 counts, but not a
    # redirect, nor what the gateway answers itself when a request does not get through.
    return status < 500 and not 300 <= status < 400 and status not in GATEWAY_REFUSALS


class Deployer:
    def __init__(self, settings: Settings, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.environ = dict(environ)
        self.redact = Redactor(environ)
        self.created_dirs: list[Path] = []

    # -- rendering -----------------------------------------------------------
    def render(self, image: str, version: str, deploy_id: str | None = None) -> Path:
        env = {**self.environ, "APP_IMAGE": image, "APP_VERSION": version}
        if deploy_id is not None:
            env["DEPLOY_ID"] = deploy_id
        completed = subprocess.run(  # noqa: S603
            [sys.executable, str(RENDER_SCRIPT), "--quiet"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if completed.stderr:
            print(self.redact(completed.stderr), end="", file=sys.stderr, flush=True)
        if completed.returncode != 0:
            raise DeployConfigError(f"rendering the stack for {image} failed")
        target = Path(completed.stdout.strip().splitlines()[-1])
        self.created_dirs.append(target)
        log(f"rendered stack for {image} in {target}")
        return target

    # -- quantum-cli -----------------------------------------------------------
    def _run_cli(
        self, args: Sequence[str], project_dir: Path, stdin_text: str | None = None
    ) -> tuple[int, str]:
        command = [*self.settings.cli, *args]
        log("running: " + " ".join(shlex.quote(part) for part in command))
        env = {**self.environ, "QUANTUM_ENDPOINT": self.settings.endpoint}
        try:
            completed = subprocess.run(  # noqa: S603
                command,
                cwd=project_dir,
                env=env,
                input=stdin_text,
                stdin=None if stdin_text is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=self.settings.cli_timeout_s,
                check=False,
            )
        except FileNotFoundError:
            return 127, f"{command[0]}: command not found"
        except subprocess.TimeoutExpired:
            return 124, f"{command[0]}: no result within {self.settings.cli_timeout_s:.0f}s"
        output = self.redact(completed.stdout or "")
        if output:
            print(output, end="" if output.endswith("\n") else "\n", flush=True)
        return completed.returncode, output

    def create_secrets(self, project_dir: Path) -> bool:
        """Create the stack's external Swarm secrets from the environment's secret values.

        The names are versioned by the render (a digest of the value), so an existing secret
        of that name holds this very value and is left as it is. The value travels on the
        CLI's standard input only: never in its arguments (visible in the process list),
        never in a file, never in the output."""
        stack_file = project_dir / "stack.yml"
        document = yaml.safe_load(stack_file.read_text(encoding="utf-8"))
        declared = document.get("secrets") if isinstance(document, dict) else None
        for key, spec in (declared or {}).items():
            if not isinstance(spec, dict) or not spec.get("external"):
                continue
            name, variable = str(spec.get("name")), str(key).upper()
            value = self.environ.get(variable, "")
            if not value:
                raise DeployConfigError(f"{variable}: the stack needs it but it is not set")
            code, output = self._run_cli(
                ["secrets", "create", "--name", name, "--file", "-"], project_dir, value
            )
            if code == 0:
                log(f"secret {name} ({variable}): created")
            elif SECRET_EXISTS.search(output):
                log(f"secret {name} ({variable}): already there with this value")
            else:
                log(f"creating secret {name} ({variable}) failed with exit code {code}")
                return False
        return True

    def update_stack(self, project_dir: Path) -> bool:
        """`stacks update --create --wait`, falling back to `stack update` on older CLIs."""
        if not self.create_secrets(project_dir):
            return False
        stack = self.settings.stack
        for group in ("stacks", "stack"):
            args = [group, "update", "--create", "--wait", "--stack", stack]
            code, output = self._run_cli(args, project_dir)
            if code == 0:
                return True
            if UNKNOWN_WAIT_FLAG.search(output):
                log("this quantum-cli does not know --wait; retrying without it")
                code, output = self._run_cli([a for a in args if a != "--wait"], project_dir)
                if code == 0:
                    return True
            if group == "stacks" and UNKNOWN_COMMAND.search(output):
                log("this quantum-cli does not know `stacks`; falling back to `stack update`")
                continue
            log(f"quantum-cli {group} update failed with exit code {code}")
            return False
        return False

    # -- verification --------------------------------------------------------
    def wait_for_version(
        self, version: str, timeout_s: float, deploy_id: str | None = None
    ) -> bool:
        """Wait until enough replies in a row report this version and deploy id with Redis up.

        Each reply is one GET /health on a new connection, so that every reply is balanced
        anew over the replicas in rotation. Checking readiness and version with two requests
        would not do: behind a round robin over two replicas, every second request reaches
        the same one, and an old replica still in rotation would never be asked its version.
        The number in a row (DEPLOY_HEALTH_CONFIRMATIONS, default twice the replicas during
        a start-first update) is more than the replicas Traefik can hold, so a pass means no
        task of an earlier release answered any more."""
        base = self.settings.public_url
        deadline = time.monotonic() + timeout_s
        last_state = ""
        in_a_row = 0
        while True:
            health = http_get(f"{base}/health", self.settings.http_timeout_s)
            serving = reported_version(health)
            deployment = reported_deployment(health)
            status = _reported(health, "status")
            state = (
                f"status={health.status or health.error}/{status} version={serving} "
                f"deployment={deployment}"
            )
            if state != last_state:
                log(f"health: {state}")
                last_state = state
            matches = serving == version and (deploy_id is None or deployment == deploy_id)
            in_a_row = in_a_row + 1 if status == "ok" and matches else 0
            if in_a_row >= self.settings.health_confirmations:
                log(f"health: {in_a_row} replies in a row from version {version}")
                return True
            if in_a_row:
                continue  # confirm at once with the next replies
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log(f"health did not report version {version} within {timeout_s:.0f}s")
                return False
            time.sleep(min(self.settings.poll_interval_s, remaining))

    def smoke(self) -> bool:
        url = f"{self.settings.public_url}{self.settings.smoke_path}"
        keyed = http_get(
            url, self.settings.http_timeout_s, {"x-api-key": self.settings.smoke_api_key}
        )
        keyed_ok = smoke_accepted(keyed.status, default_path=self.settings.smoke_path_is_default)
        path = self.settings.smoke_path
        log(f"smoke: GET {path} with the smoke key -> {keyed.status or keyed.error}")
        anonymous = http_get(url, self.settings.http_timeout_s)
        anonymous_ok = anonymous.status == 401
        log(f"smoke: GET {path} without a key -> {anonymous.status or anonymous.error} (want 401)")
        return keyed_ok and anonymous_ok

    # -- flow ----------------------------------------------------------------
    def rollback(self, previous: str | None) -> bool:
        if previous is None:
            log("ROLLBACK NOT POSSIBLE: no previous image was recorded")
            return False
        tag = previous.split("@", 1)[0].rsplit(":", 1)[-1]
        previous_version = tag if SHA40.match(tag) else "unknown"
        if previous == self.settings.image or previous_version == self.settings.expected_version:
            log(
                "ROLLBACK CANNOT HELP: the commit before this deploy is the one just deployed, "
                "and configuration (variables, secrets) is not rolled back; revert it and "
                "deploy again (see docs/runbook.md)"
            )
            return False
        log(f"ROLLING BACK to {previous}")
        rollback_id = f"{self.settings.deploy_id}-rollback" if self.settings.deploy_id else None
        project_dir = self.render(previous, previous_version, rollback_id)
        if not self.update_stack(project_dir):
            log("rollback deploy failed: intervene by hand (see docs/runbook.md)")
            return False
        if previous_version == "unknown":
            log("rollback deployed; its version cannot be verified from the image reference")
            return False
        healthy = self.wait_for_version(
            previous_version, self.settings.rollback_verify_timeout_s, rollback_id
        )
        if not healthy:
            log("rollback deployed but not verified healthy: intervene by hand")
            return False
        if not self.smoke():
            log("rollback deployed but its smoke check fails too: intervene by hand")
            return False
        log("rollback verified: healthy and smoke-tested")
        return True

    def swarm_rolled_back(self, live: LiveRelease) -> bool:
        """Whether /health answers the release from before this deploy again: Swarm rolled the
        update back (failure_action: rollback) or never let a new task serve. Waits up to
        SWARM_ROLLBACK_WAIT_S for a rollback that is still under way."""
        settings = self.settings
        if live.version is None:
            return False
        same_release = live.version == settings.expected_version and (
            live.deployment is None or live.deployment == settings.deploy_id
        )
        if same_release:
            return False  # the old and the new tasks cannot be told apart
        log(
            f"checking whether Swarm already rolled back: waiting up to "
            f"{settings.swarm_rollback_wait_s:.0f}s for version={live.version} "
            f"deployment={live.deployment}"
        )
        return self.wait_for_version(live.version, settings.swarm_rollback_wait_s, live.deployment)

    def run(self) -> int:
        settings = self.settings
        live = record_live_release(settings)
        previous = live.image
        project_dir = settings.render_dir or self.render(settings.image, settings.expected_version)
        stage = "deploy"
        ok = self.update_stack(project_dir)
        if ok:
            stage = "health verification"
            ok = self.wait_for_version(
                settings.expected_version, settings.verify_timeout_s, settings.deploy_id
            )
        if ok:
            stage = "smoke check"
            ok = self.smoke()
        if ok:
            report(f"deployed {settings.image} to stack {settings.stack}: verified", True)
            return 0
        log(f"FAILED at {stage}")
        if stage != "deploy" and self.swarm_rolled_back(live):
            # Deploying the previous image again would start a second rolling update, with a
            # new DEPLOY_ID, of tasks that already run it.
            log(f"SWARM ROLLED BACK: the previous release ({live.version}) serves again")
            smoke_ok = self.smoke()
            outcome = f"Swarm had already rolled back to {live.version}; not deployed again"
            if not smoke_ok:
                outcome += ", but its smoke check fails: intervene by hand"
            report(f"deploy of {settings.image} failed at {stage}; {outcome}", False)
            return 1
        rolled_back = self.rollback(previous)
        outcome = f"rolled back by this deploy to {previous}" if rolled_back else "NOT rolled back"
        report(f"deploy of {settings.image} failed at {stage}; {outcome}", False)
        return 1

    def cleanup(self) -> None:
        if self.settings.keep_rendered:
            return
        for directory in self.created_dirs:
            shutil.rmtree(directory, ignore_errors=True)


def report(message: str, success: bool) -> None:
    print(("SUCCESS: " if success else "FAILURE: ") + message, flush=True)
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as handle:
            handle.write(f"### Deploy {'succeeded' if success else 'failed'}\n\n{message}\n")


def main() -> int:
    try:
        settings = load_settings(os.environ)
    except DeployConfigError as error:
        print(f"deploy: configuration error: {error}", file=sys.stderr)
        return 2
    deployer = Deployer(settings, os.environ)
    try:
        return deployer.run()
    except DeployConfigError as error:
        print(f"deploy: configuration error: {error}", file=sys.stderr)
        return 2
    finally:
        deployer.cleanup()


if __name__ == "__main__":
    sys.exit(main())
