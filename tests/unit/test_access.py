"""The key check and rate limit in front of /api/v1 (Flask client, fakeredis, the stub
upstream)."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from proxy_app.access.keys import KeyRegistry
from proxy_app.redis import RedisUnavailable
from tests.support.app import fake_redis_app
from tests.support.stub_upstream import Reply, StubUpstream


@pytest.fixture
def upstream(stub: StubUpstream) -> StubUpstream:
    stub.reply("/v4/x", Reply(body=b"{}", headers=(("cache-control", "no-store"),)))
    return stub


@pytest.fixture
def app(upstream: StubUpstream) -> Flask:
    return stub_app(upstream)


def stub_app(upstream: StubUpstream, **overrides: Any) -> Flask:
    return fake_redis_app(upstream_base_url=f"{upstream.url}/v4", **overrides)


def registry(app: Flask) -> KeyRegistry:
    found: KeyRegistry = app.extensions["proxy_app.key_registry"]
    return found


def get(app: Flask, key: str | None) -> tuple[int, dict[str, str], dict[str, object]]:
    headers = {"x-api-key": key} if key is not None else {}
    response = app.test_client().get("/api/v1/x", headers=headers)
    headers = {name.lower(): value for name, value in response.headers.items()}
    return response.status_code, headers, response.get_json(silent=True) or {}


@pytest.mark.parametrize(
    ("key", "code"),
    [
        (None, "missing_api_key"),
        ("", "missing_api_key"),
        ("not-a-key", "invalid_api_key"),
        ("pk_unknownkey12_" + "a" * 43, "invalid_api_key"),
    ],
)
def test_missing_or_unknown_keys_get_401_without_calling_upstream(
    app: Flask, upstream: StubUpstream, key: str | None, code: str
) -> None:
    status, _, body = get(app, key)
    assert (status, body["error"]) == (401, code)
    assert len(upstream.received) == 0


def test_a_known_id_with_a_wrong_secret_is_refused(
    app: Flask, upstream: StubUpstream, api_key: str
) -> None:
    forged = api_key[:-4] + ("AAAA" if not api_key.endswith("AAAA") else "BBBB")
    status, _, body = get(app, forged)
    assert (status, body["error"]) == (401, "invalid_api_key")
    assert len(upstream.received) == 0


def test_revoked_key_is_rejected_and_activation_restores_it(
    app: Flask, upstream: StubUpstream, api_key: str
) -> None:
    key_id = api_key.split("_")[1]
    registry(app).revoke(key_id)
    status, _, body = get(app, api_key)
    assert (status, body["error"]) == (401, "revoked_api_key")
    registry(app).activate(key_id)
    assert get(app, api_key)[0] == 200
    registry(app).delete(key_id)
    assert get(app, api_key)[2]["error"] == "invalid_api_key"
    assert len(upstream.received) == 1


def test_expired_key_is_rejected(app: Flask, upstream: StubUpstream, api_key: str) -> None:
    key_id = api_key.split("_")[1]
    fake = registry(app).redis.client
    fake.hset(f"api-keys:key:{key_id}", mapping={"expiresAtMs": "1000"})
    status, _, body = get(app, api_key)
    assert (status, body["error"]) == (401, "expired_api_key")
    assert len(upstream.received) == 0


def test_every_proxied_answer_carries_rate_limit_headers(
    app: Flask, upstream: StubUpstream, api_key: str
) -> None:
    status, headers, _ = get(app, api_key)
    assert status == 200
    assert headers["x-ratelimit-limit"] == "120"
    assert headers["x-ratelimit-remaining"] == "119"
    assert 0 < int(headers["x-ratelimit-reset"]) <= 60
    assert headers["ratelimit-policy"] == '"default";q=120;w=60'
    assert headers["ratelimit"].startswith('"default";r=119;t=')
    upstream.reply("/v4/missing", Reply(status=404))
    response = app.test_client().get("/api/v1/missing", headers={"x-api-key": api_key})
    assert response.status_code == 404
    assert response.headers["x-ratelimit-remaining"] == "118"


def test_over_the_limit_gets_429_with_retry_after(upstream: StubUpstream) -> None:
    app = stub_app(upstream, rate_limit_max_requests=3, rate_limit_window_s=60)
    with app.app_context():
        _, key = registry(app).create(owner="t")
    statuses = [get(app, key)[0] for _ in range(3)]
    status, headers, body = get(app, key)
    assert statuses == [200, 200, 200]
    assert status == 429
    assert body["error"] == "rate_limited"
    assert int(headers["retry-after"]) >= 1
    assert body["retryAfter"] == int(headers["retry-after"])
    assert headers["x-ratelimit-remaining"] == "0"
    assert len(upstream.received) == 3


def test_wrong_secrets_do_not_spend_the_owners_limit(
    upstream: StubUpstream,
) -> None:
    app = stub_app(upstream, rate_limit_max_requests=2)
    with app.app_context():
        _, key = registry(app).create(owner="t")
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    for _ in range(5):
        assert get(app, forged)[0] == 401
    assert [get(app, key)[0] for _ in range(2)] == [200, 200]


def test_redis_unavailable_during_the_key_check_fails_closed(
    app: Flask, upstream: StubUpstream, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(_operation: object) -> object:
        raise RedisUnavailable("keys is unavailable")

    monkeypatch.setattr(app.extensions["proxy_app.redis"].keys, "_guarded", down)
    status, headers, body = get(app, api_key)
    assert (status, body["error"]) == (503, "auth_unavailable")
    assert headers["retry-after"] == "1"
    assert len(upstream.received) == 0
    assert app.test_client().get("/health/live").status_code == 200
