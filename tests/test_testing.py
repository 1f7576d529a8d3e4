"""aiometer_redis.testing: the public helpers for testing code against a real redis-server."""

from __future__ import annotations

import subprocess

import pytest
import redis
from helpers.capabilities import REQUIRE_ALL, require

import aiometer_redis.testing
from aiometer_redis.testing import (
    RedisServer,
    allowed_in_window,
    find_redis_server,
    max_in_window,
    max_overlap,
    over_limit_seconds,
    redis_server_supports_tls,
    redis_server_version,
    window_violations,
)

pytestmark = pytest.mark.redis


def test_public_names() -> None:
    public = {name for name in vars(aiometer_redis.testing) if not name.startswith("_")}
    public -= {"annotations", "pytest_plugin"}
    assert set(aiometer_redis.testing.__all__) == public
    assert aiometer_redis.testing.__all__ == sorted(aiometer_redis.testing.__all__)


def test_version_is_the_binary_s_own() -> None:
    binary = find_redis_server()
    printed = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    major, minor, patch = redis_server_version()
    assert f"v={major}.{minor}.{patch} " in printed
    assert major >= 6


def test_tls_probe_agrees_with_starting_a_tls_port() -> None:
    server = RedisServer(["--tls-port", "0"])
    if redis_server_supports_tls():
        # A TLS build accepts the option (port 0: no TLS listener, no certificates needed).
        with server:
            assert server.port > 0
    else:
        with pytest.raises(RuntimeError, match="Bad directive"):
            server.start()


def test_redis_url_fixture_gives_an_empty_database(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
        client.set("left-behind", "1")


def test_redis_url_fixture_flushed_what_the_previous_test_wrote(
    redis_url: str, redis_server: RedisServer
) -> None:
    assert redis_url == redis_server.url
    with redis.Redis.from_url(redis_url) as client:
        assert client.get("left-behind") is None


def test_require_skips_with_the_reason_unless_all_are_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require(True, "never shown", "any")
    monkeypatch.delenv(REQUIRE_ALL, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"no TLS: install Debian's redis-server"):
        require(False, "no TLS", "TLS-capable")
    monkeypatch.setenv(REQUIRE_ALL, "1")
    with pytest.raises(pytest.fail.Exception, match=r"no TLS: .*AIOMETER_REQUIRE_ALL=1"):
        require(False, "no TLS", "TLS-capable")


def test_window_arithmetic() -> None:
    assert max_in_window([0.0, 0.05, 0.1, 0.5], 0.1) == 3
    assert allowed_in_window(10, 2, 0.5) == 8
    assert window_violations([0.0, 0.01, 0.02], rate=1, burst=1, widths=[0.1]) == [(0.1, 3, 2.1)]
    # An end and a start at the same instant are a hand-over, not an overlap.
    assert max_overlap([(0.0, 1.0), (1.0, 2.0), (0.5, 1.5)]) == 2
    assert over_limit_seconds([(0.0, 1.0), (0.5, 1.5)], 1) == pytest.approx(0.5)
