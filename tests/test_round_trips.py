"""Rate reservations of a rate-only RedisLimiter: a script call also reserves the next starts of
the fleet for the same process, which hands them out locally at their times, never earlier;
starts it does not use are given back on exit, and a cancelled caller's start goes to the next.

The fleet tests judge the schedule the scripts made (every start's time, read back from Redis:
the same clock as the workers' on one machine) against the exact GCRA window bound, and each
start the workers handed out against its scheduled time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from helpers.fleet import run_workers

import aiometer_redis._limiter
import aiometer_redis._reserve
from aiometer_redis import AcquireTimeoutError, RedisLimiter
from aiometer_redis._reserve import AHEAD, LATE, ReservePool, reserve_cap
from aiometer_redis.testing import RedisServer, window_violations

WORKER = Path(__file__).parent / "helpers" / "reserve_worker.py"
CLIENTS = [
    pytest.param(["--backend", "asyncio", "--client", "redis"], id="asyncio-redis"),
    pytest.param(["--backend", "trio", "--client", "coredis"], id="trio-coredis"),
]


async def _reserve_one(limiter: RedisLimiter) -> tuple[float, str, int]:
    """Acquire once (a limiter of 40/s reserves one start ahead) and return the start reserved
    ahead, left in the pool."""
    await limiter.acquire()
    (reserved,) = limiter._pool.ahead(0.0)
    limiter._pool.put(*reserved)
    return reserved


async def _cancel_sleeping_caller(limiter: RedisLimiter) -> None:
    """A caller that takes the start at the head of the pool (25 ms away), cancelled 5 ms into
    its sleep towards it: meanwhile the tasks started before run."""
    with anyio.move_on_after(0.005) as scope:
        await limiter.acquire()
    assert scope.cancelled_caught


async def _beside_a_cancelled_caller(
    limiter: RedisLimiter, then: Callable[[], None]
) -> tuple[int, float]:
    """Another caller's acquisition, begun while a caller of the same limiter sleeps towards
    the start at the head of the pool and is cancelled (see _cancel_sleeping_caller); *then*
    runs after the cancellation. Returns the other caller's token and the time it began."""
    taken: list[tuple[int, float]] = []

    async def other() -> None:
        permit = await limiter.acquire()
        taken.append((permit.token, anyio.current_time()))

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(other)  # runs once the caller below sleeps
        await _cancel_sleeping_caller(limiter)
        assert taken == []
        then()
    return taken[0]


# -- the pool's bookkeeping (no Redis) -----------------------------------------------------------


def test_cap_follows_the_rate() -> None:
    assert reserve_cap(10) == 1  # 50 ms hold half a start: nothing is reserved ahead
    assert reserve_cap(100) == 5
    assert reserve_cap(1e6) == 64


def test_pool_hands_out_in_order_and_drops_late_starts() -> None:
    pool = ReservePool(cap=8)
    pool.put(1.003, "p:2", 2)
    pool.put(1.001, "p:1", 1)
    pool.put(0.990, "p:0", 0)  # more than LATE behind 1.0: dropped, never handed out
    assert pool.take(1.0, None) == (1.001, "p:1", 1)
    assert pool.dropped == 1
    # A deadline before the next start: nothing for that caller, the start stays.
    assert pool.take(1.0, deadline=1.002) is None
    assert len(pool) == 1
    assert pool.take(1.003 + LATE + 1e-6, None) is None
    assert pool.dropped == 2


def test_pool_sizes_calls_by_the_recent_rate() -> None:
    pool = ReservePool(cap=64)
    assert pool.wanted(0.0) == 1  # no measurement yet: one ahead
    now = 0.0
    sizes = []
    for _ in range(7):  # 25 starts per 10 ms: 2500 per second
        for _ in range(25):
            pool.handed()
        now += 0.010
        sizes.append(pool.wanted(now))
    # The size doubles call after call up to what the rate uses in AHEAD (50 starts).
    assert sizes == [2, 4, 8, 16, 32, 50, 50]
    assert round(2500 * AHEAD) == 50
    for i in range(20):
        pool.put(now + i / 1000, f"p:{i}", i)
    assert pool.running_low()  # 20 held: less than half of the 50 aimed at
    for i in range(20, 30):
        pool.put(now + i / 1000, f"p:{i}", i)
    assert not pool.running_low()
    # A start dropped (not taken within LATE): the next call aims at half as many.
    assert pool.take(now + 0.021 + LATE + 1e-6, None) is not None
    assert pool.dropped > 0
    for _ in range(25):
        pool.handed()
    now += 0.010
    assert pool.wanted(now) == 25 - len(pool)  # half of 50
    # Nothing handed out for a second: the estimate falls and so does the size of a call.
    assert pool.wanted(now + 1.0) == 0


def test_pool_gives_back_what_is_still_ahead_latest_first() -> None:
    pool = ReservePool(cap=8)
    for i, at in enumerate([0.5, 2.0, 3.0, 1.5]):
        pool.put(at, f"p:{i}", i)
    assert [entry[1] for entry in pool.ahead(1.0)] == ["p:2", "p:1", "p:3"]
    assert len(pool) == 0


# -- one process ------------------------------------------------------------------------------


def _evalsha_calls(server: RedisServer) -> int:
    with redis.Redis.from_url(server.url) as raw:
        stats = raw.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def _tat_us(server: RedisServer, limiter: RedisLimiter) -> float:
    with redis.Redis.from_url(server.url) as raw:
        return float(raw.get(limiter.keys[3]))


@pytest.mark.redis
@pytest.mark.anyio
async def test_one_call_serves_the_next_acquisition(server: RedisServer, name: str) -> None:
    async with RedisLimiter.from_url(server.url, name, max_per_second=50) as limiter:
        first = await limiter.acquire()
        if limiter._refill is not None:  # a top-up started in the background meanwhile
            await limiter._refill.wait()
        # The first call reserved the next start too: the next acquisition takes it locally.
        reserved, *later = sorted(limiter._pool.ahead(0.0))
        assert reserved[2] == first.token + 1
        for entry in (reserved, *later):
            limiter._pool.put(*entry)
        second = await limiter.acquire()
        # The reserved start, from the pool. (On a machine busy enough to wake the caller more
        # than LATE after that start, it was dropped and the caller took a later one.)
        if limiter._pool.dropped:
            assert second.token > reserved[2]
        else:
            assert second.token == reserved[2]
        assert anyio.current_time() >= reserved[0]


@pytest.mark.redis
@pytest.mark.anyio
async def test_callers_waiting_together_share_one_call(server: RedisServer, name: str) -> None:
    async with RedisLimiter.from_url(server.url, name, max_per_second=1000) as limiter:
        tokens: list[int] = []

        async def take() -> None:
            tokens.append((await limiter.acquire()).token)

        before = _evalsha_calls(server)
        async with anyio.create_task_group() as task_group:
            for _ in range(16):
                task_group.start_soon(take)
        # The first call goes out alone; the 15 callers that queued behind it are served by
        # the next one (a background top-up may add a call).
        assert _evalsha_calls(server) - before <= 3
        assert sorted(tokens) == list(range(min(tokens), min(tokens) + 16))


@pytest.mark.redis
@pytest.mark.anyio
async def test_starts_handed_out_back_to_back_schedule_one_top_up(
    server: RedisServer, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # However long the machine holds the test up, the starts below stay due, never late.
    monkeypatch.setattr(aiometer_redis._reserve, "LATE", 60.0)
    monkeypatch.setattr(aiometer_redis._limiter, "LATE", 60.0)
    async with RedisLimiter.from_url(server.url, name, max_per_second=1000) as limiter:
        await limiter.acquire()
        if limiter._refill is not None:
            await limiter._refill.wait()
        pool = limiter._pool
        pool.ahead(0.0)  # emptied: only the starts below are handed out
        now = anyio.current_time()
        for n in range(10):
            pool.put(now, f"{name}:due:{n}", n)
        pool._target = 100  # the pool runs low from here on
        prefetch = limiter._prefetch
        runs = 0

        async def counted() -> None:
            nonlocal runs
            runs += 1
            await prefetch()

        limiter._prefetch = counted  # type: ignore[method-assign]
        # All ten are due: each acquisition returns at once, and the top-up scheduled by the
        # first has not run yet when the next ones find the pool low.
        for n in range(10):
            assert (await limiter.acquire()).token == n
        await anyio.sleep(0.05)
        assert runs == 1


@pytest.mark.redis
@pytest.mark.anyio
async def test_reservations_are_given_back_on_exit(server: RedisServer, name: str) -> None:
    interval_us = 1e6 / 40
    async with RedisLimiter.from_url(server.url, name, max_per_second=40) as limiter:
        first = await limiter.acquire()
        ahead = len(limiter._pool)
        assert ahead >= 1
        reserved_tat = _tat_us(server, limiter)
    # Every start reserved ahead (still to come) went back to the fleet: the rate state is as
    # if only the first start had been taken, and the next process gets the very next start.
    assert _tat_us(server, limiter) == pytest.approx(reserved_tat - ahead * interval_us, abs=2)
    async with RedisLimiter.from_url(server.url, name, max_per_second=40) as other:
        other._reserving = False
        begun = time.time()
        await other.acquire()
        assert time.time() - begun < 1 / 40 + 0.015
    assert first.token > 0


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_cancelled_caller_gives_its_reserved_start_back(
    server: RedisServer, name: str
) -> None:
    async with (
        RedisLimiter.from_url(server.url, name, max_per_second=40) as limiter,
        RedisLimiter.from_url(server.url, name, max_per_second=40) as other,
    ):
        other._reserving = False  # another process, one call per start
        reserved = await _reserve_one(limiter)
        # No top-up in the background meanwhile (it would move the rate state too).
        limiter._refill = in_flight = anyio.Event()
        await _cancel_sleeping_caller(limiter)
        limiter._refill = None
        in_flight.set()
        # Nobody else of this process waited for a start: it is not kept in the pool but given
        # back to the fleet, so the other process's next start is that one (not one after the
        # starts reserved since).
        assert reserved[1] not in [entry[1] for entry in limiter._pool.ahead(0.0)]
        await other.acquire()
        # (Each process learns the time of a start from its own reply: a few ms apart.)
        assert reserved[0] - 0.01 <= anyio.current_time() < reserved[0] + 0.015


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_cancelled_callers_start_goes_to_a_caller_waiting_for_the_call_in_flight(
    server: RedisServer, name: str
) -> None:
    async with RedisLimiter.from_url(server.url, name, max_per_second=40) as limiter:
        reserved = await _reserve_one(limiter)
        limiter._refill = in_flight = anyio.Event()  # a call in flight, not answered yet

        def answered() -> None:
            limiter._refill = None
            in_flight.set()

        # The other caller finds the pool empty and waits for that call.
        token, _ = await _beside_a_cancelled_caller(limiter, answered)
        # It took the start the cancelled caller gave up.
        assert token == reserved[2]
        assert limiter._pool.dropped == 0


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_cancelled_callers_start_goes_back_while_another_makes_its_own_call(
    server: RedisServer, name: str
) -> None:
    async with RedisLimiter.from_url(server.url, name, max_per_second=40) as limiter:
        reserved = await _reserve_one(limiter)
        limiter._pool._target = 0  # no top-up in the background
        submit = limiter._submit_items
        gate = anyio.Event()

        async def held(items: list[str], start: float) -> list[Any]:
            await gate.wait()
            return await submit(items, start)

        limiter._submit_items = held  # type: ignore[method-assign]
        # The other caller finds the pool empty and no call in flight: it makes its own (held
        # before it is sent), which never looks at the pool.
        _, begun = await _beside_a_cancelled_caller(limiter, gate.set)
        # The cancelled caller's start went back to the fleet (not into the pool, where it
        # would have passed unused): the next reservation, the other caller's, took it.
        assert reserved[1] not in [entry[1] for entry in limiter._pool.ahead(0.0)]
        assert limiter._pool.dropped == 0
        # (Each call learns the time of a start from its own reply: a few ms apart; a start
        # after those reserved would be 25 ms later.)
        assert reserved[0] - 0.01 <= begun < reserved[0] + 0.015


@pytest.mark.redis
@pytest.mark.anyio
async def test_not_idle_while_it_holds_starts_reserved_ahead(
    server: RedisServer, name: str
) -> None:
    async with RedisLimiter.from_url(server.url, name, max_per_second=40) as limiter:
        reserved = await _reserve_one(limiter)
        # A group would close an idle limiter: not while a start is reserved for it.
        assert not limiter.is_idle()
        await anyio.sleep(reserved[0] + LATE + 0.005 - anyio.current_time())
        assert limiter.is_idle()  # the start passed unused: dropped
        assert limiter._pool.dropped == 1


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_deadline_before_the_reserved_start_asks_redis(
    server: RedisServer, name: str
) -> None:
    async with RedisLimiter.from_url(
        server.url, name, max_per_second=40, acquire_timeout=0.01
    ) as limiter:
        await limiter.acquire()
        assert len(limiter._pool) == 1  # its start is 25 ms away: past the 10 ms timeout
        (reserved,) = limiter._pool.ahead(0.0)
        limiter._pool.put(*reserved)
        with pytest.raises(AcquireTimeoutError):
            await limiter.acquire()
        # The reserved start stays for a caller that can wait for it.
        assert limiter._pool.take(anyio.current_time(), None) == reserved


# -- fleets -----------------------------------------------------------------------------------


def _run_fleet(
    server: RedisServer, name: str, tmp_path: Path, per_process: Sequence[Sequence[str]]
) -> list[tuple[int, float]]:
    common = ["--url", server.url, "--name", name]
    outs, _ = run_workers(WORKER, common, per_process, tmp_path, duration=2.0, lead=2.0)
    starts: list[tuple[int, float]] = []
    for out in outs:
        recorded = json.loads(out.read_text())["starts"]
        starts.extend((int(token), float(at)) for token, at in recorded)
    return starts


def _schedule(server: RedisServer, name: str) -> dict[int, float]:
    """Every start the scripts reserved and nobody gave back: token -> time (seconds)."""
    with redis.Redis.from_url(server.url, decode_responses=True) as raw:
        (key,) = list(raw.scan_iter(f"*{{{name}}}:grants"))
        entries = raw.hgetall(key)
    schedule = {}
    for entry in entries.values():
        token, start_us = entry.split("|")[:2]
        schedule[int(token)] = int(start_us) / 1e6
    return schedule


def _check_fleet(
    schedule: dict[int, float], starts: list[tuple[int, float]], rate: float, burst: int
) -> None:
    widths = [1 / rate, 2 / rate, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]
    # The schedule the fleet shares holds the GCRA bound exactly.
    assert window_violations(list(schedule.values()), rate, burst, widths) == []
    # Every start handed out was scheduled, and none began before its time.
    early = [(token, at - schedule[token]) for token, at in starts if at < schedule[token]]
    assert early == []
    times = sorted(at for _, at in starts)
    achieved = (len(times) - 1) / (times[-1] - times[0])
    # Reached (a loose bound: the share is measured in bench/, not here).
    assert achieved >= 0.5 * rate


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("coroutines", [1, 4])
def test_fleet_schedule_is_exact_with_reservations(
    server: RedisServer, name: str, tmp_path: Path, client: list[str], coroutines: int
) -> None:
    # 400/s: a call reserves up to 20 starts ahead. Three processes reserve ahead, a fourth
    # takes one start per call: they share one schedule.
    rate = 400.0
    options = ["--max-per-second", str(rate), "--coroutines", str(coroutines), *client]
    per_process = [options] * 3 + [[*options, "--one-at-a-time"]]
    starts = _run_fleet(server, name, tmp_path, per_process)
    _check_fleet(_schedule(server, name), starts, rate, 1)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_killed_holder_of_reservations(
    server: RedisServer, name: str, tmp_path: Path, client: list[str]
) -> None:
    rate = 200.0
    limits = ["--max-per-second", str(rate), *client]
    holder = subprocess.Popen(
        [sys.executable, str(WORKER), "--url", server.url, "--name", name, "--hold", "3", *limits],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "HOLDING"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    before = _schedule(server, name)
    assert len(before) > 3  # it died holding starts reserved ahead
    # Those starts are lost, and only those: the schedule (theirs included) holds the bound,
    # and the fleet after it reaches the rate.
    starts = _run_fleet(server, name, tmp_path, [[*limits, "--coroutines", "2"]] * 3)
    schedule = _schedule(server, name)
    assert before.items() <= schedule.items()
    _check_fleet(schedule, starts, rate, 1)
