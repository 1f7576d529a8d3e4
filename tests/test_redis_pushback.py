"""Push-back across a fleet of OS processes on a real redis-server: the pause, the adaptive
rate (one cut per burst of 429s, then recovery) and limits set at run time, each with
redis-py on asyncio and coredis on trio.

Start times are taken by the workers on their own clocks as each task starts; the scripts
decide on the Redis clock. The two differ by a round trip or so: every boundary below is
judged with 0.1 s of tolerance (as the other fleet tests do).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers.fleet import run_workers

from aiometer_redis import ConfigurationError, RedisLimiter, RedisLimiterGroup
from aiometer_redis.testing import RedisServer

pytestmark = pytest.mark.redis

WORKER = Path(__file__).parent / "helpers" / "pushback_worker.py"
#: How far the workers' clocks may lag the server's decisions (a round trip or so).
LAG = 0.1

CLIENTS = [
    pytest.param(["--backend", "asyncio", "--client", "redis"], id="asyncio-redis"),
    pytest.param(["--backend", "trio", "--client", "coredis"], id="trio-coredis"),
]


def _run_fleet(
    server: RedisServer,
    name: str,
    tmp_path: Path,
    per_process: Sequence[Sequence[str]],
    duration: float,
) -> tuple[list[dict[str, Any]], float]:
    """Run one worker per entry of *per_process* (its options), all starting together; return
    what each one recorded and the common start time."""
    common = ["--url", server.url, "--name", name]
    outs, start_at = run_workers(WORKER, common, per_process, tmp_path, duration=duration)
    return [json.loads(out.read_text()) for out in outs], start_at


def _starts(results: Sequence[dict[str, Any]]) -> list[float]:
    return sorted(t for result in results for t in result["starts"])


def _count(starts: Sequence[float], begin: float, end: float) -> int:
    return sum(1 for t in starts if begin <= t < end)


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_no_process_starts_inside_a_pause(
    server: RedisServer, name: str, tmp_path: Path, client: list[str]
) -> None:
    rate = 50.0
    options = ["--max-at-once", "4", "--max-per-second", str(rate), "--task-time", "0.02"]
    pauser = [*options, "--pause-at", "1.0", "--pause-for", "1.2", *client]
    results, _ = _run_fleet(
        server, name, tmp_path, [pauser, [*options, *client], [*options, *client]], 3.5
    )
    before, after, left = results[0]["pause"]
    assert left == pytest.approx(1.2, abs=0.01)
    starts = _starts(results)
    # The pause runs from the server's "now" (between before and after) for 1.2 s. Starts
    # granted before the call keep their time: at most max_at_once of them, one interval
    # apart, so none is later than 4 intervals after the call.
    quiet_from = after + 4 / rate + LAG
    quiet_until = before + 1.2 - LAG
    inside = [t for t in starts if quiet_from <= t < quiet_until]
    assert inside == [], (inside, quiet_from, quiet_until)
    # Work ran before the pause and resumed after it, at the full rate, in every process.
    assert _count(starts, before - 0.5, before) >= 0.8 * 0.5 * rate
    assert _count(starts, before + 1.2 + LAG, before + 2.2) >= 0.8 * (1.0 - LAG) * rate
    for result in results:
        assert any(t > before + 1.2 for t in result["starts"])


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_a_burst_of_429s_from_every_worker_cuts_once_then_recovers(
    server: RedisServer, name: str, tmp_path: Path, client: list[str]
) -> None:
    rate, recovery = 40.0, 10.0
    options = [
        "--max-per-second", str(rate), "--adaptive", "--recovery", str(recovery),
        "--cooldown", "1.0", "--throttle-from", "1.0", "--throttle-until", "1.4", *client,
    ]  # fmt: skip
    results, start = _run_fleet(
        server, name, tmp_path, [[*options, "--sample"], options, options], 8.0
    )
    # Every worker reported 429s for 0.4 s (about 16 reports in all): within one cool-down,
    # one cut.
    reports = _count(_starts(results), start + 1.0, start + 1.4)
    assert reports >= 8
    assert sum(result["cuts"] for result in results) == 1
    starts = _starts(results)
    # Before: the full rate. After the cut (to 20/s, recovering by 3.8/s each second; starts
    # reserved before it, up to 12 workers / 40 per s = 0.3 s ahead, keep their time): about
    # 22/s in the half second from 1.5 s.
    assert _count(starts, start + 0.2, start + 1.0) >= 0.85 * 0.8 * rate
    after_cut = _count(starts, start + 1.5, start + 2.0)
    assert after_cut <= 0.7 * rate * 0.5, after_cut
    # Back to the maximum (40/s) about 5.3 s after the cut: the full rate in the last second.
    assert _count(starts, start + 7.0, start + 8.0) >= 0.85 * rate
    # The effective rate statistics() reports: cut to about half, then rising to the max.
    samples = [(t - start, r) for t, r in results[0]["rates"]]
    cut = [r for t, r in samples if 1.0 + LAG <= t < 1.2]
    assert cut, samples
    assert all(19 <= r <= 21 for r in cut), samples
    later = [r for t, r in samples if 1.2 <= t < 6.0]
    assert later == sorted(later)
    assert later[-1] < rate
    assert all(r == pytest.approx(rate) for t, r in samples if t >= 7.0), samples


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_limits_set_at_run_time_apply_from_the_next_call(
    server: RedisServer, name: str, tmp_path: Path, client: list[str]
) -> None:
    rate = 50.0
    options = ["--max-per-second", str(rate), "--max-at-once", "8", *client]
    operator = [*options, "--set-at", "1.0", "--set-rate", "10", "--clear-at", "2.5"]
    results, _ = _run_fleet(server, name, tmp_path, [operator, options, options], 5.0)
    set_at, clear_at = results[0]["set"], results[0]["clear"]
    starts = _starts(results)
    # Before: 50/s. From the next call after set_limits: 10/s (plus the starts already
    # reserved at 50/s, at most max_at_once). After clear_limits: 50/s again, once the starts
    # reserved at 10/s (at most max_at_once = 8, so 0.8 s ahead) have passed.
    assert _count(starts, set_at - 0.8, set_at) >= 0.85 * 0.8 * rate
    slow = _count(starts, set_at, clear_at)
    assert slow <= 10 * (clear_at - set_at) + 8 + 1, slow
    assert slow >= 0.8 * 10 * (clear_at - set_at - 8 / rate - LAG)
    assert _count(starts, clear_at + 0.8 + LAG, clear_at + 1.8 + LAG) >= 0.85 * rate


# -- one process, both backends ---------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """Adaptive options as ``aiometer.Adaptive`` holds them."""

    factor: float = 0.5
    cooldown: float = 1.0
    floor: float | None = None
    recovery: float = 30.0


@pytest.mark.anyio
async def test_pause_holds_every_start_and_statistics_show_it(
    server: RedisServer, name: str
) -> None:
    async with (
        RedisLimiter.from_url(server.url, name, max_at_once=2, max_per_second=100) as limiter,
        RedisLimiter.from_url(server.url, name, max_at_once=2, max_per_second=100) as other,
    ):
        assert (await limiter.statistics()).paused_for == 0.0
        before = anyio.current_time()
        assert await limiter.pause(0.5) == pytest.approx(0.5, abs=0.001)
        # Another process's view; a shorter pause does not shorten it.
        stats = await other.statistics()
        assert 0.3 < stats.paused_for <= 0.5
        assert stats.next_start == pytest.approx(stats.paused_for, abs=0.01)
        assert 0.3 < await other.pause(0.1) <= 0.5
        starts: list[float] = []

        async def start(which: RedisLimiter) -> None:
            async with which.slot():
                starts.append(anyio.current_time())

        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(start, (limiter, other)[n % 2])
        assert len(starts) == 4
        assert min(starts) >= before + 0.5 - LAG
        assert (await limiter.statistics()).paused_for == 0.0
        # throttled(retry_after) pauses too; without adaptive it cuts nothing.
        assert await limiter.throttled(retry_after=0.3) is False
        assert 0.2 < (await other.statistics()).paused_for <= 0.3
        assert await limiter.throttled() is False


@asynccontextmanager
async def _client(server: RedisServer, anyio_backend: str) -> AsyncIterator[Any]:
    """A client of *server*: redis-py on asyncio, coredis on trio."""
    if anyio_backend == "asyncio":
        import redis.asyncio

        plain = redis.asyncio.Redis.from_url(server.url)
        try:
            yield plain
        finally:
            await plain.aclose()
    else:
        import coredis

        async with coredis.Redis.from_url(server.url) as client:
            yield client


@pytest.mark.anyio
async def test_adaptive_group_cuts_per_key_and_limits_set_show_in_statistics(
    server: RedisServer, name: str, anyio_backend: str
) -> None:
    options = Options(factor=0.25, cooldown=5.0, recovery=60.0)
    async with (
        _client(server, anyio_backend) as client,
        RedisLimiterGroup(client, max_per_second=40, adaptive=options) as group,
    ):
        first, second = group[f"{name}-a"], group[f"{name}-b"]
        assert await first.throttled() is True
        assert await first.throttled() is False  # within the cool-down
        stats = await first.statistics()
        assert stats.effective_max_per_second == pytest.approx(10, abs=0.1)
        assert (await second.statistics()).effective_max_per_second == 40
        # A max_per_second set at run time caps the adaptive rate and is what it recovers to.
        await first.set_limits(max_per_second=5, max_at_once=3)
        stats = await first.statistics()
        assert stats.limits_set == {"max_per_second": 5.0, "max_at_once": 3}
        assert stats.effective_max_per_second == pytest.approx(5)
        # This limiter has no max_at_once: the one set does not add one.
        assert stats.effective_max_at_once is None
        await first.clear_limits()
        stats = await first.statistics()
        assert stats.limits_set == {}
        assert stats.effective_max_per_second == pytest.approx(10, abs=0.1)


@pytest.mark.anyio
async def test_bad_push_back_options_are_refused_before_any_call(
    server: RedisServer, name: str
) -> None:
    url = server.url
    with pytest.raises(ConfigurationError, match="adaptive needs max_per_second"):
        RedisLimiter.from_url(url, name, max_at_once=2, adaptive=True)
    with pytest.raises(TypeError, match=r"adaptive must be a bool or an aiometer\.Adaptive"):
        RedisLimiter.from_url(url, name, max_per_second=2, adaptive="yes")
    for bad, message in [
        (Options(factor=1.0), "adaptive factor must be between 1e-06 and 1"),
        (Options(factor=0.0), "adaptive factor must be a finite number > 0"),
        (Options(cooldown=-1.0), "adaptive cooldown must be a finite number >= 0"),
        (Options(floor=0.0), "adaptive floor must be a finite number > 0"),
        (Options(floor=3.0), r"adaptive floor must be <= max_per_second \(2\), got 3"),
        (Options(recovery=math.inf), "adaptive recovery must be a finite number > 0"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            RedisLimiter.from_url(url, name, max_per_second=2, adaptive=bad)
    with pytest.raises(ConfigurationError, match="adaptive needs max_per_second"):
        RedisLimiterGroup(object(), max_at_once=1, adaptive=True)
    async with RedisLimiter.from_url(url, name, max_at_once=2, max_per_second=5) as limiter:
        for value in (-1, math.nan, 86_401):
            with pytest.raises(ConfigurationError, match="seconds must be a finite number"):
                await limiter.pause(value)
        with pytest.raises(TypeError, match="seconds must be a number of seconds, got str"):
            await limiter.pause("1")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="retry_after must be a finite number"):
            await limiter.throttled(retry_after=-0.5)
        with pytest.raises(ConfigurationError, match="give max_at_once, max_per_second or both"):
            await limiter.set_limits()
        with pytest.raises(ConfigurationError, match="max_at_once must be >= 1, got 0"):
            await limiter.set_limits(max_at_once=0)
        with pytest.raises(TypeError, match="max_per_second must be a number, got str"):
            await limiter.set_limits(max_per_second="5")  # type: ignore[arg-type]
        assert (await limiter.statistics()).limits_set == {}
        assert (await limiter.statistics()).paused_for == 0.0
    with pytest.raises(RuntimeError, match="enter the limiter first"):
        await limiter.pause(1)


@pytest.mark.anyio
async def test_pauses_and_push_backs_are_counted_in_metrics(server: RedisServer, name: str) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()

    def count(kind: str) -> float:
        value = registry.get_sample_value(
            "aiometer_pushbacks_total", {"limiter": name, "kind": kind}
        )
        return value or 0.0

    async with RedisLimiter.from_url(
        server.url, name, max_per_second=10, adaptive=True, metrics=registry
    ) as limiter:
        await limiter.pause(0.01)
        assert await limiter.throttled() is True
        assert await limiter.throttled() is False
    assert (count("pause"), count("throttled"), count("cut")) == (1, 2, 1)
