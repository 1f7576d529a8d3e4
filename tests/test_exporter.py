"""The fleet view: ``aiometer-redis exporter`` scraped with httpx and parsed with
prometheus_client's own parser, against the known state of a running multi-process fleet;
``aiometer-redis top``; and the command lines' wrong-way paths (one line, exit 2, 3 or 130).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import anyio
import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from aiometer_redis import RedisLimiter
from aiometer_redis._client import adapt
from aiometer_redis._exporter import Fleet, FleetLimiter, limiter_names, read_fleet
from aiometer_redis._keys import limiter_keys
from aiometer_redis._top import issue_rates
from aiometer_redis.testing import RedisCluster3, RedisServer

pytestmark = pytest.mark.redis

WORKER = Path(__file__).parent / "helpers" / "fleet_worker.py"
CLI = [sys.executable, "-m", "aiometer_redis"]
ENV = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def _line(stream: IO[str], timeout: float) -> str:
    """The next line of *stream*, or fail after *timeout* seconds."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            pytest.fail(f"no line within {timeout:g} s")
    return stream.readline().strip()


@contextlib.contextmanager
def running(command: list[str]) -> Iterator[subprocess.Popen[str]]:
    """A process whose stdout is read line by line; stopped (SIGKILL) on exit."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


@contextlib.contextmanager
def exporter(url: str, *options: str) -> Iterator[str]:
    """An exporter on a free loopback port; yields its metrics URL."""
    command = [*CLI, "exporter", "--redis-url", url, "--port", "0", *options]
    with running(command) as process:
        assert process.stdout is not None
        line = _line(process.stdout, 30)
        assert line.startswith("serving http://127.0.0.1:"), line
        yield line.split()[1]


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {labels: value}}`` of one scrape."""
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def of(samples: dict[str, dict[Any, float]], metric: str, limiter: str | None = None) -> float:
    labels = () if limiter is None else (("limiter", limiter),)
    return samples[metric][labels]


def hold(url: str, name: str, count: int, *limits: str) -> list[str]:
    return [
        sys.executable,
        str(WORKER),
        "--url",
        url,
        "--name",
        name,
        "--hold",
        str(count),
        "--lease-ttl",
        "10",
        *limits,
    ]


def wait_for_state(url: str, name: str, holders: int, waiters: int, timeout: float = 20) -> None:
    keys = limiter_keys(name)
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            found = (client.zcard(keys[0]), client.zcard(keys[1]))
            if found == (holders, waiters):
                return
            assert time.monotonic() < deadline, f"{name}: {found}, not {(holders, waiters)}"
            time.sleep(0.05)
    finally:
        client.close()


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


# -- the exporter against a running fleet -------------------------------------------------------


@pytest.mark.slow
def test_exporter_reports_what_a_running_fleet_holds(server: RedisServer) -> None:
    """Four worker processes: two share limiter A (max_at_once=4; the first holds 3, the
    second holds 1 and queues for another), one holds the only slot of B, one has taken the
    one start of rate-only C (0.5 per second). The exporter's numbers are theirs."""
    a, b, c = unique("a"), unique("b"), unique("c")
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(running(hold(server.url, a, 3, "--max-at-once", "4")))
        assert first.stdout is not None
        assert _line(first.stdout, 30) == "HOLDING"
        stack.enter_context(running(hold(server.url, a, 2, "--max-at-once", "4")))
        stack.enter_context(running(hold(server.url, b, 1, "--max-at-once", "1")))
        rate = stack.enter_context(running(hold(server.url, c, 1, "--max-per-second", "0.5")))
        assert rate.stdout is not None
        assert _line(rate.stdout, 30) == "HOLDING"
        wait_for_state(server.url, a, holders=4, waiters=1)
        wait_for_state(server.url, b, holders=1, waiters=0)
        url = stack.enter_context(exporter(server.url))
        samples = scrape(url)
        again = scrape(url)

    assert of(samples, "aiometer_fleet_up") == 1
    assert of(samples, "aiometer_fleet_read_errors_total") == 0
    assert of(samples, "aiometer_fleet_truncated") == 0
    assert of(samples, "aiometer_fleet_limiters") >= 3
    expected = {
        # A: 4 fencing tokens and the queued waiter's ticket; B: one token; C: one start.
        a: (4, 1, 5),
        b: (1, 0, 1),
        c: (0, 0, 1),
    }
    for scraped in (samples, again):
        for name, (holders, waiters, issued) in expected.items():
            assert of(scraped, "aiometer_fleet_holders", name) == holders, name
            assert of(scraped, "aiometer_fleet_waiters", name) == waiters, name
            assert of(scraped, "aiometer_fleet_tokens_issued_total", name) == issued, name
    for name in (a, b):
        assert of(samples, "aiometer_fleet_next_start_seconds", name) == 0
    # C's one start at 0.5 per second puts the next one up to 2 s after it.
    assert 0 < of(samples, "aiometer_fleet_next_start_seconds", c) <= 2.0
    assert of(again, "aiometer_fleet_next_start_seconds", c) <= of(
        samples, "aiometer_fleet_next_start_seconds", c
    )


def test_exporter_bounds_and_prefix(server: RedisServer) -> None:
    """Only the limiters under --prefix; at most --max-limiters of them, then truncated;
    keys no limiter wrote are counted as unreadable, not fatal."""
    prefix = unique("bounds")
    client = redis.Redis.from_url(server.url)
    try:
        for n in range(5):
            client.set(limiter_keys(f"n{n}", prefix)[4], 7 + n)  # the seq counter
        client.set(limiter_keys("elsewhere", prefix + "x")[4], 1)
        with exporter(server.url, "--prefix", prefix) as url:
            samples = scrape(url)
        assert of(samples, "aiometer_fleet_limiters") == 5
        assert of(samples, "aiometer_fleet_truncated") == 0
        issued = samples["aiometer_fleet_tokens_issued_total"]
        assert issued == {(("limiter", f"n{n}"),): 7 + n for n in range(5)}
        with exporter(server.url, "--prefix", prefix, "--max-limiters", "2") as url:
            samples = scrape(url)
        assert of(samples, "aiometer_fleet_limiters") == 2
        assert of(samples, "aiometer_fleet_truncated") == 1
        # Which two depends on the SCAN's order; their numbers are still right.
        issued = samples["aiometer_fleet_tokens_issued_total"]
        assert len(issued) == 2
        assert all(value == 7 + int(labels[0][1][1:]) for labels, value in issued.items())
        client.set(limiter_keys("n0", prefix)[0], "not a zset")
        with exporter(server.url, "--prefix", prefix) as url:
            samples = scrape(url)
        assert of(samples, "aiometer_fleet_unreadable") == 1
        assert of(samples, "aiometer_fleet_limiters") == 4
        assert of(samples, "aiometer_fleet_up") == 1
    finally:
        client.close()


def test_exporter_keeps_serving_while_redis_is_down() -> None:
    with RedisServer() as own:
        name = unique("down")
        client = redis.Redis.from_url(own.url)
        client.set(limiter_keys(name)[4], 3)
        client.close()
        with exporter(own.url) as url:
            assert of(scrape(url), "aiometer_fleet_tokens_issued_total", name) == 3
            own.pause()
            try:
                started = time.monotonic()
                samples = scrape(url)
                assert time.monotonic() - started < 20
            finally:
                own.resume()
            assert of(samples, "aiometer_fleet_up") == 0
            assert of(samples, "aiometer_fleet_read_errors_total") == 1
            assert "aiometer_fleet_holders" not in samples
            samples = scrape(url)
            assert of(samples, "aiometer_fleet_up") == 1
            assert of(samples, "aiometer_fleet_read_errors_total") == 1


# -- reading the fleet (library level) ----------------------------------------------------------


@pytest.mark.parametrize("name", ["plain", "a{b}c", "%7B", "x%25y", "{}%", "név:1"])
@pytest.mark.anyio
async def test_names_come_back_from_their_keys(server: RedisServer, raw: Any, name: str) -> None:
    prefix = unique("names")
    async with (
        RedisLimiter.from_url(server.url, name, max_at_once=1, prefix=prefix) as limiter,
        limiter.slot(),
    ):
        names, truncated = await limiter_names(adapt(raw), prefix)
        fleet = await read_fleet(adapt(raw), prefix)
    assert (names, truncated) == ([name], False)
    assert fleet.limiters == (FleetLimiter(name, 1, 0, 0.0, 1),)


def test_issue_rates() -> None:
    before = Fleet(
        (FleetLimiter("a", 0, 0, 0.0, 10), FleetLimiter("b", 0, 0, 0.0, 50)), False, (), 0
    )
    after = Fleet(
        (
            FleetLimiter("a", 0, 0, 0.0, 30),
            FleetLimiter("b", 0, 0, 0.0, 4),  # reset in between: counts from zero
            FleetLimiter("c", 0, 0, 0.0, 9),  # new: no rate yet
        ),
        False,
        (),
        0,
    )
    assert issue_rates(before, after, 2.0) == {"a": 10.0, "b": 2.0}
    assert issue_rates(before, after, 0.0) == {}


@pytest.mark.slow
@pytest.mark.backends("asyncio")
@pytest.mark.anyio
async def test_cluster_fleet_is_read_from_every_primary(cluster: RedisCluster3) -> None:
    from redis.asyncio import RedisCluster

    prefix = unique("cluster")
    names = [f"shard-{n}" for n in range(12)]
    client = RedisCluster.from_url(cluster.url)
    try:
        owners = set()
        for n, name in enumerate(names):
            keys = limiter_keys(name, prefix)
            await client.set(keys[4], n + 1)
            owners.add(cluster.owner_of_slot(client.keyslot(keys[4])))
        assert len(owners) == 3, "the names should spread over the three primaries"
        fleet = await read_fleet(adapt(client), prefix)
    finally:
        await client.aclose()
    assert [(limiter.name, limiter.issued) for limiter in fleet.limiters] == sorted(
        (name, n + 1) for n, name in enumerate(names)
    )
    result = await anyio.to_thread.run_sync(
        lambda: _run("top", "--once", "--cluster", "--redis-url", cluster.url, "--prefix", prefix)
    )
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in names)


# -- top ------------------------------------------------------------------------------------------


def test_top_once_prints_the_fleet(server: RedisServer) -> None:
    prefix = unique("top")

    async def fleet() -> None:
        async with (
            RedisLimiter.from_url(server.url, "api", max_at_once=3, prefix=prefix) as api,
            RedisLimiter.from_url(server.url, "db", max_per_second=10, prefix=prefix) as db,
        ):
            permits = [await api.acquire(), await api.acquire(), await db.acquire()]
            result = await anyio.to_thread.run_sync(
                lambda: subprocess.run(
                    [*CLI, "top", "--once", "--redis-url", server.url, "--prefix", prefix],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env=ENV,
                )
            )
            for permit in permits:
                await permit.release()
            assert result.returncode == 0, result.stderr
            rows = {
                cells[0]: cells[1:]
                for line in result.stdout.splitlines()
                if len(cells := [c.strip() for c in line.strip("│|").split("│")]) == 7
            }
            assert rows["api"][:2] == ["2", "0"], result.stdout
            assert rows["api"][3] == "2"
            assert rows["db"][:2] == ["0", "0"]
            assert rows["db"][3] == "1"
            assert f"aiometer limiters under {prefix!r}: 2" in result.stdout

    anyio.run(fleet)


def test_exporter_and_top_show_pauses_limits_set_and_the_adaptive_rate(
    server: RedisServer,
) -> None:
    """What a limiter's control key holds reaches the exporter and top: a pause in force,
    limits set at run time, the adaptive rate after a push-back; absent where nothing is."""
    prefix = unique("control")

    async def fleet() -> tuple[dict[str, Any], str]:
        async with (
            RedisLimiter.from_url(server.url, "paused", max_at_once=3, prefix=prefix) as paused,
            RedisLimiter.from_url(server.url, "set", max_per_second=10, prefix=prefix) as limited,
            RedisLimiter.from_url(
                server.url, "cut", max_per_second=8, adaptive=True, prefix=prefix
            ) as cut,
            RedisLimiter.from_url(server.url, "plain", max_at_once=1, prefix=prefix) as plain,
        ):
            await paused.pause(60)
            await limited.set_limits(max_per_second=4)
            assert await cut.throttled()
            await (await plain.acquire()).release()
            await (await cut.acquire()).release()

            def outside() -> tuple[dict[str, Any], str]:
                with exporter(server.url, "--prefix", prefix) as url:
                    samples = scrape(url)
                top = subprocess.run(
                    [*CLI, "top", "--once", "--redis-url", server.url, "--prefix", prefix],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env=ENV,
                )
                assert top.returncode == 0, top.stderr
                return samples, top.stdout

            return await anyio.to_thread.run_sync(outside)

    samples, top = anyio.run(fleet)
    assert 55 < of(samples, "aiometer_fleet_paused_seconds", "paused") <= 60
    assert of(samples, "aiometer_fleet_next_start_seconds", "paused") > 55
    assert of(samples, "aiometer_fleet_paused_seconds", "plain") == 0
    assert of(samples, "aiometer_fleet_max_per_second_set", "set") == 4
    # Cut from 8 to 4 per second, then recovering by about 0.25 per second.
    assert 4 <= of(samples, "aiometer_fleet_adaptive_rate", "cut") < 6
    for name in ("paused", "plain", "cut"):
        assert (("limiter", name),) not in samples["aiometer_fleet_max_per_second_set"]
    assert "aiometer_fleet_max_at_once_set" not in samples
    rows = {
        cells[0]: cells[-1]
        for line in top.splitlines()
        if len(cells := [c.strip() for c in line.strip("│|").split("│")]) == 7
    }
    assert rows["paused"].startswith("paused 5"), top
    assert rows["set"] == "max_per_second set 4", top
    assert rows["cut"].startswith(("adaptive 4.", "adaptive 5.")), top
    assert rows["plain"] == "-", top


def test_top_refreshes_until_ctrl_c(server: RedisServer) -> None:
    prefix = unique("live")
    client = redis.Redis.from_url(server.url)
    client.set(limiter_keys("x", prefix)[4], 1)
    client.close()
    command = [*CLI, "top", "--redis-url", server.url, "--prefix", prefix, "--interval", "0.2"]
    with running(command) as process:
        time.sleep(2)
        assert process.poll() is None
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert err.strip().splitlines() == ["aiometer-redis: interrupted"]
    # Not a terminal: the live table is printed once, at the end. Its issued/s column has a
    # number only after a second read.
    (row,) = [line for line in out.splitlines() if "│ x " in line]
    assert [cell.strip() for cell in row.strip("│").split("│")] == [
        "x",
        "0",
        "0",
        "now",
        "1",
        "0.0",
        "-",
    ]


# -- the wrong way --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *arguments], capture_output=True, text=True, timeout=60, env=ENV)


@pytest.mark.parametrize("command", ["exporter", "top --once"])
def test_unreachable_redis_is_one_line_and_exit_3(command: str) -> None:
    port = _free_port()
    result = _run(*command.split(), "--redis-url", f"redis://127.0.0.1:{port}/0")
    assert result.returncode == 3
    assert result.stderr.splitlines() == [
        f"aiometer-redis: cannot use Redis at 127.0.0.1:{port}: Connection refused"
    ]


def test_exporter_port_in_use_is_one_line_and_exit_3(server: RedisServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("exporter", "--redis-url", server.url, "--port", str(port))
    assert result.returncode == 3
    assert result.stderr.splitlines() == [
        f"aiometer-redis: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ("exporter --port 70000", "--port: must be 0 (any free port) to 65535, got 70000"),
        ("exporter --max-limiters 0", "--max-limiters: must be >= 1, got 0"),
        ("exporter --prefix a{b", "--prefix: must be non-empty and without braces"),
        ("exporter --redis-url http://x", "--redis-url"),
        ("top --interval 0", "--interval: must be a finite number > 0, got 0"),
        ("top --interval soon", "--interval: expected a number > 0, got 'soon'"),
        ("top --max-limiters x", "--max-limiters: expected a whole number >= 1, got 'x'"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(arguments: str, message: str) -> None:
    result = _run(*arguments.split())
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("aiometer-redis ")
    assert message in line


def test_exporter_stops_on_ctrl_c(server: RedisServer) -> None:
    command = [*CLI, "exporter", "--redis-url", server.url, "--port", "0"]
    with running(command) as process:
        assert process.stdout is not None
        url = _line(process.stdout, 30).split()[1]
        assert scrape(url)["aiometer_fleet_up"][()] == 1
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert err.strip().splitlines() == ["aiometer-redis: interrupted"]
