"""Push-back in process: ``pause``, ``throttled`` and ``adaptive=`` of the in-process limiters.

Times are checked on the limiter's own clock (``anyio.current_time()``): "no start before the
pause ends" is an exact comparison, not a timing. The rate-following tests use trio's
MockClock (exact), and the ones on both backends count starts over windows with tolerances.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import pytest
import trio
import trio.testing

import aiometer
import aiometer._waiting
from aiometer._adaptive import AdaptiveRate
from aiometer._windows import Reservation, Schedule

# -- options and arguments -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"factor": 1}, ValueError, "factor must be < 1"),
        ({"factor": 0}, ValueError, "factor must be a finite number > 0"),
        ({"factor": "half"}, TypeError, "factor must be a number, got str"),
        ({"cooldown": -1}, ValueError, "cooldown must be a finite number >= 0"),
        ({"floor": 0}, ValueError, "floor must be a finite number > 0"),
        ({"recovery": math.inf}, ValueError, "recovery must be a finite number > 0"),
        ({"recovery": True}, TypeError, "recovery must be a number, got bool"),
    ],
)
def test_adaptive_refuses_bad_options(
    options: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        aiometer.Adaptive(**options)  # type: ignore[arg-type]


def test_adaptive_defaults() -> None:
    options = aiometer.Adaptive()
    assert (options.factor, options.cooldown, options.floor, options.recovery) == (
        0.5,
        1.0,
        None,
        30.0,
    )
    assert options.floor_for(100) == 5.0
    assert aiometer.RateLimiter(100, adaptive=True).adaptive == options
    assert aiometer.RateLimiter(100).adaptive is None


def test_rate_limiter_refuses_adaptive_it_cannot_apply() -> None:
    with pytest.raises(TypeError, match="adaptive must be a bool or an Adaptive, got str"):
        aiometer.RateLimiter(10, adaptive="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="adaptive needs max_per_second"):
        aiometer.RateLimiter(rates=[aiometer.Rate(10, per=1)], adaptive=True)
    with pytest.raises(ValueError, match=r"floor must be <= max_per_second \(10\), got 20"):
        aiometer.RateLimiter(10, adaptive=aiometer.Adaptive(floor=20))
    limiter = aiometer.RateLimiter(10, adaptive=aiometer.Adaptive(floor=5))
    with pytest.raises(ValueError, match=r"floor must be <= max_per_second \(4\), got 5"):
        limiter.max_per_second = 4


Limiters = Callable[[], "aiometer.RateLimiter | aiometer.ConcurrencyLimiter"]
LIMITERS = [
    pytest.param(lambda: aiometer.RateLimiter(10), id="rate"),
    pytest.param(lambda: aiometer.ConcurrencyLimiter(2), id="concurrency"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("make", LIMITERS)
@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-1, ValueError, "must be a finite number of seconds >= 0, got -1"),
        (math.nan, ValueError, "must be a finite number of seconds >= 0, got nan"),
        ("1", TypeError, "must be a number of seconds, got str"),
    ],
)
async def test_pause_and_throttled_refuse_bad_durations(
    make: Limiters, value: object, error: type[Exception], match: str
) -> None:
    limiter = make()
    with pytest.raises(error, match="seconds " + match):
        await limiter.pause(value)  # type: ignore[arg-type]
    with pytest.raises(error, match="retry_after " + match):
        await limiter.throttled(retry_after=value)  # type: ignore[arg-type]
    assert limiter.statistics().paused_for == 0.0


# -- the pieces, with an explicit clock ------------------------------------------------------


def test_adaptive_rate_cuts_once_per_cooldown_never_below_the_floor() -> None:
    rate = AdaptiveRate(aiometer.Adaptive(factor=0.5, cooldown=1.0, floor=20, recovery=10), 100)
    assert rate.rate(0.0) == 100
    assert rate.cut(0.0)
    # The rest of the burst: inside the cool-down, no further cut.
    assert [rate.cut(t) for t in (0.0, 0.1, 0.5, 0.99)] == [False] * 4
    assert rate.rate(0.0) == 50
    assert rate.cuts == 1
    assert rate.cut(1.0)
    # 50 recovered 8 per second for 1 s (from 20 to 100 in 10 s), then halved.
    assert rate.rate(1.0) == pytest.approx(29.0)
    assert rate.cut(2.0)
    assert rate.rate(2.0) == 20  # floor (18.5 before it)
    assert rate.cuts == 3


def test_adaptive_rate_recovers_linearly_to_the_maximum() -> None:
    rate = AdaptiveRate(aiometer.Adaptive(factor=0.5, recovery=30), 100)
    rate.cut(10.0)
    # Floor 5 (1/20), slope (100 - 5) / 30 per second.
    assert rate.rate(10.0) == 50
    assert rate.rate(13.0) == pytest.approx(50 + 3 * 95 / 30)
    assert rate.rate(10.0 + 50 * 30 / 95 - 1e-6) < 100
    assert rate.rate(10.0 + 50 * 30 / 95 + 1e-6) == 100
    assert rate.rate(1000.0) == 100
    rate.set_maximum(40, 1000.0)
    assert rate.rate(1000.0) == 40
    rate.set_maximum(80, 1000.0)
    assert rate.rate(1000.0) == 40
    assert rate.rate(1000.0 + 40 * 30 / 76) == pytest.approx(80)


def test_schedule_starts_nothing_inside_a_pause_and_resumes_as_after_idle() -> None:
    schedule = Schedule(0.1, 2, (), Reservation)
    assert schedule.reserve(0.0, 1) is not None
    schedule.pause(5.0)
    schedule.pause(3.0)  # never shortens
    assert schedule.paused_until == 5.0
    assert schedule.reserve(4.9, 1, deadline=4.9) is None
    assert schedule.earliest(1.0, 1) == 5.0
    # After the pause: a burst of 2 at its end, then one per interval, counted from the end
    # (not a catch-up of the paused time).
    starts = []
    for _ in range(4):
        reservation = schedule.reserve(5.0, 1)
        assert reservation is not None
        starts.append(reservation.start)
    assert starts == pytest.approx([5.0, 5.0, 5.1, 5.2])


def test_schedule_with_windows_respects_a_pause() -> None:
    schedule = Schedule(None, 1, (aiometer.Rate(10, per=1),), Reservation)
    schedule.pause(2.0)
    reservation = schedule.reserve(0.5, 3)
    assert reservation is not None
    assert reservation.start == 2.0


# -- RateLimiter on both backends ------------------------------------------------------------


class Wakeups:
    def __init__(self) -> None:
        self.count = 0


@pytest.fixture
def queue_wakeups(monkeypatch: pytest.MonkeyPatch) -> Wakeups:
    """Counts the waiters of the limiters' wait queues that were resumed."""
    counter = Wakeups()
    real_event = anyio.Event

    class CountingEvent:
        def __init__(self) -> None:
            self._event = real_event()

        def set(self) -> None:
            self._event.set()

        async def wait(self) -> None:
            await self._event.wait()
            counter.count += 1

    monkeypatch.setattr(aiometer._waiting, "_new_signal", CountingEvent)
    return counter


async def _start_in_order(
    n: int, acquire: Callable[[], Awaitable[object]], starts: list[tuple[int, float]]
) -> Callable[[anyio.abc.TaskGroup], Awaitable[None]]:
    async def run(tg: anyio.abc.TaskGroup) -> None:
        async def one(i: int) -> None:
            await acquire()
            starts.append((i, anyio.current_time()))

        for i in range(n):
            tg.start_soon(one, i)
            # Each task reaches acquire() before the next is spawned: arrival order is i.
            await anyio.wait_all_tasks_blocked()

    return run


@pytest.mark.anyio
async def test_rate_pause_holds_every_start_keeps_the_order_and_wakes_nobody_early(
    queue_wakeups: Wakeups,
) -> None:
    limiter = aiometer.RateLimiter(1000, burst=3)
    starts: list[tuple[int, float]] = []
    # Long enough that queueing six tasks on a busy machine stays inside it.
    assert await limiter.pause(0.5) == pytest.approx(0.5)
    until = anyio.current_time() + 0.5
    with pytest.raises(anyio.WouldBlock):
        limiter.acquire_nowait()
    async with anyio.create_task_group() as tg:
        await (await _start_in_order(6, limiter.acquire, starts))(tg)
        stats = limiter.statistics()
        left = until - anyio.current_time()
        assert stats.waiting == 6
        assert 0 < stats.paused_for <= 0.5
        assert stats.paused_for == pytest.approx(left, abs=0.01)
        assert stats.next_start == pytest.approx(stats.paused_for, abs=0.01)
        # Extending the pause resumes no queued task (only the head sleeps, on a timer).
        before = anyio.current_time()
        await limiter.pause(0.6)
        left = await limiter.pause(0.01)  # shorter: ignored
        after = anyio.current_time()
        until = max(until, before + 0.6)
        assert 0.6 - (after - before) - 0.001 <= left <= 0.6
        assert limiter.statistics().paused_for > 0.01
        await anyio.wait_all_tasks_blocked()
        assert queue_wakeups.count == 0
    assert [i for i, _ in starts] == list(range(6))
    assert min(t for _, t in starts) >= until - 1e-9
    # The head started, then handed over one at a time: 5 wake-ups for 5 queued tasks.
    assert queue_wakeups.count == 5
    # Resumed as after idle: a burst of 3, then 1 ms apart (timer lateness tolerated).
    times = sorted(t for _, t in starts)
    assert times[5] - times[0] >= 0.002


@pytest.mark.anyio
async def test_rate_throttled_with_retry_after_pauses_and_without_changes_nothing() -> None:
    limiter = aiometer.RateLimiter(50)
    assert await limiter.throttled() is False
    stats = limiter.statistics()
    assert (stats.paused_for, stats.effective_max_per_second, stats.cuts) == (0.0, 50.0, 0)
    until = anyio.current_time() + 0.15
    await limiter.throttled(retry_after=0.15)
    assert 0 < limiter.statistics().paused_for <= 0.15
    await limiter.acquire()
    assert anyio.current_time() >= until - 1e-9
    assert limiter.statistics().effective_max_per_second == 50.0


@pytest.mark.anyio
async def test_a_burst_of_push_backs_cuts_once_per_cooldown() -> None:
    limiter = aiometer.RateLimiter(
        200, adaptive=aiometer.Adaptive(factor=0.5, cooldown=0.2, recovery=1000)
    )
    reports: list[bool] = []

    async def report() -> None:
        reports.append(await limiter.throttled())

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(report)
    assert sorted(reports) == [False] * 19 + [True]
    stats = limiter.statistics()
    assert stats.cuts == 1
    assert stats.effective_max_per_second == pytest.approx(100, rel=0.01)
    await anyio.sleep(0.25)
    for _ in range(20):
        await limiter.throttled()
    stats = limiter.statistics()
    assert stats.cuts == 2
    assert stats.effective_max_per_second == pytest.approx(50, rel=0.01)
    assert stats.max_per_second == 200


@pytest.mark.anyio
async def test_starts_follow_the_cut_rate() -> None:
    # 400/s cut twice to 25/s (no recovery to speak of): count starts over 0.6 s.
    limiter = aiometer.RateLimiter(
        400, adaptive=aiometer.Adaptive(factor=0.25, cooldown=0, recovery=10_000)
    )
    await limiter.throttled()
    await limiter.throttled()
    assert limiter.statistics().effective_max_per_second == pytest.approx(25, rel=0.01)
    starts: list[float] = []

    async def take() -> None:
        while True:
            await limiter.acquire()
            starts.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(take)
        await anyio.sleep(0.6)
        tg.cancel_scope.cancel()
    # At most burst + R * w + 1 = 1 + 15 + 1; at least most of 15 (a loaded machine).
    assert 8 <= len(starts) <= 17


# -- with trio's MockClock: exact times ------------------------------------------------------


def test_recovery_and_pause_on_a_mock_clock() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    seen: dict[str, object] = {}

    async def main() -> None:
        limiter = aiometer.RateLimiter(
            100, adaptive=aiometer.Adaptive(factor=0.5, cooldown=1, floor=10, recovery=9)
        )
        await limiter.throttled(retry_after=2)
        origin = trio.current_time()
        seen["cut"] = limiter.statistics().effective_max_per_second
        starts = []
        for _ in range(3):
            await limiter.acquire()
            starts.append(trio.current_time() - origin)
        seen["starts"] = starts
        # 3 s after the cut at 50/s, recovering 10 per second.
        await trio.sleep(3 - (trio.current_time() - origin))
        seen["after 3 s"] = limiter.statistics().effective_max_per_second
        await trio.sleep(10)
        seen["after 11 s"] = limiter.statistics().effective_max_per_second

    trio.run(main, clock=clock)
    assert seen["cut"] == 50
    # Nothing before the pause's end, then one per 1/rate (recovering meanwhile).
    starts = seen["starts"]
    assert isinstance(starts, list)
    assert starts[0] == pytest.approx(2.0)
    # At the pause's end the rate has recovered to 70/s.
    assert 2.0 + 1 / 72 < starts[1] <= 2.0 + 1 / 70 + 1e-9
    assert seen["after 3 s"] == pytest.approx(80)
    assert seen["after 11 s"] == 100


# -- ConcurrencyLimiter ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrency_pause_hands_freed_places_in_order_and_starts_at_the_end(
    queue_wakeups: Wakeups,
) -> None:
    limiter = aiometer.ConcurrencyLimiter(2)
    held = [await limiter.acquire(), await limiter.acquire()]
    starts: list[tuple[int, float]] = []
    async with anyio.create_task_group() as tg:
        await (await _start_in_order(3, limiter.acquire, starts))(tg)
        # Long enough that the checks below run inside it on a busy machine.
        until = anyio.current_time() + 0.5
        await limiter.throttled(retry_after=0.5)
        for permit in held:
            await permit.release()
        await anyio.wait_all_tasks_blocked()
        # Two places freed: exactly two waiters resumed, and both wait for the pause.
        assert queue_wakeups.count == 2
        stats = limiter.statistics()
        assert (stats.held, stats.waiting) == (0, 3)
        assert 0 < stats.paused_for <= 0.5
        with pytest.raises(anyio.WouldBlock):
            limiter.acquire_nowait()
        assert starts == []
        with anyio.fail_after(5):
            while len(starts) < 2:
                await anyio.sleep(0.01)
        # The two longest waiters got the freed places (they start at the same moment, in
        # either order); the third still waits.
        assert sorted(i for i, _ in starts) == [0, 1]
        assert min(t for _, t in starts) >= until - 1e-9
        assert limiter.statistics() == aiometer.ConcurrencyStatistics(2, 2, 1, 0.0)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_concurrency_pause_cancelled_sleeper_passes_its_place_on() -> None:
    limiter = aiometer.ConcurrencyLimiter(1)
    permit = await limiter.acquire()
    assert await limiter.pause(10) == pytest.approx(10)
    assert await limiter.pause(1) > 9
    assert await limiter.throttled(retry_after=1) is False
    starts: list[int] = []

    async def one(i: int) -> None:
        await limiter.acquire()
        starts.append(i)

    async with anyio.create_task_group() as tg:
        first = anyio.CancelScope()
        tg.start_soon(_run_in, first, one, 0)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(one, 1)
        await anyio.wait_all_tasks_blocked()
        await permit.release()  # the place goes to task 0, which sleeps until the pause ends
        await anyio.wait_all_tasks_blocked()
        assert limiter.statistics().waiting == 2
        first.cancel()
        await anyio.wait_all_tasks_blocked()
        # Task 1 has the place now, and still waits for the pause.
        stats = limiter.statistics()
        assert (stats.held, stats.waiting) == (0, 1)
        assert starts == []
        tg.cancel_scope.cancel()


async def _run_in(
    scope: anyio.CancelScope, func: Callable[[int], Awaitable[None]], arg: int
) -> None:
    with scope:
        await func(arg)


@pytest.mark.anyio
async def test_new_max_per_second_keeps_the_cut_rate_and_recovers_toward_the_new_one() -> None:
    limiter = aiometer.RateLimiter(
        100, adaptive=aiometer.Adaptive(factor=0.5, floor=10, recovery=10_000)
    )
    await limiter.throttled()
    limiter.max_per_second = 200
    stats = limiter.statistics()
    assert stats.max_per_second == 200
    assert stats.effective_max_per_second == pytest.approx(50, rel=0.01)
    limiter.max_per_second = 20
    assert limiter.statistics().effective_max_per_second == 20
    assert "adaptive=Adaptive(factor=0.5" in repr(limiter)
