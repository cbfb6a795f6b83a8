"""Plans, quotas and client addresses: the pure parts, and the key check's network and scope
matching through the Flask client (fakeredis runs the same Lua script)."""

from __future__ import annotations

import datetime as dt

import pytest
from flask import Flask

from proxy_app.access.addresses import ClientAddresses, address_hex, network_form
from proxy_app.access.keys import KeyRegistry, Scopes
from proxy_app.access.plans import (
    Limit,
    Quota,
    decode_limits,
    decode_quota,
    encode_limits,
    encode_quota,
)
from proxy_app.access.ratelimit import QuotaState, RateLimitState, quota_periods, rate_limit_headers
from tests.support.app import fake_redis_app
from tests.support.stub_upstream import Reply, StubUpstream


def test_limits_and_quotas_round_trip_through_their_stored_form() -> None:
    limits = (Limit(10, 1), Limit(10_000, 86_400))
    assert encode_limits(limits) == "10:1000;10000:86400000"
    assert decode_limits(encode_limits(limits)) == limits
    assert decode_quota(encode_quota(Quota(5, "month"))) == Quota(5, "month")
    assert decode_quota(encode_quota(None)) is None


@pytest.mark.parametrize(
    ("moment", "day", "to_day_s", "month", "to_month_s"),
    [
        ("2026-11-30T23:59:59+00:00", "2026-11-30", 1, "2026-11", 1),
        ("2026-12-31T12:00:00+00:00", "2026-12-31", 43_200, "2026-12", 43_200),
        ("2028-02-28T00:00:00+00:00", "2028-02-28", 86_400, "2028-02", 2 * 86_400),
    ],
)
def test_quota_periods_are_utc_days_and_months(
    moment: str, day: str, to_day_s: int, month: str, to_month_s: int
) -> None:
    now = dt.datetime.fromisoformat(moment).timestamp()
    assert quota_periods(now) == (day, to_day_s * 1000, month, to_month_s * 1000)


def test_the_headers_name_every_policy_and_the_closest_one() -> None:
    limits = (Limit(10, 1), Limit(1000, 86_400))
    states = (RateLimitState(9, 100), RateLimitState(3, 80_000_000))
    headers = dict(rate_limit_headers("pro", limits, states, None))
    assert headers["ratelimit-policy"] == '"pro-1s";q=10;w=1, "pro-86400s";q=1000;w=86400'
    assert headers["ratelimit"] == '"pro-86400s";r=3;t=80000'
    assert (headers["x-ratelimit-limit"], headers["x-ratelimit-remaining"]) == ("1000", "3")
    quota = QuotaState(Quota(100, "day"), used=99, reset_ms=5000)
    headers = dict(rate_limit_headers("pro", limits, states, quota))
    assert headers["ratelimit"] == '"pro-quota";r=1;t=5'  # the quota is closer still
    assert (headers["x-quota-limit"], headers["x-quota-remaining"], headers["x-quota-reset"]) == (
        "100",
        "1",
        "5",
    )


def test_addresses_compare_in_one_128_bit_space() -> None:
    assert address_hex("127.0.0.1") == "00000000000000000000ffff7f000001"
    assert address_hex("::1") == "0" * 31 + "1"
    assert address_hex("not-an-address") == ""
    assert network_form("10.0.0.0/8") == "00000000000000000000ffff0a000000/104"
    assert network_form("2001:db8::/32") == "20010db8" + "0" * 24 + "/32"


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "client"),
    [
        ((), "203.0.113.5", "10.0.0.1", "203.0.113.5"),  # nobody trusted: the peer
        (("10.0.0.0/8",), "203.0.113.5", "10.0.0.1", "203.0.113.5"),  # peer not trusted
        (("10.0.0.0/8",), "10.0.0.2", "198.51.100.7, 10.0.0.9", "198.51.100.7"),
        (("10.0.0.0/8",), "10.0.0.2", "1.1.1.1, 198.51.100.7, 10.0.0.9", "198.51.100.7"),
        (("10.0.0.0/8",), "10.0.0.2", "", "10.0.0.2"),
        (("10.0.0.0/8",), "10.0.0.2", "10.0.0.3", "10.0.0.3"),  # all trusted: the left-most
        (("::ffff:10.0.0.0/104",), "10.0.0.2", "198.51.100.7", "198.51.100.7"),
    ],
)
def test_the_client_address_behind_trusted_proxies(
    trusted: tuple[str, ...], peer: str, forwarded: str, client: str
) -> None:
    import ipaddress

    networks = tuple(str(ipaddress.ip_network(n)) for n in trusted)
    environ = {"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": forwarded}
    assert ClientAddresses(networks).of(environ) == client


@pytest.fixture
def app(stub: StubUpstream) -> Flask:
    stub.reply("/v4/items/1", Reply(body=b"{}", headers=(("cache-control", "no-store"),)))
    stub.reply("/v4/x", Reply(body=b"{}", headers=(("cache-control", "no-store"),)))
    return fake_redis_app(upstream_base_url=f"{stub.url}/v4")


def status_from(app: Flask, key: str, address: str, path: str = "/api/v1/x") -> int:
    client = app.test_client()
    response = client.get(path, headers={"x-api-key": key}, environ_base={"REMOTE_ADDR": address})
    return response.status_code


@pytest.mark.parametrize(
    ("network", "inside", "outside"),
    [
        ("192.168.16.0/20", "192.168.31.255", "192.168.32.0"),  # a prefix inside a hex digit
        ("192.168.16.0/21", "192.168.23.1", "192.168.24.1"),
        ("203.0.113.7", "203.0.113.7", "203.0.113.8"),
        ("2001:db8:8000::/33", "2001:db8:ffff::1", "2001:db8:7fff::1"),
        ("0.0.0.0/0", "198.51.100.1", "::1"),  # every IPv4 address, no IPv6 one
    ],
)
def test_allowed_networks_match_to_the_bit(
    app: Flask, network: str, inside: str, outside: str
) -> None:
    registry: KeyRegistry = app.extensions["proxy_app.key_registry"]
    with app.app_context():
        _record, key = registry.create(owner="t", allowed_ips=[network])
    assert status_from(app, key, inside) == 200
    assert status_from(app, key, outside) == 403


def test_scopes_match_whole_path_segments(app: Flask) -> None:
    registry: KeyRegistry = app.extensions["proxy_app.key_registry"]
    with app.app_context():
        _record, key = registry.create(owner="t", scopes=Scopes(("GET",), ("/items/",)))
    assert status_from(app, key, "127.0.0.1", "/api/v1/items/1") == 200
    assert status_from(app, key, "127.0.0.1", "/api/v1/x") == 403
