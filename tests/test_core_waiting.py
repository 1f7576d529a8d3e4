"""Targeted wake-ups: where many tasks wait for one condition, one freed place wakes one task.

Each test blocks several tasks on one condition, frees a single place and counts how many
waiting tasks were resumed (the ``wakeups`` fixture replaces the events of the waiter queues,
and ``anyio.Event`` for any other wait, with counting ones). Nothing is timed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import pytest

import aiometer
import aiometer._waiting

pytestmark = pytest.mark.anyio


class WakeCounter:
    """Counts the waits on ``anyio.Event`` that returned, i.e. the tasks resumed."""

    def __init__(self) -> None:
        self.woken = 0

    async def settle(self) -> int:
        """Let every task run until all are blocked again; return the wake-ups counted."""
        await anyio.wait_all_tasks_blocked()
        woken, self.woken = self.woken, 0
        return woken


@pytest.fixture
def wakeups(monkeypatch: pytest.MonkeyPatch) -> WakeCounter:
    counter = WakeCounter()
    real_event = anyio.Event

    class CountingEvent:
        def __init__(self) -> None:
            self._event = real_event()

        def set(self) -> None:
            self._event.set()

        def is_set(self) -> bool:
            return self._event.is_set()

        async def wait(self) -> bool:
            await self._event.wait()
            counter.woken += 1
            return True

    # The engine's own waiter queues use the cheapest event of the running loop; any shared
    # anyio.Event (the herd this guards against) is counted too.
    monkeypatch.setattr(anyio, "Event", CountingEvent)
    monkeypatch.setattr(aiometer._waiting, "_new_signal", CountingEvent)
    return counter


# The test's own events, bound before the fixture replaces anyio.Event: not counted.
_TestEvent = anyio.Event


class Gates:
    """Per-item events: ``await gates.wait(i)`` blocks until ``gates.open(i)``."""

    def __init__(self) -> None:
        self._events: dict[int, anyio.Event] = {}

    def _event(self, index: int) -> anyio.Event:
        if index not in self._events:
            self._events[index] = _TestEvent()
        return self._events[index]

    async def wait(self, index: int) -> int:
        await self._event(index).wait()
        return index

    def open(self, index: int) -> None:
        self._event(index).set()


async def instant(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return x


# -- amap's result buffer ---------------------------------------------------------------------


async def test_amap_slow_consumer_one_result_taken_wakes_one_worker(wakeups: WakeCounter) -> None:
    workers = 16
    async with aiometer.amap(instant, range(10_000), max_at_once=workers) as results:
        # Nobody reads: the buffer fills and every worker blocks delivering its next result.
        await wakeups.settle()
        for _ in range(5):
            await results.__anext__()
            assert await wakeups.settle() == 1


async def test_amap_several_readers_one_result_wakes_one_reader(wakeups: WakeCounter) -> None:
    gates = Gates()
    readers = 6
    got: list[int] = []
    with anyio.fail_after(10):
        async with aiometer.amap(gates.wait, range(13), max_at_once=13) as results:

            async def read() -> None:
                async for value in results:
                    got.append(value)

            async with anyio.create_task_group() as tg:
                for _ in range(readers):
                    tg.start_soon(read)
                await wakeups.settle()
                for index in range(12):
                    gates.open(index)
                    # The result put wakes exactly one reader.
                    assert await wakeups.settle() == 1
                # The end of the results wakes every reader, once, to stop.
                gates.open(12)
    assert sorted(got) == list(range(13))


# -- ordered amap's gate ----------------------------------------------------------------------


async def test_ordered_amap_one_result_taken_wakes_one_worker_and_pulls_within_window(
    wakeups: WakeCounter,
) -> None:
    window = 4
    pulled = 0

    def items() -> Iterator[int]:
        nonlocal pulled
        for x in range(10_000):
            pulled += 1
            yield x

    async with aiometer.amap(instant, items(), max_at_once=window, ordered=True) as results:
        # Nobody reads: the window's results are ready and every worker waits at the gate.
        await wakeups.settle()
        assert pulled == window
        for consumed in range(1, 8):
            assert await results.__anext__() == consumed - 1
            # The one place that result freed wakes exactly one gate waiter.
            assert await wakeups.settle() == 1
            # Never more than the window past the results taken.
            assert pulled == consumed + window


# -- limiter= as a function of the item -------------------------------------------------------


@pytest.mark.parametrize("max_at_once", [8, 64])
async def test_parked_workers_one_site_freed_wakes_one_worker(
    wakeups: WakeCounter, max_at_once: int
) -> None:
    site = aiometer.ConcurrencyLimiter(1)
    gates = Gates()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(
                    aiometer.run_on_each,
                    gates.wait,
                    range(40),
                    max_at_once=max_at_once,
                    limiter=lambda _: site,
                )
            )
            # One worker runs item 0, one waits for the site, the rest of the items are
            # parked, the source is exhausted and the other workers wait for work.
            await wakeups.settle()
            for index in range(5):
                gates.open(index)
                # The site's waiter takes the slot, then one idle worker takes the next parked
                # item (and waits for the site in its turn).
                assert await wakeups.settle() == 2
            scope.cancel()


async def test_parked_workers_at_park_limit_one_place_wakes_one_worker(
    wakeups: WakeCounter,
) -> None:
    site = aiometer.ConcurrencyLimiter(1)
    gates = Gates()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(
                    aiometer.run_on_each,
                    gates.wait,
                    range(10_000),
                    max_at_once=32,
                    limiter=lambda _: site,
                )
            )
            # 256 items parked (the limit), the other workers wait for room.
            await wakeups.settle()
            for index in range(3):
                gates.open(index)
                # The site's waiter, one worker for the freed site (taking a parked item
                # frees room under the limit), one worker for that room.
                assert await wakeups.settle() == 3
            scope.cancel()


# -- the in-process limiters ------------------------------------------------------------------


async def test_concurrency_limiter_one_release_wakes_one_waiter(wakeups: WakeCounter) -> None:
    limiter = aiometer.ConcurrencyLimiter(1)
    held: list[aiometer.Permit] = [await limiter.acquire()]

    async def take() -> None:
        held.append(await limiter.acquire())

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(take)
        await wakeups.settle()
        for _ in range(20):
            await held.pop(0).release()
            assert await wakeups.settle() == 1
        await held.pop(0).release()
    assert limiter.statistics().held == 0


async def test_concurrency_limiter_raised_limit_wakes_that_many(wakeups: WakeCounter) -> None:
    limiter = aiometer.ConcurrencyLimiter(1)
    first = await limiter.acquire()
    permits: list[aiometer.Permit] = []

    async def take() -> None:
        permits.append(await limiter.acquire())

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(take)
        await wakeups.settle()
        limiter.max_at_once = 4
        assert await wakeups.settle() == 3
        limiter.max_at_once = 11
        assert await wakeups.settle() == 7
    await first.release()
    for permit in permits:
        await permit.release()


async def test_rate_limiter_one_start_wakes_one_waiter(wakeups: WakeCounter) -> None:
    limiter = aiometer.RateLimiter(20)
    await limiter.acquire()
    started = 0

    async def take() -> None:
        nonlocal started
        await limiter.acquire()
        started += 1

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(take)
        # Counted against the starts, not per loop: a machine that stalls the test longer
        # than an interval lets two starts through together (the head catches up one), and
        # then two waiters are woken, one by each.
        woken = await wakeups.settle()
        assert limiter.statistics().waiting == 10 - started
        assert woken == started
        for expected in range(1, 4):
            # Only the head sleeps (a timer, not an event); when it starts it hands over to
            # exactly one next waiter.
            while started < expected:
                await anyio.sleep(0.005)
            woken += await wakeups.settle()
            assert woken == started
        tg.cancel_scope.cancel()
    assert limiter.statistics().waiting == 0


async def test_cancelled_waiter_passes_its_wake_up_on() -> None:
    limiter = aiometer.ConcurrencyLimiter(1)
    permit = await limiter.acquire()
    got: list[int] = []

    async def take(n: int) -> None:
        got.append(n)
        await (await limiter.acquire()).release()

    doomed = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancellable_take, limiter, doomed)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(take, 1)
        await anyio.wait_all_tasks_blocked()
        # Hand the slot to the first waiter and cancel it before it runs: the slot must reach
        # the second waiter.
        await permit.release()
        doomed.cancel()
    assert got == [1]
    assert limiter.statistics().held == 0


async def _cancellable_take(limiter: aiometer.ConcurrencyLimiter, scope: anyio.CancelScope) -> None:
    with scope:
        await (await limiter.acquire()).release()


async def test_cancelled_waiters_do_not_pile_up() -> None:
    limiter = aiometer.ConcurrencyLimiter(1)
    rate = aiometer.RateLimiter(0.001)
    held = await limiter.acquire()
    await rate.acquire()

    async def acquire_rate() -> None:
        await rate.acquire()

    async with anyio.create_task_group() as head:
        head.start_soon(acquire_rate)  # sleeps for its slot, the others queue behind it
        for _ in range(3):
            async with anyio.create_task_group() as tg:
                for _ in range(1000):
                    tg.start_soon(limiter.acquire)
                    tg.start_soon(acquire_rate)
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
        # Cancelled waiters are dropped from the queues, not kept until someone is woken.
        assert limiter.statistics().waiting == 0
        assert rate.statistics().waiting == 1
        assert limiter._places.backlog <= 100
        assert rate._queue.backlog <= 100
        head.cancel_scope.cancel()
    await held.release()
    async with limiter.slot():
        pass
