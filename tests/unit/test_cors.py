"""CORS for browser clients of /api/v1, through the Flask test client with fakeredis and the
stub upstream."""

from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.support.app import ADMIN_TOKEN, fake_redis_app
from tests.support.stub_upstream import Reply, StubUpstream

APP_ORIGIN = "https://app.example.com"
OTHER_ORIGIN = "https://other.example.com"
PREFLIGHT = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST"}


def cors_app(stub: StubUpstream, **overrides: object) -> Flask:
    settings: dict[str, object] = {
        "upstream_base_url": f"{stub.url}/v4",
        "cors_allowed_origins": (APP_ORIGIN, OTHER_ORIGIN),
        "proxy_forward_request_headers": ("x-tenant",),
    }
    settings.update(overrides)
    return fake_redis_app(**settings)


def vary_names(values: list[str]) -> set[str]:
    return {token.strip() for value in values for token in value.split(",")}


def keyed(app: Flask) -> FlaskClient:
    with app.app_context():
        _, key = app.extensions["proxy_app.key_registry"].create(owner="t")
    client = app.test_client()
    client.environ_base["HTTP_X_API_KEY"] = key
    return client


def test_a_preflight_is_answered_without_a_key_and_without_the_upstream(
    stub: StubUpstream,
) -> None:
    client = cors_app(stub).test_client()
    response = client.options(
        "/api/v1/orders/1", headers={**PREFLIGHT, "Access-Control-Request-Headers": "x-api-key"}
    )
    assert response.status_code == 204
    assert response.data == b""
    assert response.headers["access-control-allow-origin"] == APP_ORIGIN
    assert response.headers["access-control-allow-methods"] == (
        "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    )
    allowed = response.headers["access-control-allow-headers"].split(", ")
    assert allowed[:2] == ["x-api-key", "content-type"]
    assert {"x-tenant", "accept", "if-none-match", "traceparent"} <= set(allowed)
    assert response.headers["access-control-max-age"] == "600"
    assert "Origin" in vary_names(response.headers.getlist("vary"))
    assert "x-ratelimit-limit" not in response.headers
    assert not stub.received


def test_preflights_are_not_rate_limited(stub: StubUpstream) -> None:
    client = cors_app(stub, rate_limit_max_requests=1).test_client()
    statuses = {client.options("/api/v1/x", headers=PREFLIGHT).status_code for _ in range(5)}
    assert statuses == {204}


def test_a_preflight_from_another_origin_is_refused_without_cors_headers(
    stub: StubUpstream,
) -> None:
    client = cors_app(stub).test_client()
    response = client.options(
        "/api/v1/orders",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert response.status_code == 403
    assert response.json is not None
    assert response.json["error"] == "origin_not_allowed"
    assert not any(
        name.lower().startswith("access-control-") for name, _ in response.headers.items()
    )
    assert not stub.received


def test_a_plain_options_is_still_proxied_and_needs_a_key(stub: StubUpstream) -> None:
    app = cors_app(stub)
    stub.reply("/v4/orders", Reply(status=204, headers=(("Allow", "GET, POST"),)))
    anonymous = app.test_client().options("/api/v1/orders", headers={"Origin": APP_ORIGIN})
    assert anonymous.status_code == 401
    assert anonymous.headers["access-control-allow-origin"] == APP_ORIGIN
    response = keyed(app).options("/api/v1/orders", headers={"Origin": APP_ORIGIN})
    assert response.status_code == 204
    assert response.headers["allow"] == "GET, POST"
    assert stub.last().method == "OPTIONS"


@pytest.mark.parametrize(
    ("status", "configure"),
    [
        (401, "no key"),
        (429, "over the limit"),
        (502, "upstream down"),
        (400, "refused path"),
    ],
)
def test_errors_for_an_allowed_origin_carry_the_cors_headers(
    stub: StubUpstream, status: int, configure: str
) -> None:
    overrides: dict[str, object] = {"rate_limit_max_requests": 1}
    if configure == "upstream down":
        overrides["upstream_base_url"] = "http://127.0.0.1:9/v4"
        overrides["upstream_timeout_ms"] = 500
    app = cors_app(stub, **overrides)
    client = app.test_client() if configure == "no key" else keyed(app)
    path = "/api/v1/%2e%2e/etc" if configure == "refused path" else "/api/v1/things"
    if configure == "over the limit":
        client.get(path, headers={"Origin": APP_ORIGIN})
    response = client.get(path, headers={"Origin": APP_ORIGIN})
    assert response.status_code == status
    assert response.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "Origin" in vary_names(response.headers.getlist("vary"))
    exposed = response.headers["access-control-expose-headers"].split(", ")
    for name in ("x-ratelimit-remaining", "x-cache", "x-request-id", "retry-after", "age"):
        assert name in exposed


def test_a_cached_answer_carries_the_asking_origins_header_only(stub: StubUpstream) -> None:
    client = keyed(cors_app(stub))
    stub.reply(
        "/v4/catalog",
        Reply(
            headers=(
                ("Cache-Control", "max-age=60"),
                ("Access-Control-Allow-Origin", "https://upstream-choice.example"),
                ("Vary", "Accept"),
            )
        ),
    )
    first = client.get("/api/v1/catalog", headers={"Origin": APP_ORIGIN})
    second = client.get("/api/v1/catalog", headers={"Origin": OTHER_ORIGIN})
    third = client.get("/api/v1/catalog", headers={"Origin": "https://evil.example"})
    fourth = client.get("/api/v1/catalog")
    assert [r.headers["x-cache"] for r in (first, second, third, fourth)] == [
        "MISS",
        "HIT",
        "HIT",
        "HIT",
    ]
    assert first.headers.getlist("access-control-allow-origin") == [APP_ORIGIN]
    assert second.headers.getlist("access-control-allow-origin") == [OTHER_ORIGIN]
    assert "access-control-allow-origin" not in third.headers
    assert "access-control-allow-origin" not in fourth.headers
    for response in (first, second, third, fourth):
        assert vary_names(response.headers.getlist("vary")) == {"Accept", "Origin"}


def test_a_star_allows_every_origin_with_a_star(stub: StubUpstream) -> None:
    client = cors_app(stub, cors_allowed_origins=("*",)).test_client()
    response = client.options("/api/v1/x", headers={**PREFLIGHT, "Origin": "https://any.example"})
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"


def test_health_and_admin_routes_get_no_cors_headers(stub: StubUpstream) -> None:
    client = cors_app(stub).test_client()
    health = client.get("/health/live", headers={"Origin": APP_ORIGIN})
    admin = client.get(
        "/internal/api-keys",
        headers={"Origin": APP_ORIGIN, "Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    for response in (health, admin):
        assert response.status_code == 200
        assert not any(
            name.lower().startswith("access-control-") for name, _ in response.headers.items()
        )
    preflight = client.options("/internal/api-keys", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in preflight.headers


def test_without_configured_origins_there_is_no_cors(stub: StubUpstream) -> None:
    app = fake_redis_app(upstream_base_url=f"{stub.url}/v4")
    stub.reply("/v4/x", Reply(status=204))
    preflight = app.test_client().options("/api/v1/x", headers=PREFLIGHT)
    assert preflight.status_code == 401  # proxied as before: it needs a key
    assert "access-control-allow-origin" not in preflight.headers
    response = keyed(app).get("/api/v1/x", headers={"Origin": APP_ORIGIN})
    assert "access-control-allow-origin" not in response.headers


def test_an_allowed_origin_may_read_the_upstreams_own_headers(stub: StubUpstream) -> None:
    """A single-page app paging through the API reads X-Total-Count and Link; the gateway's
    own headers stay first, safelisted ones are not repeated."""
    client = keyed(cors_app(stub))
    stub.reply(
        "/v4/orders",
        Reply(
            headers=(
                ("Content-Type", "application/json"),
                ("X-Total-Count", "120"),
                ("Link", '</orders?page=2>; rel="next"'),
            )
        ),
    )
    response = client.get("/api/v1/orders", headers={"Origin": APP_ORIGIN})
    exposed = response.headers["access-control-expose-headers"].split(", ")
    assert exposed[:3] == ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"]
    assert {"x-total-count", "link"} <= set(exposed)
    assert "content-type" not in exposed
    assert len(exposed) == len(set(exposed))
