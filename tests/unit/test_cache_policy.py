from __future__ import annotations

from collections.abc import Sequence
from email.utils import formatdate

import pytest

from proxy_app.cache import policy
from proxy_app.settings import Settings

NOW = 1_800_000_000.0
H = Sequence[tuple[str, str]]


def fresh(headers: H, **settings: object) -> policy.Freshness:
    return policy.freshness(
        headers,
        Settings(**settings),  # type: ignore[arg-type]
        request_time=NOW,
        response_time=NOW,
    )


def date(offset_s: float = 0) -> str:
    return formatdate(NOW + offset_s, usegmt=True)


@pytest.mark.parametrize(
    ("status", "headers", "reason"),
    [
        (200, [], None),
        (201, [("cache-control", "max-age=10")], None),
        (203, [], None),
        (204, [], "status"),
        (206, [], "status"),
        (301, [], "status"),
        (304, [], "status"),
        (404, [("cache-control", "max-age=60")], "status"),
        (500, [], "status"),
        (200, [("cache-control", "no-store")], "no-store"),
        (200, [("cache-control", "max-age=60, NO-STORE")], "no-store"),
        (200, [("cache-control", "private")], "private"),
        (200, [("cache-control", 'private="x-user", max-age=60')], "private"),
        (200, [("set-cookie", "a=b")], "set-cookie"),
        (200, [("vary", "Accept, *")], "vary-star"),
        (200, [("cache-control", "no-cache")], None),
        (200, [("cache-control", "public, max-age=5")], None),
    ],
)
def test_what_may_be_stored(status: int, headers: H, reason: str | None) -> None:
    assert policy.unstorable_reason(status, headers, 10) == reason


def test_huge_bodies_are_not_stored() -> None:
    assert policy.unstorable_reason(200, [], policy.MAX_STORED_BODY_BYTES + 1) == "too-large"


def test_s_maxage_wins_over_max_age_and_expires() -> None:
    result = fresh(
        [("cache-control", "max-age=10, s-maxage=30"), ("expires", date(100)), ("date", date())]
    )
    assert result.lifetime_s == 30


def test_max_age_wins_over_expires() -> None:
    assert fresh([("cache-control", "max-age=10"), ("expires", date(100))]).lifetime_s == 10


def test_expires_counts_from_the_date_header() -> None:
    result = fresh([("expires", date(100)), ("date", date(-20))])
    assert result.lifetime_s == 120
    assert result.initial_age_s == 20  # apparent age from Date


@pytest.mark.parametrize("expires", ["0", "-1", "not a date"])
def test_invalid_expires_means_already_expired(expires: str) -> None:
    assert fresh([("expires", expires)]).lifetime_s == 0


@pytest.mark.parametrize(
    "expires",
    [
        "Thu, 18 Aug 50 02:01:18 GMT",  # two-digit year
        "Thu 18 Aug 2050 02:01:18 GMT",  # no comma
        "Thu, 18  Aug  2050 02:01:18 GMT",  # extra spaces
        "Thu, 18-Aug-2050 02:01:18 GMT",  # dashes outside the RFC 850 form
        "Thu, 18 Aug 2050 02.01.18 GMT",  # periods in the time
        "Thu, 18 Aug 2050 2:01:18 GMT",  # one-digit hour
        "Thu, 18 Aug 2050\r\n 02:01:18 GMT",  # folded over two lines
        "Thu, 18 Aug 2050 02:01:18 UTC",  # a zone other than GMT
        "Thu, 18 Aug 2050 02:01:18 +0000",
        "THU, 18 Aug 2050 02:01:18 GMT",  # names are case-sensitive
        "Thu, 18 AUG 2050 02:01:18 GMT",
        "Thu, 31 Feb 2050 02:01:18 GMT",  # no such day
    ],
)
def test_an_expires_that_is_no_http_date_means_already_expired(expires: str) -> None:
    """RFC 9111 section 5.3: an invalid Expires represents a time in the past."""
    assert fresh([("expires", expires), ("date", date())]).lifetime_s == 0


@pytest.mark.parametrize(
    "expires",
    [
        "Thu, 18 Aug 2050 02:01:18 GMT",
        "Thursday, 18-Aug-50 02:01:18 GMT",  # RFC 850 form
        "Thu Aug 18 02:01:18 2050",  # asctime form
    ],
)
def test_every_http_date_form_of_expires_is_understood(expires: str) -> None:
    """RFC 9110 section 5.6.7: recipients accept all three HTTP-date forms."""
    assert policy.strict_http_date(expires) == 2544400878.0
    assert fresh([("expires", expires), ("date", date())]).lifetime_s > 0


def test_without_freshness_information_the_default_ttl_applies() -> None:
    assert fresh([], cache_ttl_default_s=42).lifetime_s == 42
    assert fresh([], cache_ttl_default_s=0).lifetime_s == 0


def test_ignore_upstream_control_uses_the_defaults() -> None:
    result = fresh(
        [("cache-control", "max-age=5, must-revalidate"), ("age", "100")],
        cache_ignore_upstream_control=True,
        cache_ttl_default_s=77,
        cache_stale_ttl_s=9,
    )
    assert result == policy.Freshness(77, 0, 9, 9, False)


def test_age_header_and_transit_time_add_to_the_initial_age() -> None:
    result = policy.freshness(
        [("cache-control", "max-age=60"), ("age", "15")],
        Settings(),
        request_time=NOW - 2,
        response_time=NOW,
    )
    assert result.initial_age_s == 17
    assert result.fresh_for_s == 43


def test_an_age_line_listing_several_values_counts_by_the_first() -> None:
    """RFC 9111 section 5.1: Age is a single delta-seconds; "7200, 0" is read as its first value
    (as a second Age line would be ignored), so the response arrives stale."""
    result = policy.freshness(
        [("cache-control", "max-age=3600"), ("age", "7200, 0")],
        Settings(),
        request_time=NOW,
        response_time=NOW,
    )
    assert result.initial_age_s == 7200
    assert result.fresh_for_s == 0


def test_no_cache_means_always_revalidate() -> None:
    result = fresh([("cache-control", "no-cache, max-age=60")])
    assert result.lifetime_s == 0
    assert result.always_revalidate
    assert result.stale_while_revalidate_s == 0


def test_default_stale_window_applies_without_directives() -> None:
    result = fresh([("cache-control", "max-age=60")], cache_stale_ttl_s=30)
    assert result.stale_while_revalidate_s == 30
    assert result.stale_if_error_s == 30


def test_upstream_stale_directives_set_the_windows() -> None:
    result = fresh([("cache-control", "max-age=60, stale-while-revalidate=5, stale-if-error=600")])
    assert result.stale_while_revalidate_s == 5
    assert result.stale_if_error_s == 600


@pytest.mark.parametrize("directive", ["must-revalidate", "proxy-revalidate"])
def test_revalidate_directives_forbid_stale_use(directive: str) -> None:
    result = fresh([("cache-control", f"max-age=60, {directive}, stale-while-revalidate=30")])
    assert result.stale_while_revalidate_s == 0
    assert result.stale_if_error_s == 0


def test_s_maxage_allows_only_explicit_stale_windows() -> None:
    assert fresh([("cache-control", "s-maxage=60")]).stale_while_revalidate_s == 0
    explicit = fresh([("cache-control", "s-maxage=60, stale-while-revalidate=7")])
    assert explicit.stale_while_revalidate_s == 7


def test_worth_storing() -> None:
    stale_on_arrival = policy.Freshness(0, 0, 0, 0, False)
    assert not policy.worth_storing(stale_on_arrival, validator=False)
    assert policy.worth_storing(stale_on_arrival, validator=True)
    assert policy.worth_storing(policy.Freshness(10, 0, 0, 0, False), validator=False)


def test_cache_control_parsing() -> None:
    parsed = policy.parse_cache_control(['max-age=60, private="set-cookie, x"', "No-Store"])
    assert parsed == {"max-age": "60", "private": "set-cookie, x", "no-store": None}
    assert policy.delta_seconds({"max-age": "abc"}, "max-age") is None
    assert policy.delta_seconds({"max-age": "-5"}, "max-age") is None


def test_key_covers_path_query_and_representation_headers() -> None:
    json_key = policy.cache_key("/things", "a=1&a=2", {"accept": "application/json"})
    assert json_key.startswith("proxy:GET:/things?a=1&a=2#")
    assert json_key != policy.cache_key("/things", "a=1&a=2", {"accept": "text/xml"})
    assert json_key != policy.cache_key("/things", "a=2&a=1", {"accept": "application/json"})
    assert json_key != policy.cache_key(
        "/things", "a=1&a=2", {"accept": "application/json", "accept-language": "de"}
    )


def test_equivalent_header_values_share_a_key() -> None:
    one = policy.cache_key("/x", "", {"accept-encoding": "gzip, br", "accept": "Application/JSON"})
    two = policy.cache_key("/x", "", {"accept-encoding": "br,gzip", "accept": "application/json"})
    three = policy.cache_key("/x", "", {"accept-encoding": "br, gzip, deflate;q=0"})
    assert one == two
    assert policy.variant_id({"accept-encoding": "br, gzip"}) == three.rsplit("#", 1)[1]


def test_key_ignores_headers_that_do_not_select_a_representation() -> None:
    assert policy.cache_key("/x", "", {"user-agent": "a", "x-request-id": "1"}) == policy.cache_key(
        "/x", "", {}
    )


def test_glob_characters_are_escaped_in_patterns() -> None:
    assert policy.target_pattern("/a*b?c=[1]") == r"proxy:GET:/a\*b\?c=\[1\]#*"
    assert policy.prefix_pattern("/files\\x") == r"proxy:GET:/files\\x*"


@pytest.mark.parametrize(
    ("path", "bypassed"),
    [
        ("/auth", True),
        ("/auth/token", True),
        ("/authors", False),
        ("/users/me", True),
        ("/x", False),
    ],
)
def test_bypass_prefixes_match_whole_segments(path: str, bypassed: bool) -> None:
    assert policy.path_is_bypassed(path, ("/auth", "/users/me/")) is bypassed


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        (["Accept"], None),
        (["Authorization"], "authorization"),
        (["If-Match"], "precondition"),
        (["Range"], "precondition"),
        (["If-None-Match"], None),
    ],
)
def test_requests_that_bypass_the_cache(names: list[str], reason: str | None) -> None:
    assert policy.request_bypass_reason("/x", names, ()) == reason


@pytest.mark.parametrize(
    ("request_headers", "expected"),
    [
        ({"if-none-match": '"v1"'}, True),
        ({"if-none-match": 'W/"v1"'}, True),
        ({"if-none-match": '"v0", "v1"'}, True),
        ({"if-none-match": "*"}, True),
        ({"if-none-match": '"v2"'}, False),
        ({"if-none-match": '"v2"', "if-modified-since": date(10)}, False),
        ({"if-modified-since": date(10)}, True),
        ({"if-modified-since": date(-10)}, False),
        ({"if-modified-since": "garbage"}, False),
        ({}, False),
    ],
)
def test_conditional_requests(request_headers: dict[str, str], expected: bool) -> None:
    response = [("etag", '"v1"'), ("last-modified", date())]
    assert policy.not_modified(request_headers, response) is expected


def test_a_strict_cache_opens_no_stale_window_of_its_own() -> None:
    strict = fresh([("cache-control", "max-age=60")], cache_ttl_default_s=0, cache_stale_ttl_s=30)
    assert strict.stale_while_revalidate_s == 0
    assert strict.stale_if_error_s == 0
    explicit = fresh([("cache-control", "max-age=60, stale-if-error=9")], cache_ttl_default_s=0)
    assert explicit.stale_if_error_s == 9


def test_absurd_dates_are_ignored_not_crashing() -> None:
    huge = "Thu, 01 Jan 99999999999 00:00:00 GMT"
    assert policy.http_date(huge) is None
    assert not policy.not_modified({"if-modified-since": huge}, [("last-modified", date())])
    assert fresh([("expires", huge), ("date", huge)]).lifetime_s == 0


def test_added_forwarded_headers_always_select_the_variant_exactly() -> None:
    added = ("x-tenant",)
    acme = policy.cache_key("/t", "", {"x-tenant": "acme"}, added)
    acme_upper = policy.cache_key("/t", "", {"x-tenant": "ACME"}, added)
    other = policy.cache_key("/t", "", {"x-tenant": "other"}, added)
    empty = policy.cache_key("/t", "", {"x-tenant": ""}, added)
    missing = policy.cache_key("/t", "", {}, added)
    assert len({acme, acme_upper, other, empty, missing}) == 5
    assert acme == policy.cache_key("/t", "", {"x-tenant": " acme "}, added)
    # Without added names the key is what it always was.
    assert policy.cache_key("/t", "", {"x-tenant": "acme"}) == policy.cache_key("/t", "", {})


def test_targeted_cache_control_replaces_cache_control_most_specific_first() -> None:
    """RFC 9213 section 2.1: the first targeted field present and valid replaces Cache-Control
    for the caches it targets; the gateway's own field comes before CDN-Cache-Control."""
    base = [("cache-control", "no-store"), ("date", date())]
    cdn = [*base, ("cdn-cache-control", "max-age=600")]
    own = [*cdn, ("gateway-cache-control", "max-age=30")]
    assert policy.unstorable_reason(200, base, 10, ("cdn-cache-control",)) == "no-store"
    assert policy.unstorable_reason(200, cdn, 10, ("cdn-cache-control",)) is None
    assert fresh(cdn).lifetime_s == 600
    assert fresh(own).lifetime_s == 30
    assert fresh(cdn, cache_cdn_control=False).lifetime_s == 300  # the default: no max-age
    assert fresh(own, cache_control_field="").lifetime_s == 600
    forbidding = [("cache-control", "max-age=600"), ("cdn-cache-control", "private")]
    assert policy.unstorable_reason(200, forbidding, 10, ("cdn-cache-control",)) == "private"


@pytest.mark.parametrize(
    "value",
    ["max-age=600, Private", "max-age=6o0 x", '"max-age"=5', 'max-age="600"', "s-maxage"],
)
def test_an_invalid_targeted_field_is_ignored(value: str) -> None:
    """RFC 9213 section 2.1: a targeted field that fails to parse as a dictionary, or gives a
    directive that takes seconds a value of another type, is ignored."""
    headers = [("cache-control", "max-age=5"), ("cdn-cache-control", value)]
    assert fresh(headers).lifetime_s == 5
