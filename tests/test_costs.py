"""Costs, several windows and settle: the clock-free core, RateLimiter and the run functions."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aiometer
from aiometer import Rate
from aiometer._windows import Reservation, Schedule

# ---------------------------------------------------------------------------------------------
# The pure core, against a brute-force reading of the rules.

EPSILON = 1e-9
# A start computed as ``s + per`` may differ from the exact end of a window by a rounding error
# of the clock's floats; two starts closer than that to ``per`` apart count as apart.
ROUNDING = 1e-9


class _Live:
    """What the test knows about one reservation."""

    def __init__(self, reservation: Reservation, order: int) -> None:
        self.reservation = reservation
        self.order = order
        self.withdrawn = False


def _window_use(
    live: Sequence[_Live], rate: Rate, end: float, extra: float = 0.0, upto: int | None = None
) -> float:
    """What *rate* holds for the window (end - per, end], from the reservations themselves."""
    total = [extra]
    for entry in live:
        if entry.withdrawn or (upto is not None and entry.order >= upto):
            continue
        start = entry.reservation.start
        if end - rate.per + ROUNDING < start <= end:
            total.append(1.0 if rate.counts == "calls" else entry.reservation.actual)
    return math.fsum(total)


def _earliest_by_brute_force(
    live: Sequence[_Live],
    rates: Sequence[Rate],
    gcra: tuple[float, int] | None,
    tat: float,
    now: float,
    cost: float,
) -> float:
    starts = [e.reservation.start for e in live if not e.withdrawn]
    start = max([now, *starts]) if rates else now
    if gcra is not None:
        start = max(start, tat - (gcra[1] - cost) / gcra[0])
    t0 = start
    for rate in rates:
        need = 1.0 if rate.counts == "calls" else cost
        candidates = sorted({t0} | {s + rate.per for s in starts if s + rate.per > t0})
        allowed = next(
            t for t in candidates if _window_use(live, rate, t, need) <= rate.limit + EPSILON
        )
        start = max(start, allowed)
    return start


rates_strategy = st.lists(
    st.builds(
        Rate,
        st.sampled_from([1, 3, 5, 10, 2.5, 7.25]),
        st.sampled_from([0.5, 1.0, 2.0, 5.0]),
        st.sampled_from(["cost", "cost", "calls"]),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda rate: (rate.per, rate.counts),
)

operation = st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.1, 0.37, 1.0, 2.5])),
    st.tuples(
        st.just("reserve"),
        st.sampled_from([0.25, 0.5, 1, 1, 1, 2, 3, 0.1]),
        st.sampled_from([None, None, 0.0, 0.5]),
    ),
    st.tuples(st.just("settle"), st.integers(0, 30), st.sampled_from([0, 0.5, 1, 2, 4, 0.3])),
    st.tuples(st.just("withdraw"), st.integers(0, 30)),
)


@settings(max_examples=300, deadline=None)
@given(
    rates=rates_strategy,
    gcra=st.one_of(st.none(), st.tuples(st.sampled_from([1.0, 2.0, 10.0]), st.integers(1, 4))),
    operations=st.lists(operation, max_size=60),
)
def test_schedule_holds_every_window_all_or_nothing_and_in_order(
    rates: list[Rate], gcra: tuple[float, int] | None, operations: list[Any]
) -> None:
    interval = None if gcra is None else 1.0 / gcra[0]
    burst = 1 if gcra is None else gcra[1]
    schedule = Schedule(interval, burst, tuple(rates), Reservation)
    now = 0.0
    live: list[_Live] = []
    # GCRA check: the cost each start was charged with when the next one was decided.
    for op in operations:
        kind = op[0]
        if kind == "advance":
            now += op[1]
        elif kind == "reserve":
            cost, slack = op[1], op[2]
            if schedule.impossible(cost) is not None:
                assert (gcra is not None and cost > burst) or any(
                    rate.counts == "cost" and cost > rate.limit for rate in rates
                )
                continue
            earliest = schedule.earliest(now, cost)
            deadline = math.inf if slack is None else now + slack
            used_before = schedule.used(now)
            tat_before = schedule.tat
            reservation = schedule.reserve(now, cost, deadline)
            if reservation is None:
                # Refused by the deadline: nothing charged anywhere.
                assert earliest > deadline
                assert schedule.used(now) == used_before
                assert schedule.tat == tat_before
                continue
            start = reservation.start
            assert start == earliest >= now
            # First come, first served: never before a start already reserved.
            assert all(start >= e.reservation.start for e in live if not e.withdrawn)
            # Every window holds at the new start, this cost included (exact sums).
            for rate in rates:
                need = 1.0 if rate.counts == "calls" else cost
                used = _window_use(live, rate, start, need)
                assert used <= rate.limit + EPSILON, (rate, used)
            if interval is not None:
                assert start >= tat_before - (burst - cost) * interval - EPSILON
            # Not later than needed: the start is exactly the latest of what every rule
            # allows, each found by brute force over the reservations.
            assert start == pytest.approx(
                _earliest_by_brute_force(live, rates, gcra, tat_before, now, cost)
            )
            # Charged to every window.
            after = schedule.used(now)
            for rate, before_value, after_value in zip(rates, used_before, after, strict=True):
                need = 1.0 if rate.counts == "calls" else cost
                assert after_value == pytest.approx(before_value + need)
            live.append(_Live(reservation, len(live)))
        elif kind == "settle":
            if not live:
                continue
            entry = live[op[1] % len(live)]
            if entry.withdrawn:
                continue
            before = schedule.used(now)
            delta = op[2] - entry.reservation.actual
            held = [
                rate.counts == "cost" and entry.reservation.start > now - rate.per for rate in rates
            ]
            schedule.settle(entry.reservation, op[2])
            assert entry.reservation.actual == op[2]
            for rate, was_held, old, new in zip(
                rates, held, before, schedule.used(now), strict=True
            ):
                expected = old + delta if was_held else old
                assert new == pytest.approx(expected, abs=1e-9), rate
        else:
            if not live:
                continue
            entry = live[op[1] % len(live)]
            # Only a reservation that has not started yet can be withdrawn.
            if entry.withdrawn or entry.reservation.start <= now:
                continue
            before = schedule.used(now)
            schedule.withdraw(entry.reservation)
            entry.withdrawn = True
            for rate, old, new in zip(rates, before, schedule.used(now), strict=True):
                taken = 1.0 if rate.counts == "calls" else entry.reservation.actual
                assert new == pytest.approx(old - taken, abs=1e-9)
    # Memory: a window keeps only the starts of its last ``per`` seconds (and later ones).
    for rate, used in zip(rates, schedule.used(now), strict=True):
        kept = [
            1.0 if rate.counts == "calls" else e.reservation.actual
            for e in live
            if not e.withdrawn and e.reservation.start > now - rate.per
        ]
        assert used == pytest.approx(math.fsum(kept), abs=1e-9)


def test_schedule_big_cost_at_the_head_is_not_overtaken() -> None:
    schedule = Schedule(None, 1, (Rate(10, per=1),), Reservation)
    first = schedule.reserve(0.0, 8)
    big = schedule.reserve(0.1, 10)
    small = schedule.reserve(0.2, 1)
    assert first is not None
    assert big is not None
    assert small is not None
    assert big.start == pytest.approx(1.0)
    # 1 would fit at 0.2 beside the 8, but the 10 reserved before it comes first.
    assert small.start >= big.start


def test_schedule_gcra_refund_only_while_nothing_later_was_reserved() -> None:
    schedule = Schedule(1.0, 5, (), Reservation)
    first = schedule.reserve(0.0, 4)
    assert first is not None
    assert schedule.tat == 4.0
    schedule.settle(first, 1)
    assert schedule.tat == 1.0  # nothing reserved since: the refund applies
    second = schedule.reserve(0.0, 1)
    assert second is not None
    assert schedule.tat == 2.0
    schedule.settle(first, 0)
    assert schedule.tat == 2.0  # a later start counted from the higher tat: dropped
    schedule.settle(first, 3)
    assert schedule.tat == 5.0  # a debt always applies
    schedule.settle(second, 0)  # first's debt moved tat after second: dropped
    assert schedule.tat == 5.0
    schedule.settle(first, 2)  # settling again replaces: first moved tat last, refunded
    assert schedule.tat == 4.0


def test_schedule_settles_at_the_original_start() -> None:
    schedule = Schedule(None, 1, (Rate(10, per=1), Rate(3, per=1, counts="calls")), Reservation)
    first = schedule.reserve(0.0, 2)
    assert first is not None
    schedule.settle(first, 9)
    assert schedule.used(0.5) == (9.0, 1.0)
    late = schedule.reserve(0.5, 2)
    assert late is not None
    assert late.start == pytest.approx(1.0)  # after the 9 leaves
    schedule.settle(first, 1)  # the window at 0 no longer counts it from 1.0 on
    assert schedule.used(1.0) == (2.0, 1.0)


def test_schedule_fractional_costs_fill_a_window_exactly() -> None:
    schedule = Schedule(None, 1, (Rate(1, per=1),), Reservation)
    starts = [schedule.reserve(0.0, 0.1) for _ in range(10)]
    assert all(r is not None and r.start == 0.0 for r in starts)
    eleventh = schedule.reserve(0.0, 0.1)
    assert eleventh is not None
    assert eleventh.start == pytest.approx(1.0)


def test_schedule_decides_close_calls_on_exact_sums() -> None:
    schedule = Schedule(None, 1, (Rate(1, per=1),), Reservation)
    for cost in (0.2, 0.4, 0.3):
        assert schedule.reserve(0.0, cost, 0.0) is not None
    # 0.2 + 0.4 + 0.3 + 0.1 is 1.0000000000000002 in running floats, 1 in fact: it fits.
    last = schedule.reserve(0.0, 0.1, 0.0)
    assert last is not None
    assert schedule.reserve(0.0, 1e-6, 0.0) is None


def test_schedule_memory_is_one_entry_per_start_in_the_window() -> None:
    schedule = Schedule(None, 1, (Rate(64, per=1), Rate(640, per=10)), Reservation)
    for tick in range(1, 2000):
        now = tick / 64  # exact in binary
        assert schedule.reserve(now, 1, now) is not None
    # 64 starts per second: the 1 s window holds 64, the 10 s one 640, nothing older.
    assert schedule.used(now) == (64.0, 640.0)


# ---------------------------------------------------------------------------------------------
# RateLimiter and ConcurrencyLimiter with costs, on the real clock.


def _most_in_window(starts: Sequence[tuple[float, float]], width: float) -> float:
    """The largest total cost started within any window [s, s + width)."""
    ordered = sorted(starts)
    best = 0.0
    for i, (start, _) in enumerate(ordered):
        total = math.fsum(cost for when, cost in ordered[i:] if when < start + width)
        best = max(best, total)
    return best


@pytest.mark.anyio
async def test_rate_limiter_holds_several_windows_with_random_costs() -> None:
    limiter = aiometer.RateLimiter(
        rates=[Rate(12, per=0.4), Rate(20, per=0.8), Rate(6, per=0.4, counts="calls")]
    )
    costs = [1, 3, 2, 5, 1, 4, 2, 2, 3, 1, 6, 1, 2, 2, 1, 3]
    starts: list[tuple[float, float]] = []
    calls: list[tuple[float, float]] = []

    async def one(cost: float) -> None:
        await limiter.acquire(cost=cost)
        now = anyio.current_time()
        starts.append((now, cost))
        calls.append((now, 1))

    async with anyio.create_task_group() as tg:
        for cost in costs:
            tg.start_soon(one, cost)
    assert len(starts) == len(costs)
    # Recorded times trail the reserved starts by the event loop's latency: shrink the windows.
    assert _most_in_window(starts, 0.4 - 0.03) <= 12
    assert _most_in_window(starts, 0.8 - 0.03) <= 20
    assert _most_in_window(calls, 0.4 - 0.03) <= 6
    # All 35 units fit in 0.8 s windows of 20, so the run lasts at least one window.
    first, last = min(starts)[0], max(starts)[0]
    assert last - first >= 0.8 - 0.03


@pytest.mark.anyio
async def test_rate_limiter_cost_with_max_per_second_and_burst() -> None:
    limiter = aiometer.RateLimiter(100, burst=10)
    starts: list[tuple[float, float]] = []
    for cost in [10, 5, 5, 10, 2.5, 7.5]:
        await limiter.acquire(cost)
        starts.append((anyio.current_time(), cost))
    # 40 units at 100/s after a burst of 10: about 0.3 s (at most 0.5 s more: not held up
    # beyond the rate, with room for a machine that stalls the test).
    elapsed = starts[-1][0] - starts[0][0]
    assert 0.25 <= elapsed <= 0.3 + 0.5
    assert _most_in_window(starts, 0.1 - 0.005) <= 10 + 100 * 0.1 + 1


@pytest.mark.anyio
async def test_big_cost_at_the_head_is_not_overtaken_by_small_ones() -> None:
    limiter = aiometer.RateLimiter(rates=[Rate(10, per=0.2)])
    await limiter.acquire(8)
    order: list[str] = []

    async def take(name: str, cost: float) -> None:
        await limiter.acquire(cost)
        order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, "big", 10)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(take, "small", 1)
        await anyio.wait_all_tasks_blocked()
        # 1 would fit beside the 8, but it queues behind the 10 (head-of-line).
        assert order == []
        assert limiter.statistics().waiting == 2
        with pytest.raises(anyio.WouldBlock):
            limiter.acquire_nowait(1)
    assert order == ["big", "small"]


@pytest.mark.anyio
async def test_impossible_cost_raises_at_once() -> None:
    rate_only = aiometer.RateLimiter(5, burst=3)
    windows = aiometer.RateLimiter(rates=[Rate(100, per=1), Rate(10, per=60)])
    with anyio.fail_after(1):
        with pytest.raises(ValueError, match=r"cost 4 can never start: max_per_second allows "):
            await rate_only.acquire(4)
        with pytest.raises(ValueError, match=r"cost 11 can never start: Rate\(10, per=60\)"):
            await windows.acquire(cost=11)
        with pytest.raises(ValueError, match="can never start"):
            windows.acquire_nowait(11)
        with pytest.raises(ValueError, match="can never start"):
            async with windows.slot(cost=10.5):
                pass
    assert rate_only.statistics().waiting == windows.statistics().waiting == 0
    # A calls window admits any cost.
    calls = aiometer.RateLimiter(rates=[Rate(1, per=1, counts="calls")])
    await calls.acquire(1000)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("cost", "error", "message"),
    [
        (0, ValueError, "cost must be a finite number > 0, got 0"),
        (-1.5, ValueError, "got -1.5"),
        (math.inf, ValueError, "got inf"),
        (math.nan, ValueError, "got nan"),
        (True, TypeError, "cost must be a number, got bool"),
        ("2", TypeError, "cost must be a number, got str"),
        ([1], TypeError, "got list"),
    ],
)
async def test_bad_costs_are_refused(cost: Any, error: type[Exception], message: str) -> None:
    for limiter in (aiometer.RateLimiter(10), aiometer.ConcurrencyLimiter(1)):
        with pytest.raises(error, match=message):
            await limiter.acquire(cost)
        with pytest.raises(error, match=message):
            limiter.acquire_nowait(cost)
        with pytest.raises(error, match=message):
            async with limiter.slot(cost=cost):
                pass
    with pytest.raises(error, match=message):
        await aiometer.run_on_each(_noop, [1], cost=cost)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("actual", "error", "message"),
    [
        (-1, ValueError, "actual must be a finite number >= 0, got -1"),
        (math.nan, ValueError, "got nan"),
        (False, TypeError, "actual must be a number, got bool"),
        ("3", TypeError, "got str"),
    ],
)
async def test_bad_settle_values_are_refused(
    actual: Any, error: type[Exception], message: str
) -> None:
    for limiter in (aiometer.RateLimiter(10), aiometer.ConcurrencyLimiter(1)):
        async with limiter.slot() as permit:
            with pytest.raises(error, match=message):
                await permit.settle(actual)


@pytest.mark.anyio
async def test_settle_moves_later_starts() -> None:
    # A window longer than any stall of the machine: the checks below run inside it.
    limiter = aiometer.RateLimiter(rates=[Rate(10, per=3)])
    began = anyio.current_time()
    first = await limiter.acquire(2)
    await first.settle(10)
    assert limiter.statistics().used == (10.0,)
    # The next start waits until the first leaves the window, 3 s after it began.
    assert limiter.statistics().next_start >= 3 - (anyio.current_time() - began) - 1e-9
    with pytest.raises(anyio.WouldBlock):
        limiter.acquire_nowait(1)
    await first.settle(3)  # settles again: replaces the first settle
    assert limiter.statistics().used == (3.0,)
    await first.release()
    await first.settle(0)  # after release too: the rate entry outlives the task
    assert limiter.statistics().used == (0.0,)
    limiter.acquire_nowait(10)


@pytest.mark.anyio
async def test_concurrency_limiter_ignores_cost() -> None:
    limiter = aiometer.ConcurrencyLimiter(2)
    async with limiter.slot(cost=1000) as permit:
        await permit.settle(5000)
        assert limiter.statistics().held == 1
        other = limiter.acquire_nowait(cost=0.5)
        assert limiter.statistics().held == 2
        await other.release()


@pytest.mark.anyio
async def test_statistics_and_repr_show_the_windows() -> None:
    limiter = aiometer.RateLimiter(50, burst=5, rates=[Rate(100, per=60)])
    assert repr(limiter) == "RateLimiter(max_per_second=50.0, burst=5, rates=[Rate(100, per=60)])"
    await limiter.acquire(4)
    stats = limiter.statistics()
    assert stats.max_per_second == 50.0
    assert stats.rates == (Rate(100, per=60),)
    assert stats.used == (4.0,)
    assert limiter.rates == (Rate(100, per=60),)
    assert aiometer.RateLimiter(rates=[Rate(1, per=1)]).max_per_second is None


def test_rate_limiter_refuses_bad_rates() -> None:
    with pytest.raises(ValueError, match="two windows of per=60 counting cost"):
        aiometer.RateLimiter(rates=[Rate(5, per=60), Rate(6, per=60.0)])
    with pytest.raises(TypeError, match="rates must be a sequence of Rate, got Rate"):
        aiometer.RateLimiter(rates=Rate(5, per=60))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The run functions.


async def _noop(x: Any) -> None:
    await anyio.lowlevel.checkpoint()


async def _identity(x: Any) -> Any:
    await anyio.lowlevel.checkpoint()
    return x


class _Recording:
    """A limiter whose permits record what the engine did to them."""

    def __init__(self, takes_cost: bool = True) -> None:
        self.acquired: list[Any] = []
        self.events: list[tuple[str, Any]] = []
        self.takes_cost = takes_cost

    async def acquire(self, *args: Any, **kwargs: Any) -> _RecordingPermit:
        if not self.takes_cost and (args or kwargs):
            raise TypeError("acquire() takes no argument")
        self.acquired.append(kwargs.get("cost", "none"))
        number = len(self.acquired) - 1
        await anyio.lowlevel.checkpoint()
        return _RecordingPermit(self, number)


class _RecordingPermit:
    def __init__(self, owner: _Recording, number: int) -> None:
        self.owner = owner
        self.number = number

    async def release(self) -> None:
        self.owner.events.append(("release", self.number))

    async def settle(self, actual: float) -> None:
        self.owner.events.append(("settle", (self.number, actual)))


@pytest.mark.anyio
async def test_run_functions_pass_a_constant_cost_to_every_limiter() -> None:
    recording = _Recording()
    await aiometer.run_on_each(_noop, range(3), limiter=recording, cost=2.5)
    assert recording.acquired == [2.5, 2.5, 2.5]
    recording = _Recording()
    results = await aiometer.run_all(
        [functools.partial(_identity, n) for n in range(3)],
        max_at_once=2,
        limiter=[recording],
        cost=3,
    )
    assert results == [0, 1, 2]
    assert recording.acquired == [3, 3, 3]
    recording = _Recording()
    async with aiometer.amap(_identity, range(4), limiter=recording, cost=0.5) as values:
        assert sorted([value async for value in values]) == [0, 1, 2, 3]
    assert recording.acquired == [0.5] * 4
    recording = _Recording()
    assert await aiometer.run_any([functools.partial(_identity, 7)], limiter=recording, cost=4)
    assert recording.acquired == [4]


@pytest.mark.anyio
@pytest.mark.parametrize("max_at_once", [None, 2])
async def test_cost_function_of_the_item_and_settle(max_at_once: int | None) -> None:
    recording = _Recording()
    await aiometer.run_on_each(
        _identity,
        [1, 2, 3],
        max_at_once=max_at_once,
        limiter=recording,
        cost=lambda x: x * 10,
        settle=lambda x, result: result + 0.5,
    )
    assert sorted(recording.acquired) == [10, 20, 30]
    settles = [value for kind, value in recording.events if kind == "settle"]
    assert sorted(actual for _, actual in settles) == [1.5, 2.5, 3.5]
    # Each permit is settled before it is released.
    for number in range(3):
        settled = next(
            i
            for i, (kind, value) in enumerate(recording.events)
            if kind == "settle" and value[0] == number
        )
        assert settled < recording.events.index(("release", number))


@pytest.mark.anyio
async def test_settle_only_for_tasks_that_succeeded() -> None:
    recording = _Recording()
    seen: list[Any] = []

    async def fails_on_two(x: int) -> int:
        if x == 2:
            raise KeyError(x)
        return x

    def settle(item: int, result: int) -> float:
        seen.append((item, result))
        return 1

    results = await aiometer.run_all(
        [functools.partial(fails_on_two, n) for n in (1, 2, 3)],
        limiter=recording,
        settle=settle,
        return_exceptions=True,
    )
    assert isinstance(results[1], KeyError)
    assert sorted(result for _, result in seen) == [1, 3]
    assert recording.acquired == ["none"] * 3  # no cost= given: acquire() without argument
    assert sum(1 for kind, _ in recording.events if kind == "settle") == 2
    assert sum(1 for kind, _ in recording.events if kind == "release") == 3


@pytest.mark.anyio
async def test_errors_of_cost_and_settle_functions_are_the_tasks_errors() -> None:
    recording = _Recording()

    def cost(x: int) -> Any:
        return "lots" if x == 2 else 1

    with pytest.raises(TypeError, match=r"cost\(item\) must be a number, got str"):
        await aiometer.run_on_each(_noop, [1, 2, 3], limiter=recording, cost=cost)

    async with aiometer.amap(
        _identity,
        [1, 2, 3],
        limiter=recording,
        cost=lambda x: -x if x == 3 else x,
        return_exceptions=True,
    ) as results:
        collected = [result async for result in results]
    errors = [r for r in collected if isinstance(r, Exception)]
    assert len(errors) == 1
    assert isinstance(errors[0], ValueError)
    assert sorted(r for r in collected if not isinstance(r, Exception)) == [1, 2]

    def bad_settle(item: int, result: int) -> float:
        if item == 1:
            raise LookupError("no usage in the reply")
        return -1 if item == 2 else 1

    with pytest.raises(LookupError, match="no usage"):
        await aiometer.run_on_each(_identity, [1], limiter=recording, settle=bad_settle)
    with pytest.raises(ValueError, match=r"settle\(item, result\) must be a finite number >= 0"):
        await aiometer.run_on_each(_identity, [2], max_at_once=1, settle=bad_settle)
    released = sum(1 for kind, _ in recording.events if kind == "release")
    assert released == len(recording.acquired)  # every permit given back


@pytest.mark.anyio
async def test_constant_cost_is_checked_before_any_work() -> None:
    called: list[int] = []

    async def work(x: int) -> None:
        called.append(x)

    with pytest.raises(ValueError, match="cost must be a finite number > 0, got 0"):
        await aiometer.run_on_each(work, [1, 2], cost=0)
    with pytest.raises(TypeError, match="settle must be callable, got int"):
        await aiometer.run_on_each(work, [1, 2], settle=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cost must be a number, got str"):
        aiometer.amap(work, [1], cost="1")  # type: ignore[call-overload]
    assert called == []


@pytest.mark.anyio
async def test_user_limiter_without_cost_keeps_working() -> None:
    old_style = _Recording(takes_cost=False)
    await aiometer.run_on_each(_noop, range(5), max_at_once=2, limiter=old_style)
    assert old_style.acquired == ["none"] * 5
    results = await aiometer.run_all(
        [functools.partial(_identity, n) for n in range(3)],
        limiter=old_style,
        settle=lambda fn, result: 1,
    )
    assert results == [0, 1, 2]
    # Given cost=, the engine passes it on: a limiter that cannot take it says so.
    with pytest.raises(TypeError, match="takes no argument"):
        await aiometer.run_on_each(_noop, [1], limiter=old_style, cost=2)


@pytest.mark.anyio
async def test_local_max_per_second_counts_cost() -> None:
    starts: list[float] = []

    async def record(x: int) -> None:
        starts.append(anyio.current_time())

    # 40 units per second and 10 units per call: a call every 0.25 s (0.5 s in all, not 1 s
    # as at twice the cost; a stall of the machine lengthens one gap, not the others).
    await aiometer.run_on_each(record, range(3), max_per_second=40, cost=10)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= 0.2 for gap in gaps), gaps
    assert sum(gaps) <= 0.5 + 0.4, gaps

    starts.clear()
    # A cost function: the calls take 2, 20 and 2 units of 40 per second (0.05, 0.5, 0.05 s),
    # each call's own cost after it: the first gap is far shorter than the 0.5 s it would
    # be if the next call's cost counted, however long the machine holds the test up.
    await aiometer.run_on_each(
        record, [2, 20, 2], max_at_once=1, max_per_second=40, cost=lambda x: x
    )
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert 0.04 <= gaps[0] <= 0.4, gaps
    assert 0.45 <= gaps[1] <= 0.5 + 0.4, gaps


@pytest.mark.anyio
async def test_run_on_each_holds_windows_and_settle_refunds_let_more_start() -> None:
    # A long window: without the refunds the third start would wait 3 s, far longer than the
    # bound below leaves a stalled machine.
    limiter = aiometer.RateLimiter(rates=[Rate(10, per=3)])
    starts: list[tuple[float, float]] = []

    async def call(x: int) -> int:
        starts.append((anyio.current_time(), 5))
        return 1

    # Estimated 5 each (two per window), really 1: the refunds let six start at once.
    with anyio.fail_after(2):
        await aiometer.run_on_each(
            call, range(6), max_at_once=1, limiter=limiter, cost=5, settle=lambda x, r: r
        )
    assert starts[-1][0] - starts[0][0] < 1
    assert limiter.statistics().used[0] <= 10

    limiter = aiometer.RateLimiter(rates=[Rate(10, per=0.3)])
    starts.clear()
    # Estimated 1, really 5: debt delays the later starts past the window.
    await aiometer.run_on_each(
        call, range(4), max_at_once=1, limiter=limiter, cost=1, settle=lambda x, r: 5
    )
    # Two settled calls fill a window of 10; starts at 0, 0, 0.3, 0.3 at the earliest.
    assert starts[-1][0] - starts[0][0] >= 0.3 - 0.03


@pytest.mark.anyio
@pytest.mark.parametrize("max_at_once", [None, 5])
async def test_impossible_constant_cost_fails_the_run_before_any_call(
    max_at_once: int | None,
) -> None:
    called: list[int] = []

    async def work(x: int) -> None:
        called.append(x)

    limiter = aiometer.RateLimiter(10, burst=2)
    with pytest.raises(ValueError, match="cost 5 can never start"):
        await aiometer.run_on_each(
            work, range(10), max_at_once=max_at_once, limiter=limiter, cost=5
        )
    assert called == []


@pytest.mark.anyio
async def test_cost_with_a_limiter_per_item() -> None:
    sites = {"a": _Recording(), "b": _Recording()}
    shared = _Recording()
    results = await aiometer.run_all(
        [functools.partial(_identity, n) for n in range(6)],
        max_at_once=3,
        limiter=lambda fn: [sites["ab"[fn.args[0] % 2]], shared],
        cost=lambda fn: fn.args[0] + 1,
        settle=lambda fn, result: result * 2,
    )
    assert results == list(range(6))
    assert sorted(sites["a"].acquired) == [1, 3, 5]
    assert sorted(sites["b"].acquired) == [2, 4, 6]
    assert sorted(shared.acquired) == [1, 2, 3, 4, 5, 6]
    settled = sorted(v[1] for kind, v in shared.events if kind == "settle")
    assert settled == [0, 2, 4, 6, 8, 10]


@pytest.mark.anyio
async def test_impossible_cost_from_a_cost_function_is_that_items_error() -> None:
    limiter = aiometer.RateLimiter(rates=[Rate(10, per=60)])
    results = await aiometer.run_all(
        [functools.partial(_identity, n) for n in (3, 30, 4)],
        max_at_once=2,
        limiter=limiter,
        cost=lambda fn: fn.args[0],
        return_exceptions=True,
    )
    assert results[0] == 3
    assert results[2] == 4
    assert isinstance(results[1], ValueError)
    assert "cost 30 can never start: Rate(10, per=60)" in str(results[1])
    assert limiter.statistics().used == (7.0,)


def test_check_cost() -> None:
    assert aiometer.RateLimiter(rates=[Rate(10, per=1)]).check_cost(10) == 10.0
    assert aiometer.ConcurrencyLimiter(1).check_cost(10**9) == 1e9
    with pytest.raises(ValueError, match="cost 2 can never start"):
        aiometer.RateLimiter(1).check_cost(2)
    with pytest.raises(TypeError, match="cost must be a number"):
        aiometer.ConcurrencyLimiter(1).check_cost("1")


@pytest.mark.anyio
async def test_windows_only_limiter_can_get_a_rate_later() -> None:
    limiter = aiometer.RateLimiter(rates=[Rate(100, per=1)])
    assert repr(limiter) == "RateLimiter(rates=[Rate(100, per=1)])"
    limiter.acquire_nowait(5)
    limiter.acquire_nowait(5)  # no GCRA yet: only the window counts
    # At 1/s the checks below run well inside the interval, however the machine stalls.
    limiter.max_per_second = 1
    began = anyio.current_time()
    limiter.acquire_nowait(1)
    with pytest.raises(anyio.WouldBlock):
        limiter.acquire_nowait(1)  # burst 1 at 1/s: the next start is 1 s away
    stats = limiter.statistics()
    assert stats.max_per_second == 1
    assert stats.used == (11.0,)
    assert 1 - (anyio.current_time() - began) - 1e-9 <= stats.next_start <= 1
