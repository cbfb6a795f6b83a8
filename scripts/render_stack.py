#!/usr/bin/env python3
"""Render the deployable Quantum stack from deploy/ templates and the environment.

Reads every setting from the environment, refuses unset required names (all
problems reported together, exit 2), pins the app image to the immutable
reference it is given, and writes `stack.yml` plus the `.quantum` project file to
a private temporary directory whose path is the only thing printed on stdout.
The app's environment is then judged by the app's own settings schema, so that a
stack that renders is one the app starts with. Secret values are never written or
printed: the stack names an external Swarm secret per value (versioned by a digest
of it), which scripts/deploy_quantum.py creates.

    APP_IMAGE=ghcr.io/acme/proxy_app:<40-hex git sha> APP_HOST=api.example.com \\
    QUANTUM_STACK=proxy-app HTTP_CLIENT_BASE_URL=https://upstream.example.com \\
    ADMIN_API_TOKEN=... python scripts/render_stack.py
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
# The app's own settings schema judges the app's environment: one source of truth, so a
# rendered stack never starts tasks that refuse their settings and crash-loop.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from proxy_app.settings import SettingsError, load_settings  # noqa: E402

DEFAULT_TEMPLATE = REPO_ROOT / "deploy" / "stack.template.yml"
DEFAULT_PROJECT_FILE = REPO_ROOT / "deploy" / ".quantum"
STACK_FILE_NAME = "stack.yml"
PROJECT_FILE_NAME = ".quantum"

PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
SHA40 = re.compile(r"^[0-9a-f]{40}$")
# registry/path[:tag][@sha256:digest]; lower-case path as OCI requires.
IMAGE_REF = re.compile(
    r"^(?P<repository>[a-z0-9.-]+(?::[0-9]+)?(?:/[a-z0-9._-]+)+)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$"
)
STACK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
CPUS = re.compile(r"^[0-9]+(\.[0-9]+)?$")
MEMORY = re.compile(r"^[0-9]+[KMG]$")
REDIS_MEMORY = re.compile(r"^[0-9]+(kb|mb|gb)$")
PLACEMENT = re.compile(r"^node\.(labels\.[A-Za-z0-9_.-]+|hostname|id) ?== ?[A-Za-z0-9_.-]+$")
DEFAULT_REDIS_IMAGE = (
    "redis:7.4.5-alpine@sha256:bb186d083732f669da90be8b0f975a37812b15e913465bb14d845db72a4e3e08"
)


class RenderError(Exception):
    """One or more settings are missing or invalid; each line names one variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


Validator = Callable[[str], str | None]


@dataclass(frozen=True)
class Variable:
    """One environment variable the template may use."""

    name: str
    required: bool = False
    default: str | None = None
    secret: bool = False
    integer: bool = False
    validate: Validator | None = None
    help: str = ""
    # Computed by the render (a secret's versioned Swarm secret name), never read from the
    # environment.
    derived: bool = False


def _image(value: str) -> str | None:
    match = IMAGE_REF.match(value)
    if match is None:
        return "is not an image reference of the form registry/owner/repo:<tag> or @sha256:<digest>"
    tag, digest = match.group("tag"), match.group("digest")
    if digest is None and (tag is None or SHA40.match(tag) is None):
        return (
            f"uses the mutable tag {tag or 'latest'!r}: pin the image by @sha256:<digest> "
            "or by the full 40-character git SHA tag"
        )
    return None


def _host(value: str) -> str | None:
    return None if HOSTNAME.match(value) else "is not a lower-case DNS host name"


def _stack(value: str) -> str | None:
    return None if STACK_NAME.match(value) else "must match [a-z0-9][a-z0-9_-]{0,62}"


def _pattern(regex: re.Pattern[str], expected: str) -> Validator:
    def check(value: str) -> str | None:
        return None if regex.match(value) else f"must be {expected}"

    return check


def _int_range(low: int, high: int | None = None) -> Validator:
    def check(value: str) -> str | None:
        if not re.fullmatch(r"[0-9]+", value):
            return "must be a whole number"
        number = int(value)
        if number < low or (high is not None and number > high):
            upper = f" and at most {high}" if high is not None else ""
            return f"must be at least {low}{upper}"
        return None

    return check


def _choice(*choices: str) -> Validator:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _eviction(value: str) -> str | None:
    allowed = ("volatile-lru", "volatile-lfu", "volatile-ttl", "volatile-random")
    if value in allowed:
        return None
    return (
        f"must be one of {', '.join(allowed)}: only keys with a TTL may be evicted, "
        "never the API-key records"
    )


def _no_backtick(value: str) -> str | None:
    return "must not contain backticks or newlines" if re.search(r"[`\n\r]", value) else None


VARIABLES: tuple[Variable, ...] = (
    Variable("APP_IMAGE", required=True, validate=_image, help="immutable app image"),
    Variable("APP_HOST", required=True, validate=_host, help="public host name (Traefik rule)"),
    Variable("QUANTUM_STACK", required=True, validate=_stack, help="stack and router name"),
    Variable("HTTP_CLIENT_BASE_URL", required=True, help="upstream origin"),
    Variable("ADMIN_API_TOKEN", required=True, secret=True, help="admin bearer token"),
    Variable("HTTP_CLIENT_API_KEY", secret=True, help="upstream api_key header"),
    Variable("ADMIN_API_TOKEN_SECRET", derived=True, help="Swarm secret holding it"),
    Variable("HTTP_CLIENT_API_KEY_SECRET", derived=True, help="Swarm secret holding it"),
    Variable("APP_VERSION", help="git SHA shown as image revision label"),
    Variable("DEPLOY_ENVIRONMENT", default="production", validate=_choice("production", "staging")),
    Variable("APP_REPLICAS", default="2", integer=True, validate=_int_range(2, 20)),
    Variable("APP_CPU_LIMIT", default="1.0", validate=_pattern(CPUS, "a CPU count like 1.0")),
    Variable("APP_CPU_RESERVATION", default="0.25", validate=_pattern(CPUS, "a CPU count")),
    Variable("APP_MEMORY_LIMIT", default="512M", validate=_pattern(MEMORY, "like 512M")),
    Variable("APP_MEMORY_RESERVATION", default="256M", validate=_pattern(MEMORY, "like 256M")),
    Variable("REDIS_IMAGE", default=DEFAULT_REDIS_IMAGE, validate=_no_backtick),
    Variable("REDIS_CPU_LIMIT", default="0.5", validate=_pattern(CPUS, "a CPU count")),
    Variable("REDIS_CPU_RESERVATION", default="0.1", validate=_pattern(CPUS, "a CPU count")),
    Variable("REDIS_MEMORY_LIMIT", default="384M", validate=_pattern(MEMORY, "like 384M")),
    Variable("REDIS_MEMORY_RESERVATION", default="128M", validate=_pattern(MEMORY, "like 128M")),
    Variable("REDIS_MAXMEMORY", default="256mb", validate=_pattern(REDIS_MEMORY, "like 256mb")),
    Variable("REDIS_EVICTION_POLICY", default="volatile-lru", validate=_eviction),
    # "single": one Redis (the template's); "sentinel": a master, a replica and three
    # sentinels, the app pointed at the sentinels (see sentinel_redis).
    Variable("REDIS_MODE", default="single", validate=_choice("single", "sentinel")),
    Variable(
        "REDIS_REPLICA_PLACEMENT_CONSTRAINT",
        validate=_pattern(PLACEMENT, "a node pin such as node.labels.redis-replica == true"),
        help="with REDIS_MODE=sentinel: pins the replica to the node that holds its volume",
    ),
    Variable("REDIS_SENTINEL_DOWN_AFTER_MS", default="5000", validate=_int_range(1000, 60000)),
    # Redis' volume is local to one node: Redis must stay on that node, or it starts empty
    # elsewhere and every API key is gone. No default that pins nothing.
    Variable(
        "REDIS_PLACEMENT_CONSTRAINT",
        required=True,
        validate=_pattern(
            PLACEMENT, "a node pin such as node.labels.redis == true or node.hostname == n1"
        ),
        help="pins Redis to the node that holds its volume",
    ),
    Variable("DEPLOY_ID", help="reported by /health as deployment"),
    Variable("TRAEFIK_NETWORK", default="public", validate=_stack),
    Variable("TRAEFIK_CERT_RESOLVER", default="le", validate=_stack),
    Variable("TRAEFIK_HTTP_ENTRYPOINT", default="http", validate=_stack),
    Variable("TRAEFIK_HTTPS_ENTRYPOINT", default="https", validate=_stack),
    # The app's settings below: passed through as given and judged by the app's schema
    # (see app_environment_problems), never by rules of the render's own.
    Variable("LOG_LEVEL", default="info"),
    Variable("WEB_CONCURRENCY", default="2"),
    Variable("HTTP_CLIENT_TIMEOUT", default="10000"),
    Variable("HTTP_CLIENT_RETRIES", default="2"),
    Variable("UPSTREAM_MAX_CONCURRENCY", default=""),
    Variable("UPSTREAM_QUEUE_TIMEOUT_MS", default="100"),
    Variable("UPSTREAM_RATE_LIMIT", default=""),
    Variable("UPSTREAM_RETRY_AFTER_MAX_SECONDS", default="0"),
    Variable("UPSTREAM_BREAKER_FAILURES", default="0"),
    Variable("UPSTREAM_BREAKER_COOLDOWN_SECONDS", default="30"),
    Variable("PROXY_BODY_LIMIT", default="1048576"),
    Variable("PROXY_BODY_TYPES", default="application/json,application/*+json"),
    Variable("PROXY_FORWARD_REQUEST_HEADERS", default=""),
    Variable("PROXY_HIDE_RESPONSE_HEADERS", default=""),
    Variable("CORS_ALLOWED_ORIGINS", default=""),
    Variable("CACHE_TTL_DEFAULT", default="300"),
    Variable("CACHE_STALE_TTL", default="60"),
    Variable("CACHE_IGNORE_UPSTREAM_CONTROL", default="false"),
    Variable("CACHE_CONTROL_FIELD", default="Gateway-Cache-Control"),
    Variable("CACHE_CDN_CONTROL", default="true"),
    Variable("CACHE_BYPASS_PATHS", default=""),
    Variable("CACHE_DEBUG", default="false"),
    Variable("API_KEYS_REDIS_PREFIX", default="api-keys"),
    Variable("API_KEYS_RATE_LIMIT_WINDOW_SECONDS", default="60"),
    Variable("API_KEYS_RATE_LIMIT_MAX_REQUESTS", default="120"),
    Variable("API_KEYS_OUTAGE_GRACE_SECONDS", default="0"),
    Variable("API_KEYS_OUTAGE_SHARE", default="1"),
    Variable("TRUSTED_PROXIES", default=""),
)
VARIABLES_BY_NAME = {variable.name: variable for variable in VARIABLES}

# A placeholder for an optional variable that is unset removes its mapping entry.
_DROP = object()


def resolve(environ: Mapping[str, str]) -> dict[str, str | None]:
    """Return every variable's value (None: optional and unset) or raise RenderError."""
    values: dict[str, str | None] = {}
    problems: list[str] = []
    for variable in VARIABLES:
        if variable.derived:
            values[variable.name] = None
            continue
        raw = environ.get(variable.name, "")
        value: str | None = raw if raw != "" else variable.default
        if value is None or (variable.required and value == ""):
            if variable.required:
                what = f" ({variable.help})" if variable.help else ""
                problems.append(f"{variable.name}: required but not set{what}")
            values[variable.name] = None
            continue
        if variable.validate is not None:
            problem = variable.validate(value)
            if problem is not None:
                shown = "<hidden>" if variable.secret else repr(value)
                problems.append(f"{variable.name}: {shown} {problem}")
        values[variable.name] = value
    image = values.get("APP_IMAGE")
    if values.get("APP_VERSION") is None and image is not None:
        match = IMAGE_REF.match(image)
        tag = match.group("tag") if match else None
        values["APP_VERSION"] = tag if tag and SHA40.match(tag) else "unknown"
    if values.get("REDIS_MODE") == "sentinel" and not values.get(
        "REDIS_REPLICA_PLACEMENT_CONSTRAINT"
    ):
        problems.append(
            "REDIS_REPLICA_PLACEMENT_CONSTRAINT: required with REDIS_MODE=sentinel (pins the "
            "replica to the node that holds its volume; another node than the master's)"
        )
    if problems:
        raise RenderError(problems)
    stack = values["QUANTUM_STACK"]
    assert stack is not None  # required, so set once there are no problems
    for variable in VARIABLES:
        value = values[variable.name]
        if variable.secret and value:
            values[f"{variable.name}_SECRET"] = secret_name(stack, variable.name, value)
    return values


def secret_file_key(name: str) -> str:
    """The stack's key (and file name under /run/secrets) for a secret variable."""
    return name.lower()


def secret_name(stack: str, name: str, value: str) -> str:
    """The versioned Swarm secret name for one value: `<stack>_<key>_<12 hex digits>`.

    Swarm secrets cannot change, so the value's digest is the version: a rotated value gets a
    new name, and the changed reference rolls the tasks over; an unchanged one keeps its name,
    so a redeploy neither creates a secret nor restarts a task. The name is visible to whoever
    may list secrets: scrypt, salted with stack and name, makes guessing a weak value from it
    costly (and the runbook asks for random values anyway). At most 64 characters, as Swarm
    requires."""
    digest = hashlib.scrypt(
        value.encode("utf-8"),
        salt=f"proxy-app/{stack}/{name}".encode(),
        n=2**14,
        r=8,
        p=1,
        dklen=16,
    ).hex()
    return f"{stack[:30]}_{secret_file_key(name)}_{digest[:12]}"


def _drop_unset_secrets(document: dict[object, object], values: Mapping[str, str | None]) -> None:
    """An optional secret left unset disappears from the stack: its file variable, the
    service's reference and the external secret."""
    services = document.get("services")
    declared = document.get("secrets")
    for variable in VARIABLES:
        if not variable.secret or values.get(variable.name):
            continue
        key = secret_file_key(variable.name)
        if isinstance(declared, dict):
            declared.pop(key, None)
        for service in services.values() if isinstance(services, dict) else ():
            if not isinstance(service, dict):
                continue
            environment = service.get("environment")
            if isinstance(environment, dict):
                environment.pop(f"{variable.name}_FILE", None)
            references = service.get("secrets")
            if isinstance(references, list):
                service["secrets"] = [
                    ref
                    for ref in references
                    if not (isinstance(ref, dict) and ref.get("source") == key)
                ]


def _escape(value: str) -> str:
    """Keep values literal: the stack file is interpolated again at deploy time."""
    return value.replace("$", "$$")


def _substitute(text: str, values: Mapping[str, str | None]) -> object:
    whole = PLACEHOLDER.fullmatch(text)
    if whole is not None:
        name = whole.group(1)
        if name not in VARIABLES_BY_NAME:
            raise RenderError([f"{name}: used by the template but not declared"])
        value = values[name]
        if value is None:
            return _DROP
        if VARIABLES_BY_NAME[name].integer:
            return int(value)
        return _escape(value)

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in VARIABLES_BY_NAME:
            raise RenderError([f"{name}: used by the template but not declared"])
        value = values[name]
        if value is None:
            raise RenderError([f"{name}: required by the template but not set"])
        return _escape(value)

    return PLACEHOLDER.sub(replace, text)


def _render_node(node: object, values: Mapping[str, str | None]) -> object:
    if isinstance(node, dict):
        rendered: dict[object, object] = {}
        for key, child in node.items():
            new_key = _substitute(key, values) if isinstance(key, str) else key
            new_child = _render_node(child, values)
            if new_key is _DROP or new_child is _DROP:
                continue
            rendered[new_key] = new_child
        return rendered
    if isinstance(node, list):
        return [item for item in (_render_node(c, values) for c in node) if item is not _DROP]
    if isinstance(node, str):
        return _substitute(node, values)
    return node


def render(template_text: str, values: Mapping[str, str | None]) -> dict[str, object]:
    """Render the template YAML into the stack document (no placeholders left)."""
    document = yaml.safe_load(template_text)
    if not isinstance(document, dict):
        raise RenderError(["template: not a YAML mapping"])
    rendered = _render_node(document, values)
    assert isinstance(rendered, dict)
    _drop_unset_secrets(rendered, values)
    if values.get("REDIS_MODE") == "sentinel":
        sentinel_redis(rendered, values)
    leftover = PLACEHOLDER.findall(yaml.safe_dump(rendered).replace("$${", ""))
    if leftover:
        raise RenderError([f"{name}: placeholder left unrendered" for name in sorted(leftover)])
    return rendered


SENTINEL_MASTER = "gateway"
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
SENTINEL_PORT = 26379


def sentinel_redis(document: dict[object, object], values: Mapping[str, str | None]) -> None:
    """REDIS_MODE=sentinel: the template's one ``redis`` becomes ``redis-1`` (the first
    master) and ``redis-2`` (its replica), each with the same settings, persistence and
    limits and a volume of its own on its own node, plus three sentinels (quorum 2) that
    promote the replica when the master is down for REDIS_SENTINEL_DOWN_AFTER_MS. Every
    Redis and sentinel announces its service name, so addresses survive task restarts. The
    app finds the master through the sentinels (``redis+sentinel://``) and follows a
    failover without a restart. Built from the template's ``redis`` so that both modes share
    one definition of a Redis."""
    services = document["services"]
    volumes = document.setdefault("volumes", {})
    assert isinstance(services, dict)
    assert isinstance(volumes, dict)
    base = services.pop("redis")
    volumes.pop("redis-data", None)
    for number, name in ((1, "redis-1"), (2, "redis-2")):
        service = copy.deepcopy(base)
        command = [*service["command"], "--replica-announce-ip", name]
        if number == 2:
            command += ["--replicaof", "redis-1", "6379"]
            constraint = values["REDIS_REPLICA_PLACEMENT_CONSTRAINT"]
            service["deploy"]["placement"]["constraints"] = [constraint]
        service["command"] = command
        service["volumes"] = [f"{name}-data:/data"]
        services[name] = service
        volumes[f"{name}-data"] = None
    down_after = values["REDIS_SENTINEL_DOWN_AFTER_MS"]
    for name in SENTINELS:
        config = [
            f"port {SENTINEL_PORT}",
            "sentinel resolve-hostnames yes",
            "sentinel announce-hostnames yes",
            f"sentinel announce-ip {name}",
            f"sentinel monitor {SENTINEL_MASTER} redis-1 6379 2",
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} {down_after}",
            f"sentinel failover-timeout {SENTINEL_MASTER} 60000",
        ]
        # A sentinel rewrites its file as it learns (the current master, the other
        # sentinels): written once, kept on its volume across restarts.
        script = (
            "test -f /data/sentinel.conf || printf '%s\\n' "
            + " ".join(f"'{line}'" for line in config)
            + " > /data/sentinel.conf; exec redis-server /data/sentinel.conf --sentinel"
        )
        services[name] = {
            "image": base["image"],
            "command": ["sh", "-c", script],
            "networks": ["internal"],
            "volumes": [f"{name}-data:/data"],
            "healthcheck": {
                "test": ["CMD", "redis-cli", "-p", str(SENTINEL_PORT), "ping"],
                "interval": "2s",
                "timeout": "3s",
                "retries": 5,
                "start_period": "10s",
            },
            "deploy": {
                "mode": "replicated",
                "replicas": 1,
                # One sentinel per node where there are three: a node lost takes one vote.
                "placement": {"preferences": [{"spread": "node.id"}]},
                "resources": {
                    "limits": {"cpus": "0.1", "memory": "32M"},
                    "reservations": {"cpus": "0.01", "memory": "16M"},
                },
                "restart_policy": {"condition": "any", "delay": "1s", "window": "60s"},
            },
        }
        volumes[f"{name}-data"] = None
    url = "redis+sentinel://{}/{}/0".format(
        ",".join(f"{name}:{SENTINEL_PORT}" for name in SENTINELS), SENTINEL_MASTER
    )
    environment = services["app"]["environment"]
    environment["CACHE_REDIS_URL"] = url
    environment["API_KEYS_REDIS_URL"] = url


def app_environment(
    rendered: Mapping[str, object], values: Mapping[str, str | None]
) -> dict[str, str]:
    """The environment the app's tasks get from the rendered stack, as the app reads it: with
    each secret's value where the task reads it from its Swarm secret file."""
    services = rendered.get("services")
    app = services.get("app") if isinstance(services, dict) else None
    environment = app.get("environment") if isinstance(app, dict) else None
    if not isinstance(environment, dict):
        raise RenderError(["template: services.app.environment is not a mapping"])
    # Swarm turns the escaped `$$` back into `$` when it interpolates the stack file.
    resolved = {str(name): str(value).replace("$$", "$") for name, value in environment.items()}
    for variable in VARIABLES:
        value = values.get(variable.name)
        if variable.secret and value and resolved.pop(f"{variable.name}_FILE", None):
            resolved[variable.name] = value
    return resolved


def check_app_settings(rendered: Mapping[str, object], values: Mapping[str, str | None]) -> None:
    """Raise RenderError with the app's own complaints when its tasks would refuse to start."""
    try:
        load_settings(app_environment(rendered, values))
    except SettingsError as error:
        raise RenderError([f"app setting {problem}" for problem in error.problems]) from None


def write_project(
    rendered: Mapping[str, object], project_file: Path, output_dir: Path | None
) -> Path:
    """Write stack.yml and .quantum into a private directory and return it."""
    if output_dir is None:
        target = Path(tempfile.mkdtemp(prefix="proxy-app-stack-"))
    else:
        target = output_dir
        target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o700)
    stack_path = target / STACK_FILE_NAME
    descriptor = os.open(stack_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(
            "# Rendered by scripts/render_stack.py. Secrets appear only as the names of Swarm\n"
            "# secrets; still, do not commit or share it.\n"
        )
        yaml.safe_dump(
            dict(rendered), handle, sort_keys=False, default_flow_style=False, width=4096
        )
    stack_path.chmod(0o600)
    shutil.copyfile(project_file, target / PROJECT_FILE_NAME)
    return target


def summary(values: Mapping[str, str | None]) -> str:
    """Human summary for stderr; secrets appear only as set / not set."""
    lines = []
    for variable in VARIABLES:
        value = values.get(variable.name)
        if variable.secret:
            shown = "set (hidden)" if value else "not set"
        else:
            shown = "" if value is None else value
        lines.append(f"  {variable.name}={shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--template", type=Path, default=DEFAULT_TEMPLATE)
    parser.add_argument("--project-file", type=Path, default=DEFAULT_PROJECT_FILE)
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="default: a new private temporary directory"
    )
    parser.add_argument("--quiet", action="store_true", help="do not print the settings summary")
    args = parser.parse_args(argv)
    try:
        values = resolve(os.environ)
        rendered = render(args.template.read_text(encoding="utf-8"), values)
        check_app_settings(rendered, values)
    except RenderError as error:
        print("render_stack: cannot render the stack:", file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    target = write_project(rendered, args.project_file, args.output_dir)
    if not args.quiet:
        print(f"render_stack: rendered {target / STACK_FILE_NAME} with:", file=sys.stderr)
        print(summary(values), file=sys.stderr)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
