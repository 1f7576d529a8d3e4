"""Behaviour of the four run functions, on asyncio and trio."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NamedTuple

import anyio
import anyio.lowlevel
import pytest

import aiometer

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.anyio


class Spy:
    """Counts calls running at once."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.started = 0
        self.finished = 0

    async def __call__(self, value: Any, delay: float = 0.001) -> Any:
        self.running += 1
        self.started += 1
        self.peak = max(self.peak, self.running)
        try:
            await anyio.sleep(delay)
        finally:
            self.running -= 1
            self.finished += 1
        return value


async def double(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return 2 * x


# -- results and ordering ---------------------------------------------------------------------


async def test_run_on_each_calls_every_item() -> None:
    seen: list[int] = []

    async def record(x: int) -> None:
        await anyio.sleep(0.001 * (x % 3))
        seen.append(x)

    await aiometer.run_on_each(record, range(20), max_at_once=4)
    assert sorted(seen) == list(range(20))


@pytest.mark.parametrize("max_at_once", [None, 1, 3, 100])
async def test_run_all_keeps_input_order(max_at_once: int | None) -> None:
    async def slow_first(x: int) -> int:
        await anyio.sleep(0.001 * (10 - x))
        return x * x

    jobs = [functools.partial(slow_first, x) for x in range(10)]
    assert await aiometer.run_all(jobs, max_at_once=max_at_once) == [x * x for x in range(10)]


async def test_run_all_of_generator_and_async_generator() -> None:
    async def agen() -> AsyncIterator[Callable[[], Awaitable[int]]]:
        for x in range(5):
            yield functools.partial(double, x)

    gen = (functools.partial(double, x) for x in range(5))
    assert await aiometer.run_all(gen, max_at_once=2) == [0, 2, 4, 6, 8]
    assert await aiometer.run_all(agen(), max_at_once=2) == [0, 2, 4, 6, 8]
    assert await aiometer.run_all(agen()) == [0, 2, 4, 6, 8]
    assert await aiometer.run_all([]) == []


async def test_amap_sleep_sort() -> None:
    # 100 ms apart: the tasks start one after another, and a stall of the machine between
    # two starts longer than the gap would reorder them (CI once swapped 0.01 and 0.02).
    numbers = [0.3, 0.1, 0.6, 0.2, 0.7, 0.5, 0.5, 0.2]

    async def process(n: float) -> float:
        await anyio.sleep(n)
        return n

    async with aiometer.amap(process, numbers) as results:
        sorted_numbers = [n async for n in results]
    assert sorted_numbers == sorted(numbers)


async def test_amap_ordered_and_include_index() -> None:
    async def slow_first(x: int) -> int:
        await anyio.sleep(0.002 * (5 - x % 5))
        return x

    async with aiometer.amap(slow_first, range(20), max_at_once=4, ordered=True) as results:
        assert [x async for x in results] == list(range(20))
    async with aiometer.amap(slow_first, range(6), include_index=True) as pairs:
        got = sorted([pair async for pair in pairs])
    assert got == [(i, i) for i in range(6)]
    async with aiometer.amap(
        slow_first, range(6), max_at_once=2, ordered=True, include_index=True
    ) as pairs:
        assert [pair async for pair in pairs] == [(i, i) for i in range(6)]


async def test_amap_ordered_bounds_its_reorder_buffer() -> None:
    # Item 0 is slow; the others are fast. Ordered output must not run ahead of it without
    # bound: while result 0 is due, exactly the window of max_at_once items is pulled (item 0
    # and the three behind it), however long item 0 takes.
    pulled = 0
    pulled_while_0_ran: list[int] = []

    def items() -> Iterator[int]:
        nonlocal pulled
        for x in range(10_000):
            pulled += 1
            yield x

    async def fn(x: int) -> int:
        if x == 0:
            for _ in range(4):
                await anyio.sleep(0.05)
                pulled_while_0_ran.append(pulled)
        return x

    async with aiometer.amap(fn, items(), max_at_once=4, ordered=True) as results:
        async for x in results:
            assert x == 0
            break
    assert pulled_while_0_ran == [4, 4, 4, 4]


async def test_namedtuple_recipe() -> None:
    class Inputs(NamedTuple):
        x: int
        y: int

    async def add(inputs: Inputs) -> int:
        await anyio.lowlevel.checkpoint()
        return inputs.x + inputs.y

    args = [Inputs(1, 2), Inputs(3, 4), Inputs(5, 6)]
    async with aiometer.amap(add, args) as results:
        assert sorted([r async for r in results]) == [3, 7, 11]
    jobs = [functools.partial(add, inputs) for inputs in args]
    assert await aiometer.run_all(jobs, max_at_once=2) == [3, 7, 11]


async def test_run_any_returns_first_success_fast() -> None:
    async def sleeper(delay: float) -> float:
        await anyio.sleep(delay)
        return delay

    jobs = [functools.partial(sleeper, d) for d in (10, 0.01, 10, 10)]
    start = anyio.current_time()
    assert await aiometer.run_any(jobs) == 0.01
    # Far sooner than the others' 10 s, with room for a machine that holds the test up.
    assert anyio.current_time() - start < 1


async def test_run_any_skips_failures_until_one_succeeds() -> None:
    async def fail() -> int:
        raise KeyError("nope")

    async def late() -> int:
        await anyio.sleep(0.01)
        return 7

    assert await aiometer.run_any([fail, late, fail]) == 7


async def test_run_any_all_failing() -> None:
    async def fail(n: int) -> int:
        await anyio.sleep(0.001 * n)
        raise KeyError(n)

    with pytest.raises(KeyError):
        await aiometer.run_any([functools.partial(fail, 1)])
    with pytest.raises(ExceptionGroup, match="all 3 functions failed") as info:
        await aiometer.run_any([functools.partial(fail, n) for n in range(3)])
    assert [e.args[0] for e in info.value.exceptions] == [0, 1, 2]
    with pytest.raises(ValueError, match="at least one function"):
        await aiometer.run_any([])


# -- max_at_once ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_at_once", [1, 2, 7])
async def test_max_at_once_holds_for_every_function(max_at_once: int) -> None:
    spy = Spy()
    await aiometer.run_on_each(spy, range(30), max_at_once=max_at_once)
    assert spy.peak == max_at_once

    spy = Spy()
    jobs = [functools.partial(spy, x) for x in range(30)]
    assert await aiometer.run_all(jobs, max_at_once=max_at_once) == list(range(30))
    assert spy.peak == max_at_once

    spy = Spy()
    async with aiometer.amap(spy, range(30), max_at_once=max_at_once) as results:
        assert sorted([x async for x in results]) == list(range(30))
    assert spy.peak == max_at_once

    spy = Spy()
    jobs = [functools.partial(spy, x, 0.01 if x == 0 else 1) for x in range(30)]
    assert await aiometer.run_any(jobs, max_at_once=max_at_once) == 0
    assert spy.peak <= max_at_once


async def test_shared_concurrency_limiter_covers_concurrent_runs() -> None:
    limiter = aiometer.ConcurrencyLimiter(5)
    spy = Spy()
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(functools.partial(aiometer.run_on_each, spy, range(40), limiter=limiter))
    assert spy.started == 120
    assert spy.peak == 5
    assert limiter.statistics() == aiometer.ConcurrencyStatistics(5, 0, 0)


async def test_local_cap_on_top_of_limiter() -> None:
    limiter = aiometer.ConcurrencyLimiter(10)
    spy = Spy()
    await aiometer.run_on_each(spy, range(30), max_at_once=3, limiter=[limiter])
    assert spy.peak == 3


# -- laziness and closing ---------------------------------------------------------------------


@pytest.mark.parametrize("max_at_once", [1, 8])
async def test_generator_is_pulled_lazily(max_at_once: int) -> None:
    pulled = 0
    spy = Spy()
    worst = 0

    def items() -> Iterator[int]:
        nonlocal pulled, worst
        for x in range(10**7):
            pulled += 1
            worst = max(worst, pulled - spy.finished)
            yield x

    async with aiometer.amap(spy, items(), max_at_once=max_at_once) as results:
        count = 0
        async for _ in results:
            count += 1
            if count == 200:
                break
    assert worst <= max_at_once + 1
    assert pulled < 200 + 2 * max_at_once + 2


async def test_run_on_each_pulls_lazily() -> None:
    pulled = 0
    spy = Spy()
    worst = 0

    def items() -> Iterator[int]:
        nonlocal pulled, worst
        for x in range(300):
            pulled += 1
            worst = max(worst, pulled - spy.finished)
            yield x

    await aiometer.run_on_each(spy, items(), max_at_once=5)
    assert worst <= 5 + 1


async def test_async_generator_closed_when_amap_left_early() -> None:
    closed = anyio.Event()

    async def agen() -> AsyncIterator[int]:
        try:
            for x in range(10**6):
                yield x
        finally:
            closed.set()

    async with aiometer.amap(double, agen(), max_at_once=3) as results:
        async for value in results:
            if value >= 10:
                break
    assert closed.is_set()


async def test_async_generator_closed_on_failure_and_on_completion() -> None:
    closes = 0

    async def agen(n: int) -> AsyncIterator[int]:
        nonlocal closes
        try:
            for x in range(n):
                yield x
        finally:
            closes += 1

    async def fail_on_3(x: int) -> None:
        if x == 3:
            raise KeyError(x)
        await anyio.lowlevel.checkpoint()

    with pytest.raises(KeyError):
        await aiometer.run_on_each(fail_on_3, agen(100), max_at_once=2)
    await aiometer.run_on_each(double, agen(5))
    assert closes == 2


async def test_amap_left_early_cancels_running_tasks() -> None:
    cancelled = 0

    async def fn(x: int) -> int:
        nonlocal cancelled
        if x == 0:
            return 0
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled += 1
            raise
        return x

    start = anyio.current_time()
    async with aiometer.amap(fn, range(5), max_at_once=5) as results:
        async for _ in results:
            break
    assert anyio.current_time() - start < 1
    assert cancelled == 4


async def test_amap_backpressure_slows_workers() -> None:
    spy = Spy()
    async with aiometer.amap(spy, range(100), max_at_once=2) as results:
        consumed = 0
        async for _ in results:
            consumed += 1
            await anyio.sleep(0.02)
            # Beyond what was consumed: two in the buffer and two workers, each either running
            # or waiting to hand over its result.
            assert spy.started - consumed <= 2 + 2
            if consumed > 20:
                break


# -- errors -----------------------------------------------------------------------------------


class Boom(Exception):
    pass


async def fail_on(target: int, x: int) -> int:
    await anyio.sleep(0.001 * x)
    if x == target:
        raise Boom(x)
    return x


async def test_first_failure_propagates_as_itself_from_every_function() -> None:
    fail3 = functools.partial(fail_on, 3)
    with pytest.raises(Boom):
        await aiometer.run_on_each(fail3, range(10), max_at_once=3)
    with pytest.raises(Boom):
        await aiometer.run_on_each(fail3, range(10))
    with pytest.raises(Boom):
        await aiometer.run_all([functools.partial(fail3, x) for x in range(10)], max_at_once=3)
    with pytest.raises(Boom):
        async with aiometer.amap(fail3, range(10), max_at_once=3) as results:
            async for _ in results:
                pass
    with pytest.raises(Boom):
        await aiometer.run_any([functools.partial(fail3, 3)])


async def test_failure_cancels_the_others() -> None:
    cancelled = 0

    async def fn(x: int) -> None:
        nonlocal cancelled
        if x == 0:
            await anyio.sleep(0.01)
            raise Boom(0)
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled += 1
            raise

    start = anyio.current_time()
    with pytest.raises(Boom):
        await aiometer.run_on_each(fn, range(6), max_at_once=6)
    assert cancelled == 5
    assert anyio.current_time() - start < 1


async def test_simultaneous_failures_form_a_group() -> None:
    async def fail_now(x: int) -> None:
        raise Boom(x)

    with pytest.raises(ExceptionGroup) as info:
        await aiometer.run_on_each(fail_now, range(3))
    assert sorted(e.args[0] for e in info.value.exceptions) == [0, 1, 2]


async def test_return_exceptions() -> None:
    fail3 = functools.partial(fail_on, 3)
    jobs = [functools.partial(fail3, x) for x in range(6)]
    results = await aiometer.run_all(jobs, max_at_once=2, return_exceptions=True)
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
    assert isinstance(results[3], Boom)

    async with aiometer.amap(fail3, range(6), return_exceptions=True, ordered=True) as out:
        values = [r async for r in out]
    assert isinstance(values[3], Boom)
    assert values[:3] == [0, 1, 2]


async def test_caller_cancellation_releases_every_permit() -> None:
    concurrency = aiometer.ConcurrencyLimiter(3)
    rate = aiometer.RateLimiter(1000, burst=2)
    with anyio.move_on_after(0.05):
        await aiometer.run_on_each(
            functools.partial(anyio.sleep), [10] * 20, limiter=[concurrency, rate]
        )
    assert concurrency.statistics() == aiometer.ConcurrencyStatistics(3, 0, 0)
    assert rate.statistics().waiting == 0

    with anyio.move_on_after(0.05):
        async with aiometer.amap(anyio.sleep, [10] * 20, limiter=concurrency) as results:
            async for _ in results:
                pass
    assert concurrency.statistics() == aiometer.ConcurrencyStatistics(3, 0, 0)


async def test_failure_releases_every_permit() -> None:
    concurrency = aiometer.ConcurrencyLimiter(2)
    with pytest.raises(Boom):
        await aiometer.run_on_each(
            functools.partial(fail_on, 4), range(10), limiter=concurrency, max_at_once=5
        )
    assert concurrency.statistics().held == 0
    assert concurrency.statistics().waiting == 0


# -- max_per_second ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "burst"), [(5, 1), (50, 1), (200, 1), (1000, 1), (50, 10), (1000, 50)]
)
async def test_rate_limit_windows(rate: float, burst: int) -> None:
    from aiometer_redis.testing import window_violations

    starts: list[float] = []
    count = burst + max(int(rate * 0.6), 4)

    async def record(_: int) -> None:
        starts.append(anyio.current_time())

    limiter = aiometer.RateLimiter(rate, burst=burst)
    begin = anyio.current_time()
    await aiometer.run_on_each(record, range(count), max_at_once=50, limiter=limiter)
    widths = sorted({1 / rate, 0.05, 0.1, 0.25, 0.5, 1.0})
    assert window_violations(starts, rate, burst, widths) == []
    if rate <= 200:
        achieved = (count - burst) / (max(starts) - begin)
        assert achieved >= 0.8 * rate


async def test_max_per_second_argument_and_unbounded() -> None:
    from aiometer_redis.testing import window_violations

    starts: list[float] = []

    async def record(_: int) -> None:
        starts.append(anyio.current_time())

    await aiometer.run_on_each(record, range(15), max_per_second=50)
    assert window_violations(starts, 50, 1, [0.02, 0.1, 0.2]) == []
    assert max(starts) - min(starts) >= 14 / 50 * 0.9


# -- bad input --------------------------------------------------------------------------------


async def noop(_: Any) -> None:
    return None


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_at_once": 0}, ValueError, "max_at_once must be >= 1, got 0"),
        ({"max_at_once": -3}, ValueError, "max_at_once must be >= 1, got -3"),
        ({"max_at_once": 2.5}, TypeError, "max_at_once must be an int, got float"),
        ({"max_at_once": True}, TypeError, "max_at_once must be an int, got bool"),
        ({"max_per_second": 0}, ValueError, "max_per_second must be a finite number > 0, got 0"),
        ({"max_per_second": -1.0}, ValueError, "must be a finite number > 0, got -1.0"),
        ({"max_per_second": math.nan}, ValueError, "must be a finite number > 0, got nan"),
        ({"max_per_second": math.inf}, ValueError, "must be a finite number > 0, got inf"),
        ({"max_per_second": "5"}, TypeError, "max_per_second must be a number, got str"),
        ({"limiter": 5}, TypeError, "limiter must be an aiometer.Limiter"),
    ],
)
async def test_bad_arguments_raise_before_any_task(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    calls = 0

    async def fn(_: Any = None) -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(error, match=message):
        await aiometer.run_on_each(fn, range(3), **kwargs)
    with pytest.raises(error, match=message):
        await aiometer.run_all([fn], **kwargs)
    with pytest.raises(error, match=message):
        aiometer.amap(fn, range(3), **kwargs)
    with pytest.raises(error, match=message):
        await aiometer.run_any([fn], **kwargs)
    assert calls == 0


async def test_non_callable_and_lambdas() -> None:
    with pytest.raises(TypeError, match="async_fn must be callable, got int"):
        await aiometer.run_on_each(5, range(3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async_fn must be callable, got str"):
        aiometer.amap("x", range(3))  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="must be callable, got int"):
        await aiometer.run_all([noop, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got a lambda"):
        await aiometer.run_all([lambda: noop(1)])
    with pytest.raises(ValueError, match="got a lambda"):
        await aiometer.run_any([lambda: noop(1)])
    with pytest.raises(ValueError, match="got a lambda"):
        await aiometer.run_all(lambda: noop(x) for x in range(3))  # noqa: B023
    with pytest.raises(TypeError, match="args must be an iterable"):
        await aiometer.run_on_each(noop, 5)  # type: ignore[arg-type]


# -- a limiter per item -----------------------------------------------------------------------


@pytest.mark.parametrize("max_at_once", [4, 12, None])
async def test_limiter_per_item_keeps_other_keys_flowing(max_at_once: int | None) -> None:
    """Scraper-shaped: three sites with their own limits, items interleaved, one site slow.

    The slow site's items wait in its own queue; the other sites' items keep flowing, and
    every site stays within its limit.
    """
    limits = {"slow": 1, "a": 2, "b": 3}
    limiters = {site: aiometer.ConcurrencyLimiter(n) for site, n in limits.items()}
    running = dict.fromkeys(limits, 0)
    peak = dict.fromkeys(limits, 0)
    started: dict[str, list[float]] = {site: [] for site in limits}
    finished: dict[str, list[float]] = {site: [] for site in limits}
    items = [site for _ in range(10) for site in limits]  # slow, a, b, slow, a, b, ...

    async def fetch(site: str) -> None:
        started[site].append(anyio.current_time())
        running[site] += 1
        peak[site] = max(peak[site], running[site])
        await anyio.sleep(0.1 if site == "slow" else 0.03)
        running[site] -= 1
        finished[site].append(anyio.current_time())

    start = anyio.current_time()
    await aiometer.run_on_each(
        fetch, items, max_at_once=max_at_once, limiter=lambda site: limiters[site]
    )
    assert all(peak[site] <= limits[site] for site in limits), peak
    assert peak["slow"] == 1
    if max_at_once != 4:
        # Enough workers for every site to reach its limit.
        assert peak == limits
    # The slow site needs 10 x 0.1 s one at a time; the fast sites are done long before, by
    # the slow site's own starts (a stall delays them as much as the fast sites' finishes):
    # before its sixth item started, 0.5 s in (done at 0.15 s, or 0.3 s with max_at_once=4).
    assert max(finished["slow"]) - start >= 0.9
    assert max(finished["a"] + finished["b"]) < started["slow"][5]
    assert all(limiter.statistics().held == 0 for limiter in limiters.values())


async def test_limiter_function_must_return_limiters() -> None:
    with pytest.raises(TypeError, match="must return a Limiter"):
        await aiometer.run_on_each(noop, range(3), max_at_once=1, limiter=lambda item: 5)  # type: ignore[arg-type,return-value]
