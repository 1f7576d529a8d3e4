"""The in-process limiters, used directly and through the run functions."""

from __future__ import annotations

import functools
import math
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import aiometer

pytestmark = pytest.mark.anyio


def test_public_names() -> None:
    public = {name for name in dir(aiometer) if not name.startswith("_")}
    public.add("__version__")
    assert set(aiometer.__all__) == public
    assert aiometer.__all__ == sorted(aiometer.__all__)


def test_limiters_satisfy_the_protocol() -> None:
    assert isinstance(aiometer.ConcurrencyLimiter(1), aiometer.Limiter)
    assert isinstance(aiometer.RateLimiter(1), aiometer.Limiter)


async def test_concurrency_slot_and_statistics() -> None:
    limiter = aiometer.ConcurrencyLimiter(2)
    async with limiter.slot():
        async with limiter.slot():
            assert limiter.statistics() == aiometer.ConcurrencyStatistics(2, 2, 0)
            with pytest.raises(anyio.WouldBlock):
                limiter.acquire_nowait()
        assert limiter.statistics().held == 1
    assert limiter.statistics() == aiometer.ConcurrencyStatistics(2, 0, 0)


async def test_concurrency_release_is_idempotent() -> None:
    limiter = aiometer.ConcurrencyLimiter(1)
    permit = await limiter.acquire()
    await permit.release()
    await permit.release()
    assert limiter.statistics().held == 0
    other = limiter.acquire_nowait()
    await permit.release()
    assert limiter.statistics().held == 1
    await other.release()


async def test_concurrency_waiters_are_served_in_arrival_order() -> None:
    limiter = aiometer.ConcurrencyLimiter(1)
    order: list[int] = []
    first = await limiter.acquire()

    async def waiter(n: int) -> None:
        async with limiter.slot():
            order.append(n)

    async with anyio.create_task_group() as tg:
        for n in range(5):
            tg.start_soon(waiter, n)
            await anyio.wait_all_tasks_blocked()
        assert limiter.statistics().waiting == 5
        await first.release()
    assert order == [0, 1, 2, 3, 4]


async def test_cancelled_waiter_leaves_nothing_behind() -> None:
    limiter = aiometer.ConcurrencyLimiter(1)
    held = await limiter.acquire()
    with anyio.move_on_after(0.01):
        await limiter.acquire()
    assert limiter.statistics() == aiometer.ConcurrencyStatistics(1, 1, 0)
    await held.release()
    assert limiter.statistics().held == 0


async def test_waiter_cancelled_as_the_slot_is_handed_over_passes_it_on() -> None:
    limiter = aiometer.ConcurrencyLimiter(1)
    held = await limiter.acquire()
    got: list[int] = []
    doomed_scope = anyio.CancelScope()

    async def doomed() -> None:
        with doomed_scope:
            async with limiter.slot():
                await anyio.lowlevel.checkpoint()
                got.append(1)

    async def second() -> None:
        async with limiter.slot():
            got.append(2)

    async with anyio.create_task_group() as tg:
        tg.start_soon(doomed)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        # The slot goes to the doomed waiter, which is cancelled before it can run.
        await held.release()
        doomed_scope.cancel()
    assert got == [2]
    assert limiter.statistics() == aiometer.ConcurrencyStatistics(1, 0, 0)


async def test_concurrency_limit_changes_at_runtime() -> None:
    limiter = aiometer.ConcurrencyLimiter(1)
    held = await limiter.acquire()
    woke = anyio.Event()

    async def waiter() -> None:
        async with limiter.slot():
            woke.set()
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert not woke.is_set()
        limiter.max_at_once = 2
        with anyio.fail_after(1):
            await woke.wait()
    await held.release()
    limiter.max_at_once = 1
    assert limiter.statistics() == aiometer.ConcurrencyStatistics(1, 0, 0)


async def test_rate_limiter_spacing_and_burst() -> None:
    # The burst, at 1/s: the checks run well inside the interval, however the machine stalls.
    limiter = aiometer.RateLimiter(1, burst=3)
    for _ in range(3):
        limiter.acquire_nowait()
    with pytest.raises(anyio.WouldBlock):
        limiter.acquire_nowait()
    stats = limiter.statistics()
    assert stats.max_per_second == 1
    assert stats.burst == 3
    assert 0 < stats.next_start <= 1 + 1e-9
    # The spacing, at 100/s: the burst of 3 and 5 more starts take about 5 intervals (timed
    # from before the burst: a stall after it would refill the bucket).
    limiter = aiometer.RateLimiter(100, burst=3)
    start = anyio.current_time()
    for _ in range(3):
        limiter.acquire_nowait()
    for _ in range(5):
        await limiter.acquire()
    elapsed = anyio.current_time() - start
    assert elapsed >= 0.04


async def test_rate_limiter_changes_at_runtime() -> None:
    limiter = aiometer.RateLimiter(1, burst=1)
    await limiter.acquire()
    assert limiter.statistics().next_start > 0.5
    limiter.max_per_second = 1000
    limiter.burst = 10
    for _ in range(5):
        limiter.acquire_nowait()


async def test_cancelled_rate_waiter_gives_its_start_back() -> None:
    # The waiter's start is 1 s away: it is cancelled long before, however the machine stalls.
    limiter = aiometer.RateLimiter(1)
    await limiter.acquire()
    before = limiter.statistics().next_start
    with anyio.move_on_after(0.01):
        await limiter.acquire()
    assert limiter.statistics().waiting == 0
    # The reservation was returned: the next start is no later than before the waiter came.
    assert limiter.statistics().next_start <= before


async def test_rate_limiter_shared_by_concurrent_runs() -> None:
    from aiometer_redis.testing import window_violations

    limiter = aiometer.RateLimiter(100)
    starts: list[float] = []

    async def record(_: Any) -> None:
        starts.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(
                functools.partial(aiometer.run_on_each, record, range(10), limiter=limiter)
            )
    assert len(starts) == 30
    assert window_violations(starts, 100, 1, [0.01, 0.05, 0.1, 0.2]) == []


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: aiometer.ConcurrencyLimiter(0), "max_at_once must be >= 1, got 0"),
        (lambda: aiometer.RateLimiter(0), "max_per_second must be a finite number > 0, got 0"),
        (lambda: aiometer.RateLimiter(math.nan), "got nan"),
        (lambda: aiometer.RateLimiter(1, burst=0), "burst must be >= 1, got 0"),
        (lambda: aiometer.RateLimiter(), "needs max_per_second or rates, got neither"),
        (lambda: aiometer.RateLimiter(None, rates=[]), "needs max_per_second or rates"),
    ],
)
def test_bad_limiter_values(factory: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (
            lambda: aiometer.ConcurrencyLimiter(1.0),  # type: ignore[arg-type]
            "max_at_once must be an int, got float",
        ),
        (
            lambda: aiometer.RateLimiter("1"),  # type: ignore[arg-type]
            "max_per_second must be a number, got str",
        ),
        (
            lambda: aiometer.RateLimiter(1, burst=2.0),  # type: ignore[arg-type]
            "burst must be an int, got float",
        ),
    ],
)
def test_bad_limiter_types(factory: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        factory()


def test_runtime_changes_are_validated() -> None:
    concurrency = aiometer.ConcurrencyLimiter(1)
    with pytest.raises(ValueError, match="max_at_once must be >= 1"):
        concurrency.max_at_once = 0
    rate = aiometer.RateLimiter(1)
    with pytest.raises(ValueError, match="max_per_second must be a finite number"):
        rate.max_per_second = -1
    assert concurrency.max_at_once == 1
    assert rate.max_per_second == 1


async def test_permits_taken_for_an_item_that_never_runs_are_refunded() -> None:
    """A run whose item got a start from a rate limiter and then waited on a later limiter
    until it was cancelled: nothing ran, so the start's cost is refunded to the windows
    (before: 4 of the 10 units of the hour stayed used)."""
    quota = aiometer.RateLimiter(rates=[aiometer.Rate(10, per=3600)])
    slots = aiometer.ConcurrencyLimiter(1)
    held = await slots.acquire()
    ran: list[int] = []

    async def task(item: int) -> None:
        ran.append(item)

    with anyio.move_on_after(0.1):
        await aiometer.run_on_each(task, [1], limiter=[quota, slots], cost=4)
    assert ran == []
    assert quota.statistics().used == (0.0,)
    await held.release()
    # The quota still works: 10 units in the hour, no more.
    await aiometer.run_on_each(task, [2, 3], limiter=quota, cost=5)
    assert ran == [2, 3]
    assert quota.statistics().used == (10.0,)
