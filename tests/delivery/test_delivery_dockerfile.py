"""The Dockerfile's runtime stage holds only the app, runs non-root and is health-checked."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and stages, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert match is not None, line
            stages.append(Stage(base=match.group(1), name=match.group(2)))
        elif not stages:
            if keyword == "ARG":
                name, _, default = args.partition("=")
                global_args[name.strip()] = default.strip()
        else:
            stages[-1].instructions.append((keyword, args.strip()))
    return global_args, stages


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], list[Stage]]:
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def runtime(parsed: tuple[dict[str, str], list[Stage]]) -> Stage:
    return parsed[1][-1]


def test_multi_stage_build_on_one_digest_pinned_base(
    parsed: tuple[dict[str, str], list[Stage]],
) -> None:
    global_args, stages = parsed
    assert len(stages) >= 2
    assert {stage.base for stage in stages} == {"${BASE_IMAGE}"}
    base = global_args["BASE_IMAGE"]
    assert re.fullmatch(r"python:3\.11[.\w-]*-slim-bookworm@sha256:[0-9a-f]{64}", base)
    assert "# syntax=" not in DOCKERFILE.read_text()


def test_runtime_stage_runs_as_fixed_non_root_user(runtime: Stage) -> None:
    users = runtime.all("USER")
    assert users, "runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user.isdigit()
    assert int(user) != 0


def test_runtime_stage_has_a_healthcheck_on_health_live(runtime: Stage) -> None:
    checks = runtime.all("HEALTHCHECK")
    assert len(checks) == 1
    assert "/health/live" in checks[0]
    assert "curl" not in checks[0]
    assert "wget" not in checks[0]


def test_runtime_stage_starts_the_production_server(runtime: Stage) -> None:
    commands = runtime.all("CMD")
    assert commands
    assert json.loads(commands[-1]) == ["python", "-m", "proxy_app"]
    assert runtime.all("STOPSIGNAL") == ["SIGTERM"]


def test_runtime_stage_copies_only_the_virtualenv_and_the_app(runtime: Stage) -> None:
    copies = runtime.all("COPY") + runtime.all("ADD")
    assert runtime.all("ADD") == []
    sources: list[str] = []
    for copy in copies:
        parts = [part for part in copy.split() if not part.startswith("--")]
        sources.extend(parts[:-1])
    assert sorted(sources) == sorted(["/opt/venv", "proxy_app/"])
    text = " ".join(args for _, args in runtime.instructions)
    for forbidden in ("requirements-dev", "tests", "pip install", ".git"):
        assert forbidden not in text


def test_git_sha_build_arg_becomes_the_reported_version(runtime: Stage) -> None:
    assert any(arg.startswith("GIT_SHA") for arg in runtime.all("ARG"))
    assert any("GIT_SHA=${GIT_SHA}" in env for env in runtime.all("ENV"))
    labels = " ".join(runtime.all("LABEL"))
    for label in ("source", "revision", "version"):
        assert f"org.opencontainers.image.{label}=" in labels


def test_dependency_layer_comes_before_application_code(
    parsed: tuple[dict[str, str], list[Stage]],
) -> None:
    builder = parsed[1][0]
    copies = builder.all("COPY")
    assert copies == ["requirements.txt /tmp/requirements.txt"]
    runtime_keywords = [kw for kw, _ in parsed[1][-1].instructions]
    first_app_copy = next(
        i for i, (kw, args) in enumerate(parsed[1][-1].instructions) if "proxy_app/" in args
    )
    assert runtime_keywords.index("COPY") < first_app_copy
    git_sha_arg = next(
        i
        for i, (kw, args) in enumerate(parsed[1][-1].instructions)
        if kw == "ARG" and args.startswith("GIT_SHA")
    )
    assert git_sha_arg > first_app_copy


def test_build_context_is_default_deny() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"requirements.txt", "proxy_app/"}
    assert "**/.env" in lines
