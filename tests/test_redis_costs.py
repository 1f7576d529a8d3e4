"""RedisLimiter with costs, Rate windows and settle, against a real redis-server, on both
backends (redis-py on asyncio, coredis on trio); and a limiter shared by processes running
the previous version's scripts (a rolling deploy)."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

import aiometer
from aiometer import Rate
from aiometer_redis import AcquireTimeoutError, ConfigurationError, RedisLimiter, RedisLimiterGroup
from aiometer_redis._client import ScriptClient, client_from_url
from aiometer_redis._keys import KEY_SUFFIXES, limiter_keys
from aiometer_redis._scripts import Script, decode_acquire_reply
from aiometer_redis.testing import RedisServer, max_overlap, window_violations

pytestmark = pytest.mark.redis

PREVIOUS_LUA = Path(__file__).parent / "helpers" / "previous_lua"


def weighted_violations(
    starts: Sequence[tuple[float, float]], limit: float, per: float
) -> list[tuple[float, float]]:
    """(window start, cost inside) of every half-open window of *per* seconds, opened at a
    start, whose starts cost more than *limit*."""
    ordered = sorted(starts)
    out = []
    for first, _ in ordered:
        inside = sum(cost for start, cost in ordered if first <= start < first + per)
        if inside > limit + 1e-9:
            out.append((first, inside))
    return out


# -- costs and windows ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_costs_in_windows_hold_across_limiters(
    server: RedisServer, name: str, raw: Any
) -> None:
    # Two limiter objects (two "processes") share the windows. Each start is judged at the
    # time the server gave it (its grants entry, "<token>|<start_at_us>[|<cost>]", read while
    # the slot is held): the times the client sees lag those by a round trip, more when the
    # machine stalls the test's event loop, and starts it sees late can bunch.
    rates = [Rate(12, per=0.5), Rate(4, per=0.25, counts="calls")]
    costs = [3, 1, 5, 0.5, 2, 4, 1, 2.5, 3, 1, 6, 2] * 2
    grants_key = limiter_keys(name)[KEY_SUFFIXES.index("grants")]
    starts: list[tuple[float, float]] = []
    granted: list[tuple[float, float]] = []

    async def worker(limiter: RedisLimiter, mine: Sequence[float]) -> None:
        for cost in mine:
            async with limiter.slot(cost=cost) as permit:
                starts.append((time.monotonic(), cost))
                assert permit.cost == cost
                entry = await raw.hget(grants_key, permit.lease_id)
                granted.append((int(entry.split("|")[1]) / 1e6, cost))
                await anyio.sleep(0.01)

    options: dict[str, Any] = {"max_at_once": 4, "rates": rates}
    async with (
        RedisLimiter.from_url(server.url, name, **options) as first,
        RedisLimiter.from_url(server.url, name, **options) as second,
        anyio.create_task_group() as tg,
    ):
        for n in range(4):
            tg.start_soon(worker, first if n % 2 else second, costs[n::4])
    assert len(starts) == len(granted) == len(costs)
    # A millisecond off each window: the window logs' own edges are not what is tested here.
    assert weighted_violations(granted, 12, 0.5 - 0.001) == []
    calls = [(start, 1.0) for start, _ in granted]
    assert weighted_violations(calls, 4, 0.25 - 0.001) == []
    # Not slower than the windows allow: 12 per 0.5 s is 24 units a second.
    elapsed = max(s for s, _ in starts) - min(s for s, _ in starts)
    assert elapsed >= (sum(costs) - 12) / 24 * 0.9
    assert elapsed <= (sum(costs) / 24) * 1.5 + 0.5


@pytest.mark.anyio
async def test_cost_counts_in_max_per_second(server: RedisServer, name: str) -> None:
    starts: list[tuple[float, float]] = []
    async with RedisLimiter.from_url(server.url, name, max_per_second=20, burst=4) as limiter:
        for cost in [4, 1, 3, 2, 4, 2, 1, 3]:
            await limiter.acquire(cost=cost)
            starts.append((time.monotonic(), float(cost)))
    # 20 units a second with bursts of 4: 20 units took about (20 - 4) / 20 s.
    elapsed = starts[-1][0] - starts[0][0]
    assert (20 - 4 - 3) / 20 * 0.9 <= elapsed <= (20 - 4) / 20 + 0.4
    # No more than the burst plus what the rate refills within any window.
    for width in (0.2, 0.5):
        assert weighted_violations(starts, 4 + 20 * width, width) == []


@pytest.mark.anyio
async def test_settle_refunds_and_charges_the_window(server: RedisServer, name: str) -> None:
    async with RedisLimiter.from_url(server.url, name, rates=[Rate(10, per=1.5)]) as limiter:
        permit = await limiter.acquire(cost=10)
        await permit.settle(2)
        assert permit.cost == 2
        began = anyio.current_time()
        # Refunded: 8 more fit in the window at once.
        await limiter.acquire(cost=8)
        assert anyio.current_time() - began < 0.5
        # Charged: settling 2 up to 5 overspends the window by 5: the next unit waits until
        # the first start leaves it (1.5 s after it).
        await permit.settle(5)
        await limiter.acquire(cost=1)
        assert anyio.current_time() - began >= 1.2
        # Settle after release, and a settle to the same value, are fine.
        await permit.release()
        await permit.settle(5)
        await permit.settle(0)


@pytest.mark.anyio
async def test_settle_of_max_per_second(server: RedisServer, name: str) -> None:
    async with RedisLimiter.from_url(
        server.url, name, max_at_once=3, max_per_second=2, burst=4
    ) as limiter:
        permit = await limiter.acquire(cost=4)
        # Nothing reserved since: the refund applies, and the next 3 units start at once.
        await permit.settle(1)
        began = anyio.current_time()
        async with limiter.slot(cost=3):
            assert anyio.current_time() - began < 0.3
        await permit.release()


@pytest.mark.anyio
async def test_impossible_and_bad_costs_are_refused_before_redis(
    server: RedisServer, name: str
) -> None:
    # Not entered: any Redis call would fail with RuntimeError first.
    limiter = RedisLimiter.from_url(
        server.url,
        name,
        max_per_second=5,
        rates=[Rate(100, per=60), Rate(3, per=1, counts="calls")],
    )
    with pytest.raises(
        ConfigurationError,
        match=r"cost 500 can never start: max_per_second allows bursts of at most 1 \(raise",
    ):
        await limiter.acquire(cost=500)
    wide = RedisLimiter.from_url(server.url, name, rates=[Rate(100, per=60)])
    with pytest.raises(
        ConfigurationError, match=r"cost 100\.5 can never start: Rate\(100, per=60\)"
    ):
        await wide.acquire(cost=100.5)
    with pytest.raises(ConfigurationError, match="cost 7 can never start"):
        async with limiter.slot(cost=7):
            pass
    bad_costs: list[tuple[Any, type[Exception]]] = [
        ("3", TypeError),
        (True, TypeError),
        (0, ConfigurationError),
        (-1, ConfigurationError),
        (float("nan"), ConfigurationError),
        (float("inf"), ConfigurationError),
        (1e-7, ConfigurationError),
    ]
    for bad, error in bad_costs:
        with pytest.raises(error, match="cost"):
            await wide.acquire(cost=bad)
    # A calls window may allow fewer calls than a cost: the cost is not its business.
    calls_only = RedisLimiter.from_url(server.url, name, rates=[Rate(1, per=1, counts="calls")])
    async with calls_only:
        await calls_only.acquire(cost=50)


@pytest.mark.anyio
async def test_run_functions_refuse_an_impossible_cost_before_any_work(
    server: RedisServer, name: str
) -> None:
    calls: list[int] = []

    async def task(n: int) -> None:
        calls.append(n)

    async with RedisLimiter.from_url(server.url, name, rates=[Rate(10, per=60)]) as limiter:
        assert limiter.check_cost(10) == 10.0
        with pytest.raises(ConfigurationError, match=r"cost 11 can never start"):
            await aiometer.run_on_each(task, range(3), limiter=limiter, cost=11)
        assert calls == []
        # A cost function is asked per item: that item fails, as its task would.
        with pytest.raises(ConfigurationError, match=r"cost 20 can never start"):
            await aiometer.run_on_each(task, [1, 2], limiter=limiter, cost=lambda n: 10 * n)
        assert calls == [1]
    # settle= settles every permit: 10 units charged, 4 spent, 6 given back at once. (A limiter
    # of its own: the first one's window is full for a minute.)
    async with RedisLimiter.from_url(
        server.url, f"{name}-settle", rates=[Rate(10, per=60)]
    ) as fresh:
        await aiometer.run_on_each(task, [5], limiter=fresh, cost=10, settle=lambda n, result: 4)
        stats = await fresh.statistics()
        assert stats.rates_used == (4.0,)


@pytest.mark.anyio
async def test_settle_checks_actual_and_is_a_no_op_without_a_rate(
    server: RedisServer, name: str
) -> None:
    async with (
        RedisLimiter.from_url(server.url, name, max_at_once=1) as limiter,
        limiter.slot(cost=3) as permit,
    ):
        await permit.settle(10)
        await permit.settle(0)
        assert permit.cost == 0
        bad_actuals: list[tuple[Any, type[Exception]]] = [
            ("1", TypeError),
            (-0.5, ValueError),
            (float("nan"), ValueError),
        ]
        for bad, error in bad_actuals:
            with pytest.raises(error, match="actual"):
                await permit.settle(bad)


def test_rates_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="two windows of per=60 counting cost"):
        RedisLimiter.from_url("redis://127.0.0.1:6379", "x", rates=[Rate(1, 60), Rate(2, 60.0)])
    with pytest.raises(TypeError, match=r"rates must hold aiometer\.Rate"):
        RedisLimiter.from_url("redis://127.0.0.1:6379", "x", rates=[(5, 60)])
    with pytest.raises(TypeError, match="rates must be a sequence of Rate"):
        RedisLimiter.from_url("redis://127.0.0.1:6379", "x", rates=Rate(5, 60))
    with pytest.raises(ConfigurationError, match="give max_at_once, max_per_second"):
        RedisLimiter.from_url("redis://127.0.0.1:6379", "x", rates=[])
    # A rate-only limiter with windows alone is fine, and so are calls and cost of one per.
    RedisLimiter.from_url(
        "redis://127.0.0.1:6379", "x", rates=[Rate(1, 60), Rate(2, 60, counts="calls")]
    )


@pytest.mark.anyio
async def test_window_keys_share_the_hash_tag_and_reset_deletes_them(
    server: RedisServer, name: str, raw: Any
) -> None:
    rates = [Rate(5, per=30), Rate(2, per=10, counts="calls")]
    async with RedisLimiter.from_url(server.url, name, max_at_once=2, rates=rates) as limiter:
        assert limiter.keys[8:] == (
            f"aiometer:{{{name}}}:costs",
            f"aiometer:{{{name}}}:control",
            f"aiometer:{{{name}}}:window:30000000:cost",
            f"aiometer:{{{name}}}:window:10000000:calls",
        )
        permit = await limiter.acquire(cost=2)
        await permit.release()
        # A window log lives past its window by key_ttl (here per_max + 60 s = 90 s); costs
        # as long as the longest log.
        costs, _, cost_log, calls_log = limiter.keys[8:]
        for key, ttl in [(costs, 120_000), (cost_log, 120_000), (calls_log, 100_000)]:
            assert ttl - 1_000 < await raw.pttl(key) <= ttl
        await limiter.reset()
        assert [await raw.pttl(key) for key in limiter.keys] == [-2] * len(limiter.keys)


# -- rolling deploy: the previous version's scripts next to these --------------------------------


def previous_script(name: str) -> Script:
    """A script of the previous version (before costs), sent the way that version sent it."""
    parts = ["_read", "_shared", name] if name != "status" else ["_read", name]
    source = "\n".join((PREVIOUS_LUA / f"{part}.lua").read_text("utf-8") for part in parts)
    return Script.from_source(f"previous_{name}", source)


class PreviousProcess:
    """Takes and gives back slots with the previous scripts, as one process of the old version
    would (waiting in the queue by asking again, which its scripts make idempotent)."""

    def __init__(self, client: ScriptClient, limiter: RedisLimiter) -> None:
        self.client = client
        # The old header is the new one without the window spec; the old keys the first 8.
        self.header = list(limiter.script_header[:7])
        self.keys = list(limiter.keys[:8])
        self.acquire_script = previous_script("acquire")
        self.release_script = previous_script("release")
        self.count = 0

    async def run(self, script: Script, *args: str) -> Any:
        return await self.client.run_script(script, self.keys, [*self.header, *args])

    async def acquire(self) -> str:
        self.count += 1
        waiter = f"00000000000000aa:{self.count}"
        while True:
            [reply] = decode_acquire_reply(await self.run(self.acquire_script, waiter))
            if reply[0] == 1:
                await anyio.sleep(reply[2] / 1e6)
                return waiter
            await anyio.sleep(0.005)

    async def release(self, lease_id: str) -> None:
        await self.run(self.release_script, lease_id)


@pytest.mark.anyio
async def test_previous_version_shares_a_limiter_without_rates(
    server: RedisServer, name: str
) -> None:
    intervals: list[tuple[float, float]] = []

    async def task() -> None:
        began = time.monotonic()
        await anyio.sleep(0.03)
        intervals.append((began, time.monotonic()))

    async def new_worker(limiter: RedisLimiter, n: int) -> None:
        for _ in range(n):
            async with limiter.slot():
                await task()

    async def old_worker(old: PreviousProcess, n: int) -> None:
        for _ in range(n):
            lease = await old.acquire()
            try:
                await task()
            finally:
                await old.release(lease)

    async with (
        RedisLimiter.from_url(server.url, name, max_at_once=3, max_per_second=40) as limiter,
        client_from_url(server.url) as client,
    ):
        old = PreviousProcess(client, limiter)
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(new_worker, limiter, 10)
                tg.start_soon(old_worker, old, 10)
    assert len(intervals) == 60
    assert max_overlap(intervals) <= 3
    starts = [began for began, _ in intervals]
    assert window_violations(starts, 40, 1, [0.1, 0.3, 0.5]) == []


@pytest.mark.anyio
async def test_group_gives_every_key_its_own_windows(server: RedisServer, name: str) -> None:
    async with (
        client_from_url(server.url) as client,
        RedisLimiterGroup(client, rates=[Rate(4, per=5)]) as sites,
    ):
        began = anyio.current_time()
        for site in ("a", "b"):
            await sites[f"{name}-{site}"].acquire(cost=4)
        # Each key has its own 4 per 5 s: both started at once; one more unit on "a" waits.
        assert anyio.current_time() - began < 1
        with pytest.raises(TimeoutError), anyio.fail_after(0.5):
            await sites[f"{name}-a"].acquire(cost=1)


@pytest.mark.anyio
async def test_statistics_report_the_use_of_each_window(server: RedisServer, name: str) -> None:
    rates = [Rate(10, per=60), Rate(5, per=60, counts="calls")]
    async with RedisLimiter.from_url(server.url, name, max_at_once=3, rates=rates) as limiter:
        for cost in (2.5, 4):
            async with limiter.slot(cost=cost):
                pass
        stats = await limiter.statistics()
        assert stats.rates == tuple(rates)
        assert stats.rates_used == (6.5, 2)


@pytest.mark.anyio
async def test_local_fallback_takes_costs_and_settles_its_own_permit() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens there: after retry_window the in-process stand-in takes over.
    async with RedisLimiter.from_url(
        f"redis://127.0.0.1:{port}/0",
        "down",
        max_at_once=2,
        max_per_second=1000,
        burst=10,
        rates=[Rate(50, per=60)],
        retry_window=0.2,
        on_unavailable="local",
    ) as limiter:
        permit = await limiter.acquire(cost=5)
        assert permit.fallback
        assert permit.cost == 5
        await permit.settle(2)
        assert permit.cost == 2
        await permit.release()
        # Impossible costs are refused the same way in the fallback.
        with pytest.raises(ConfigurationError, match="cost 11 can never start"):
            await limiter.acquire(cost=11)


@pytest.mark.anyio
async def test_a_start_taken_for_an_item_that_never_runs_is_refunded(
    server: RedisServer, name: str
) -> None:
    """run_on_each with two Redis limiters: the first grants the item's start (cost 4), the
    second times out. Nothing ran, so the start is refunded to the first one's window (before
    the fix the hour's quota kept 4 units used)."""
    async with (
        RedisLimiter.from_url(server.url, f"{name}-quota", rates=[Rate(10, per=3600)]) as quota,
        RedisLimiter.from_url(
            server.url, f"{name}-slots", max_at_once=1, acquire_timeout=0.05
        ) as slots,
    ):
        held = await slots.acquire()
        ran: list[int] = []

        async def task(item: int) -> None:
            ran.append(item)

        with pytest.raises(AcquireTimeoutError):
            await aiometer.run_on_each(task, [1], limiter=[quota, slots], cost=4)
        assert ran == []
        assert (await quota.statistics()).rates_used == (0.0,)
        await held.release()
