"""The URL forms RedisLimiter.from_url and the command line accept (no server needed)."""

from __future__ import annotations

import re

import pytest

from aiometer_redis import RedisLimiter
from aiometer_redis._cli import build_parser
from aiometer_redis._urls import SentinelURL, parse_url


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://user:secret@cache.example:6380/2",
        "unix:///run/redis.sock?db=1",
        "REDIS://127.0.0.1",
    ],
)
def test_plain_urls_are_left_to_the_client(url: str) -> None:
    assert parse_url(url) is None


def test_sentinel_url_with_defaults() -> None:
    assert parse_url("redis+sentinel://10.0.0.5/mymaster") == SentinelURL(
        sentinels=(("10.0.0.5", 26379),), service_name="mymaster"
    )


def test_sentinel_url_with_everything() -> None:
    parsed = parse_url(
        "redis+sentinel://app:p%40ss%3Aword@s1:26380,s2,[::1]:26381/my%20service/3"
        "?sentinel_username=watch&sentinel_password=s%26cret"
    )
    assert parsed == SentinelURL(
        sentinels=(("s1", 26380), ("s2", 26379), ("::1", 26381)),
        service_name="my service",
        db=3,
        username="app",
        password="p@ss:word",
        sentinel_username="watch",
        sentinel_password="s&cret",
    )


def test_sentinel_url_password_only() -> None:
    parsed = parse_url("redis+sentinel://:hunter2@s1/svc")
    assert parsed is not None
    assert (parsed.username, parsed.password) == (None, "hunter2")


def test_sentinel_url_repr_hides_passwords() -> None:
    parsed = parse_url("redis+sentinel://u:hunter2@s1/svc?sentinel_password=other")
    assert "hunter2" not in repr(parsed)
    assert "other" not in repr(parsed)
    assert repr(parsed) == "SentinelURL(redis+sentinel://s1:26379/svc/0)"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel:///svc", "no sentinel address"),
        ("redis+sentinel://u:pw@/svc", "no sentinel address"),
        ("redis+sentinel://s1", "no service name"),
        ("redis+sentinel://s1/", "no service name"),
        ("redis+sentinel://s1/svc/0/extra", "/service_name or /service_name/db"),
        ("redis+sentinel://s1/svc/x", "db must be an integer >= 0, got 'x'"),
        ("redis+sentinel://s1:0/svc", "from 1 to 65535, got '0'"),
        ("redis+sentinel://s1:70000/svc", "from 1 to 65535, got '70000'"),
        ("redis+sentinel://s1:http/svc", "got 'http'"),
        ("redis+sentinel://s1:/svc", "empty port"),
        ("redis+sentinel://s1,,s2/svc", "no host"),
        ("redis+sentinel://[::1]x/svc", "expected ':port' after ']'"),
        ("redis+sentinel://s1/svc?ssl=true", "unknown query parameter 'ssl'"),
        ("redis+sentinel://s1/svc?sentinel_password=a&sentinel_password=b", "given twice"),
        ("redis+sentinel://s1/svc#frag", "fragment"),
        ("rediss+sentinel://s1/svc", "TLS through Sentinel is not supported in a URL"),
        ("http://s1/svc", "unsupported Redis URL scheme 'http'"),
        ("127.0.0.1:6379", "no '://' found"),
    ],
)
def test_malformed_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_url(url)


def test_errors_never_repeat_a_password() -> None:
    for url in ("redis+sentinel://u:hunter2@s1:0/svc", "redis+sentinel://u:hunter2@s1/svc/x"):
        with pytest.raises(ValueError, match="invalid redis") as caught:
            parse_url(url)
        assert "hunter2" not in str(caught.value)


def test_url_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="url must be a str, got bytes"):
        parse_url(b"redis://x")  # type: ignore[arg-type]


def test_from_url_checks_the_url_at_once() -> None:
    # Before any event loop or connection: a bad URL is a bad argument.
    with pytest.raises(ValueError, match="no service name"):
        RedisLimiter.from_url("redis+sentinel://s1", "name", max_at_once=1)
    limiter = RedisLimiter.from_url("redis+sentinel://s1/svc", "name", max_at_once=1)
    assert limiter.name == "name"


def test_command_line_checks_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["status", "x", "--redis-url", "redis+sentinel://s1:26379/svc"])
    assert args.redis_url == "redis+sentinel://s1:26379/svc"
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["reset", "x", "--redis-url", "redis+sentinel://s1:99999/svc"])
    assert caught.value.code == 2
    assert "a sentinel port must be an integer from 1 to 65535" in capsys.readouterr().err
