from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy_app.settings import (
    Settings,
    SettingsError,
    from_environment,
    load_settings,
    parse_sentinel_url,
)


def test_defaults_match_the_documented_table() -> None:
    settings = load_settings({"WEB_CONCURRENCY": "2"})
    assert settings.port == 3000
    assert settings.log_level == "info"
    assert settings.upstream_base_url is None
    assert settings.upstream_timeout_ms == 10_000
    assert settings.upstream_retries == 2
    assert settings.upstream_api_key == ""
    assert settings.proxy_body_limit_bytes == 1_048_576
    assert settings.proxy_response_limit_bytes is None
    assert settings.cache_redis_url == "redis://127.0.0.1:6379/0"
    assert settings.cache_ttl_default_s == 300
    assert settings.cache_stale_ttl_s == 60
    assert settings.cache_ignore_upstream_control is False
    assert settings.cache_bypass_paths == ()
    assert settings.cache_debug is False
    assert settings.api_keys_redis_url == settings.cache_redis_url
    assert settings.api_keys_redis_prefix == "api-keys"
    assert settings.rate_limit_window_s == 60
    assert settings.rate_limit_max_requests == 120
    assert settings.admin_api_token == ""
    assert settings.version == "dev"


def test_web_concurrency_defaults_to_the_number_of_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert load_settings({}).web_concurrency == 3


def test_values_are_parsed_and_normalised() -> None:
    settings = load_settings(
        {
            "PORT": "8081",
            "LOG_LEVEL": "WARNING",
            "HTTP_CLIENT_BASE_URL": "https://api.example.com/v4/",
            "HTTP_CLIENT_TIMEOUT": "2500",
            "CACHE_IGNORE_UPSTREAM_CONTROL": "true",
            "CACHE_BYPASS_PATHS": "/auth, /api/v1/users/me,,",
            "CACHE_REDIS_URL": "redis://cache:6379/1",
            "GIT_SHA": "abc123",
            "PROXY_RESPONSE_LIMIT": "536870912",
        }
    )
    assert settings.port == 8081
    assert settings.log_level == "warning"
    assert settings.upstream_base_url == "https://api.example.com/v4"
    assert settings.upstream_timeout_ms == 2500
    assert settings.cache_ignore_upstream_control is True
    assert settings.cache_bypass_paths == ("/auth", "/users/me")
    assert settings.api_keys_redis_url == "redis://cache:6379/1"
    assert settings.version == "abc123"
    assert settings.proxy_response_limit_bytes == 512 * 1024 * 1024


def test_empty_values_mean_the_default() -> None:
    settings = load_settings(
        {
            "PORT": "",
            "HTTP_CLIENT_BASE_URL": "",
            "API_KEYS_REDIS_URL": "",
            "PROXY_RESPONSE_LIMIT": "",
        }
    )
    assert settings.port == 3000
    assert settings.upstream_base_url is None
    assert settings.proxy_response_limit_bytes is None


@pytest.mark.parametrize(
    ("env", "value", "expected_words"),
    [
        ("PORT", "abc", "not an integer"),
        ("PORT", "70000", "65535"),
        ("PORT", "0", "65535"),
        ("LOG_LEVEL", "verbose", "one of debug, info, warning, error"),
        ("WEB_CONCURRENCY", "0", "from 1 to 64"),
        ("HTTP_CLIENT_BASE_URL", "ftp://example.com", "not an absolute http(s) URL"),
        ("HTTP_CLIENT_BASE_URL", "example.com/api", "not an absolute http(s) URL"),
        ("HTTP_CLIENT_BASE_URL", "https://example.com/api?x=1", "query string"),
        ("HTTP_CLIENT_BASE_URL", "https://user:pw@example.com", "credentials"),
        ("HTTP_CLIENT_TIMEOUT", "-5", "milliseconds"),
        ("HTTP_CLIENT_TIMEOUT", "1.5s", "not an integer"),
        ("HTTP_CLIENT_RETRIES", "11", "from 0 to 10"),
        ("PROXY_BODY_LIMIT", "lots", "bytes"),
        ("PROXY_RESPONSE_LIMIT", "100", "from 1024"),
        ("PROXY_RESPONSE_LIMIT", "10MB", "not an integer"),
        ("CACHE_REDIS_URL", "http://localhost:6379", "redis://"),
        ("CACHE_REDIS_URL", "redis://host:notaport/0", "invalid port"),
        ("CACHE_REDIS_URL", "redis+sentinel://s1:26379,s2:26379", "name the master"),
        ("CACHE_REDIS_URL", "redis+sentinel://s1:26379,s 2/main/0", "invalid sentinel address"),
        ("CACHE_REDIS_URL", "redis+sentinel://s1:70000/main/0", "invalid port"),
        ("CACHE_REDIS_URL", "redis+sentinel://s1/main/0?ssl=1", "query string"),
        ("CACHE_TTL_DEFAULT", "-1", "seconds"),
        ("CACHE_STALE_TTL", "x", "not an integer"),
        ("CACHE_IGNORE_UPSTREAM_CONTROL", "maybe", "not a boolean"),
        ("CACHE_BYPASS_PATHS", "/ok,users", "does not start with '/'"),
        ("CACHE_DEBUG", "2", "not a boolean"),
        ("API_KEYS_REDIS_URL", "localhost", "redis://"),
        ("API_KEYS_REDIS_PREFIX", "has space", "valid Redis key prefix"),
        ("API_KEYS_RATE_LIMIT_WINDOW_SECONDS", "0", "seconds"),
        ("API_KEYS_RATE_LIMIT_MAX_REQUESTS", "0", "from 1"),
        ("HOST", "everywhere", "not an IP address"),
    ],
)
def test_each_invalid_value_is_named_with_its_problem_and_expected_form(
    env: str, value: str, expected_words: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({env: value})
    assert len(caught.value.problems) == 1
    line = caught.value.problems[0]
    assert line.startswith(f"{env}=")
    assert expected_words in line
    assert "expected" in line


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"PORT": "x", "LOG_LEVEL": "loud", "HTTP_CLIENT_RETRIES": "-1"})
    names = [line.split("=", 1)[0] for line in caught.value.problems]
    assert names == ["HTTP_CLIENT_RETRIES", "LOG_LEVEL", "PORT"]


def test_redis_url_password_is_never_echoed_in_errors_or_masked_settings() -> None:
    settings = load_settings({"CACHE_REDIS_URL": "redis://:s3cret-pass@cache:6379/0"})
    assert "s3cret-pass" not in str(settings.masked())
    assert settings.masked()["cache_redis_url"] == "redis://:***@cache:6379/0"


def test_secrets_are_masked_and_not_in_repr() -> None:
    settings = Settings(admin_api_token="admin-secret-value", upstream_api_key="")
    masked = settings.masked()
    assert masked["admin_api_token"] == "(set)"
    assert masked["upstream_api_key"] == "(empty)"
    assert "admin-secret-value" not in repr(settings)


def test_settings_are_immutable() -> None:
    settings = load_settings({})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


def test_dotenv_fills_in_and_the_real_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("PORT=4100\nCACHE_TTL_DEFAULT=42\n")
    monkeypatch.setenv("PORT", "4200")
    monkeypatch.delenv("CACHE_TTL_DEFAULT", raising=False)
    settings = from_environment(str(dotenv))
    assert settings.port == 4200
    assert settings.cache_ttl_default_s == 42


@pytest.mark.parametrize(
    ("env", "value", "password"),
    [
        ("HTTP_CLIENT_BASE_URL", "https://svc:Sup3rSecret@api.example.com", "Sup3rSecret"),
        ("CACHE_REDIS_URL", "redis://:R3disPass@redis:63x9/0", "R3disPass"),
        ("API_KEYS_REDIS_URL", "http://user:K3ysPass@redis:6379", "K3ysPass"),
        ("CACHE_REDIS_URL", "redis+sentinel://:S3ntPass@s1,s2", "S3ntPass"),
    ],
)
def test_credentials_in_bad_urls_are_masked_in_the_error(
    env: str, value: str, password: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({env: value})
    assert password not in str(caught.value)
    assert env in str(caught.value)


def test_secrets_can_come_from_files(tmp_path: Path) -> None:
    token_file = tmp_path / "admin_token"
    token_file.write_text("from-a-file-token\n")
    key_file = tmp_path / "upstream_key"
    key_file.write_text("upstream-from-file")
    settings = load_settings(
        {"ADMIN_API_TOKEN_FILE": str(token_file), "HTTP_CLIENT_API_KEY_FILE": str(key_file)}
    )
    assert settings.admin_api_token == "from-a-file-token"
    assert settings.upstream_api_key == "upstream-from-file"


def test_secret_file_problems_are_reported_without_the_secret(tmp_path: Path) -> None:
    token_file = tmp_path / "admin_token"
    token_file.write_text("do-not-print-me")
    with pytest.raises(SettingsError) as caught:
        load_settings(
            {
                "ADMIN_API_TOKEN": "also-set",
                "ADMIN_API_TOKEN_FILE": str(token_file),
                "HTTP_CLIENT_API_KEY_FILE": str(tmp_path / "missing"),
                "PORT": "x",
            }
        )
    text = str(caught.value)
    assert "ADMIN_API_TOKEN_FILE: set together with ADMIN_API_TOKEN" in text
    assert "HTTP_CLIENT_API_KEY_FILE=" in text
    assert "cannot be read" in text
    assert "PORT=" in text  # reported together with the other problems
    assert "do-not-print-me" not in text
    assert "also-set" not in text


def test_every_setting_is_documented_in_the_env_example() -> None:
    from proxy_app.settings import ENV_NAMES

    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, re.M))
    assert set(ENV_NAMES) - documented == set()
    assert {"ADMIN_API_TOKEN_FILE", "HTTP_CLIENT_API_KEY_FILE"} <= documented


def test_hidden_response_headers_are_lowercased_names() -> None:
    settings = load_settings({"PROXY_HIDE_RESPONSE_HEADERS": " X-Backend, x-internal ,X-BACKEND"})
    assert settings.proxy_hide_response_headers == ("x-backend", "x-internal")
    assert load_settings({}).proxy_hide_response_headers == ()


def test_a_hidden_response_header_that_is_no_header_name_stops_start_up() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"PROXY_HIDE_RESPONSE_HEADERS": "x-ok,bad name"})
    (line,) = caught.value.problems
    assert line.startswith("PROXY_HIDE_RESPONSE_HEADERS=")
    assert "'bad name' is not a header name" in line


def test_added_request_headers_and_body_types_are_parsed_lowercased() -> None:
    settings = load_settings(
        {
            "PROXY_FORWARD_REQUEST_HEADERS": "Idempotency-Key, prefer,X-Tenant",
            "PROXY_BODY_TYPES": "application/json, Text/*,application/*+xml,*/*",
        }
    )
    assert settings.proxy_forward_request_headers == ("idempotency-key", "prefer", "x-tenant")
    assert settings.proxy_body_types == ("application/json", "text/*", "application/*+xml", "*/*")
    defaults = load_settings({"PROXY_BODY_TYPES": ""})
    assert defaults.proxy_forward_request_headers == ()
    assert defaults.proxy_body_types == ("application/json", "application/*+json")


@pytest.mark.parametrize(
    "name",
    [
        "x-api-key",
        "api_key",
        "Cookie",
        "authorization",
        "host",
        "forwarded",
        "X-Forwarded-For",
        "x-forwarded-proto",
        "content-length",
        "connection",
        "transfer-encoding",
        "te",
        "upgrade",
    ],
)
def test_a_secret_routing_or_hop_by_hop_request_header_cannot_be_forwarded(name: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"PROXY_FORWARD_REQUEST_HEADERS": f"x-tenant,{name}"})
    (line,) = caught.value.problems
    assert line.startswith("PROXY_FORWARD_REQUEST_HEADERS=")
    assert f"{name!r} must never be forwarded" in line


@pytest.mark.parametrize("value", ["json", "application/", "text/plain;q=1", "*/json", " , "])
def test_a_body_type_that_is_no_media_type_stops_start_up(value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"PROXY_BODY_TYPES": value})
    (line,) = caught.value.problems
    assert line.startswith("PROXY_BODY_TYPES=")


def test_cors_origins_are_parsed_and_empty_means_no_cors() -> None:
    settings = load_settings(
        {"CORS_ALLOWED_ORIGINS": "https://App.example.com, http://localhost:5173"}
    )
    assert settings.cors_allowed_origins == ("https://app.example.com", "http://localhost:5173")
    assert load_settings({"CORS_ALLOWED_ORIGINS": "*"}).cors_allowed_origins == ("*",)
    assert load_settings({}).cors_allowed_origins == ()


@pytest.mark.parametrize(
    "value",
    [
        "app.example.com",
        "https://app.example.com/",
        "https://app.example.com/path",
        "ftp://app.example.com",
        "https://user@app.example.com",
        "https://app.example.com:99999",
        "null",
        "*,https://app.example.com",
    ],
)
def test_a_malformed_cors_origin_stops_start_up(value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"CORS_ALLOWED_ORIGINS": value})
    (line,) = caught.value.problems
    assert line.startswith("CORS_ALLOWED_ORIGINS=")


def test_a_sentinel_url_names_every_sentinel_the_master_and_the_database() -> None:
    url = "redis+sentinel://:p%40ss@10.0.0.1:26379,sentinel-b,[fd00::3]:26380/gateway/2"
    settings = load_settings({"CACHE_REDIS_URL": url})
    assert settings.api_keys_redis_url == url
    assert settings.masked()["cache_redis_url"] == (
        "redis+sentinel://:***@10.0.0.1:26379,sentinel-b,[fd00::3]:26380/gateway/2"
    )
    parsed = parse_sentinel_url(url)
    assert parsed.sentinels == (("10.0.0.1", 26379), ("sentinel-b", 26379), ("fd00::3", 26380))
    assert parsed.master_name == "gateway"
    assert parsed.db == 2
    assert parsed.password == "p@ss"
    assert parse_sentinel_url("redis+sentinel://s1/gateway").db == 0
