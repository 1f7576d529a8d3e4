"""Every way to use ``aiometer-redis`` wrongly ends in one line on stderr, never a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from aiometer_redis._keys import limiter_keys
from aiometer_redis.testing import RedisServer

pytestmark = pytest.mark.redis

PASSWORD = "cli-pw"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiometer_redis", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def _one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    """The single stderr line of a failed command (and nothing on stdout)."""
    assert result.returncode == status, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def password_server() -> Iterator[RedisServer]:
    with RedisServer(["--requirepass", PASSWORD]) as running:
        yield running


@pytest.mark.parametrize("command", ["status", "reset", "set", "pause"])
def test_unreachable_redis_is_one_line_naming_the_address(command: str) -> None:
    port = _closed_port()
    extra = {"reset": ["--yes"], "set": ["--max-at-once", "3"], "pause": ["5"]}.get(command, [])
    result = _cli(command, "x", "--redis-url", f"redis://127.0.0.1:{port}/0", *extra)
    line = _one_line(result, 3)
    assert line == f"aiometer-redis: cannot use Redis at 127.0.0.1:{port}: Connection refused"


def test_wrong_password_is_one_line_without_the_password(password_server: RedisServer) -> None:
    url = f"redis://:not-{PASSWORD}@127.0.0.1:{password_server.port}/0"
    line = _one_line(_cli("status", "x", "--redis-url", url), 3)
    assert line.startswith(
        f"aiometer-redis: Redis at 127.0.0.1:{password_server.port} refused the credentials"
    )
    assert PASSWORD not in line


def test_sentinel_without_a_primary_is_one_line() -> None:
    port = _closed_port()
    url = f"redis+sentinel://127.0.0.1:{port}/mymaster"
    line = _one_line(_cli("status", "x", "--redis-url", url), 3)
    assert line.startswith(
        f"aiometer-redis: cannot use Redis at mymaster via sentinels 127.0.0.1:{port}: "
    )
    assert len(line) < 300


def test_missing_password_is_one_line(password_server: RedisServer) -> None:
    line = _one_line(_cli("status", "x", "--redis-url", password_server.url), 3)
    assert line == (
        f"aiometer-redis: Redis at 127.0.0.1:{password_server.port} needs a password, "
        "and the URL gives none"
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["status", "x", "--redis-url", "ftp://h"], "unsupported Redis URL scheme 'ftp'"),
        (["status", "x", "--redis-url", "redis+sentinel://h:99999/s"], "--redis-url"),
        (["status", "x", "--redis-url", "redis://h:port/0"], "port must be an integer"),
        (["status", ""], "argument name: must not be empty"),
        (["reset", "", "--yes"], "argument name: must not be empty"),
        (["status", "x", "--prefix", "a{b}"], "--prefix: must be non-empty and without braces"),
        (["reset", "x", "--prefix", "", "--yes"], "--prefix: must be non-empty"),
        (["demo", "--port", "99999"], "--port: must be 0 (any free port) to 65535, got 99999"),
        (["demo", "--port", "http"], "--port: expected a port number, got 'http'"),
        (["demo", "--workers", "0"], "--workers: must be >= 1, got 0"),
        (["demo", "--requests", "1.5"], "--requests: expected a whole number >= 1"),
        (["demo", "--max-per-second", "inf"], "--max-per-second: must be a finite number > 0"),
        (["demo", "--task-time", "-1"], "--task-time: must be a finite number > 0"),
        (["demo", "--name", ""], "--name: must not be empty"),
        (["demo", "--plot", "out.gif"], "unknown image type '.gif'"),
        (["demo", "--plot", "/nonexistent-dir/out.png"], "cannot write '/nonexistent-dir/out.png'"),
        (["demo", "--role", "boss"], "--role: invalid choice: 'boss'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["set", "x"], "give --max-at-once, --max-per-second (or both), or --clear alone"),
        (["set", "x", "--clear", "--max-at-once", "2"], "or --clear alone"),
        (["set", "x", "--max-at-once", "0"], "--max-at-once: must be >= 1, got 0"),
        (["set", "x", "--max-per-second", "nan"], "--max-per-second: must be a finite number"),
        (["pause", "x", "-1"], "argument seconds: must be from 0 to 86400 seconds, got -1"),
        (["pause", "x", "soon"], "argument seconds: expected a number of seconds, got 'soon'"),
        (["pause", "x"], "the following arguments are required: seconds"),
    ],
)
def test_bad_command_lines_are_one_line(args: list[str], words: str) -> None:
    line = _one_line(_cli(*args), 2)
    assert words in line
    assert line.endswith("--help)")


def test_plot_to_a_directory_is_refused_before_the_run(tmp_path: Path) -> None:
    line = _one_line(_cli("demo", "--plot", str(tmp_path)), 2)
    assert "unknown image type" in line or "is a directory" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("suffix", "command", "value", "expected"),
    [
        ("holders", "SET", "abc", "holds a string, not the zset the limiter writes"),
        ("queue", "SET", "abc", "holds a string, not the zset the limiter writes"),
        ("tat", "SET", "abc", "holds 'abc', not the number the limiter writes"),
        ("seq", "SET", "1.5x", "holds '1.5x', not the number the limiter writes"),
        ("tat", "RPUSH", "abc", "holds a list, not the string the limiter writes"),
    ],
)
def test_corrupt_keys_are_named(
    server: RedisServer, name: str, suffix: str, command: str, value: str, expected: str
) -> None:
    (key,) = (k for k in limiter_keys(name) if k.endswith(f":{suffix}"))
    with redis.Redis(port=server.port) as admin:
        admin.execute_command(command, key, value)
        try:
            for extra in ([], ["--json"]):
                result = _cli("status", name, "--redis-url", server.url, *extra)
                assert _one_line(result, 3) == f"aiometer-redis: key {key!r} {expected} " + (
                    "(written by something else? `aiometer-redis reset` deletes it)"
                )
        finally:
            admin.delete(key)


def test_reset_without_a_terminal_asks_for_yes(server: RedisServer, name: str) -> None:
    line = _one_line(_cli("reset", name, "--redis-url", server.url), 2)
    assert line == "aiometer-redis: refusing to reset without --yes (no terminal to ask)"


def test_status_works_for_an_acl_user_without_type(server: RedisServer, name: str) -> None:
    """The key-type check is a courtesy: a user limited to what the limiter runs (no TYPE)
    still reads the state."""
    with redis.Redis(port=server.port) as admin:
        admin.execute_command(
            "ACL", "SETUSER", "status-only", "reset", "on", ">pw", "~aiometer:*",
            "-@all", "+evalsha", "+eval", "+ping", "+time", "+get", "+zrange", "+zrangebyscore",
            "+hmget",
        )  # fmt: skip
    url = f"redis://status-only:pw@127.0.0.1:{server.port}/0"
    result = _cli("status", name, "--redis-url", url, "--json")
    assert result.returncode == 0, result.stderr
    assert '"holders": []' in result.stdout


def test_set_pause_and_status_show_what_the_fleet_applies(server: RedisServer, name: str) -> None:
    url = ["--redis-url", server.url]
    result = _cli("set", name, "--max-at-once", "3", "--max-per-second", "2.5", *url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"limiter {name!r}: max_at_once=3, max_per_second=2.5 from each process's next call"
    )
    result = _cli("pause", name, "30", *url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"limiter {name!r}: paused, 30.000 s left")
    result = _cli("status", name, "--json", *url)
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    assert 25 < state["paused_for"] <= 30
    assert state["limits_set"] == {"max_at_once": 3, "max_per_second": 2.5}
    text = _cli("status", name, *url).stdout
    assert "paused: " in text
    assert "limits set at run time: max_at_once=3, max_per_second=2.5" in text
    result = _cli("set", name, "--clear", *url)
    assert result.returncode == 0, result.stderr
    state = json.loads(_cli("status", name, "--json", *url).stdout)
    assert state["limits_set"] == {}
    assert state["adaptive_rate"] is None
