"""docker-compose.yml and .env.example: a working local stack with every setting documented."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    document = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def test_app_waits_for_a_healthy_redis() -> None:
    services = compose()["services"]
    assert services["app"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["redis"]["healthcheck"]["test"]
    assert "/health/live" in " ".join(services["app"]["healthcheck"]["test"])


def test_app_talks_to_the_compose_redis_and_is_published_on_loopback_only() -> None:
    app = compose()["services"]["app"]
    assert app["environment"]["CACHE_REDIS_URL"].startswith("redis://redis:")
    assert all(port.startswith("127.0.0.1:") for port in app["ports"])
    assert app["read_only"] is True
    assert "ports" not in compose()["services"]["redis"]


def test_local_redis_persists_and_evicts_only_keys_with_a_ttl() -> None:
    command = compose()["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1].startswith("volatile-")


def test_env_example_documents_every_setting_the_app_receives() -> None:
    documented = set(
        re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (REPO_ROOT / ".env.example").read_text(), re.M)
    )
    passed = set(compose()["services"]["app"]["environment"])
    assert passed - documented == set()


def test_env_example_holds_no_real_secrets() -> None:
    values = dict(
        re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", (REPO_ROOT / ".env.example").read_text(), re.M)
    )
    assert values["HTTP_CLIENT_API_KEY"] == ""
    assert values["ADMIN_API_TOKEN"] == "change-me"
