"""The limiter protocol and the two in-process limiters.

A limiter hands out permits: ``acquire()`` waits until one more task may start and returns a
permit; the engine calls ``release()`` on that permit exactly once when the task ends, however it
ends. The engine takes limiters in a fixed order (concurrency before rate) so that a burst of
freed concurrency slots can never start more tasks than the rate allows.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.lowlevel

from ._adaptive import Adaptive, AdaptiveRate, check_adaptive, check_floor
from ._rate import Rate, check_rates
from ._validation import (
    check_actual_cost,
    check_burst,
    check_cost,
    check_max_at_once,
    check_max_per_second,
)
from ._waiting import Places, WaitQueue
from ._windows import Reservation, Schedule

__all__ = [
    "ConcurrencyLimiter",
    "ConcurrencyStatistics",
    "CostPermit",
    "Limiter",
    "Permit",
    "RateLimiter",
    "RateStatistics",
    "SlotMixin",
    "SpacingRateLimiter",
]


@runtime_checkable
class Permit(Protocol):
    """The right of one task to run, handed out by :meth:`Limiter.acquire`.

    Permits of limiters that count cost (:class:`RateLimiter`, ``RedisLimiter``) also have
    ``async def settle(actual)``; it is not part of this protocol, so a limiter of your own
    needs only ``release()``. The run functions call ``settle`` on the permits that have it.
    """

    async def release(self) -> None:
        """Give the permit back.

        Idempotent: a second call does nothing. Implementations must finish the release even when
        the calling scope is being cancelled (shield any I/O they do), so that cancellation can
        never leak a slot.
        """
        ...


@runtime_checkable
class CostPermit(Permit, Protocol):
    """A permit of a limiter that counts cost: it can also settle the actual cost.

    The permits of :class:`RateLimiter`, :class:`ConcurrencyLimiter` (a checked no-op) and
    ``aiometer_redis.RedisLimiter`` are CostPermits.
    """

    async def settle(self, actual: float) -> None:
        """Charge or refund the difference between *actual* (a finite number >= 0) and the
        cost charged so far, at the permit's original start.

        A second call replaces the first; a call after :meth:`release` is allowed.
        """
        ...


@runtime_checkable
class Limiter(Protocol):
    """Anything that can make a task wait before it starts.

    The run functions accept any object with this method through ``limiter=``; so do the
    in-process :class:`ConcurrencyLimiter` and :class:`RateLimiter` and
    ``aiometer_redis.RedisLimiter``.
    """

    async def acquire(self) -> Permit:
        """Wait until one more task may start and return its permit.

        The in-process limiters and ``RedisLimiter`` also take ``acquire(cost=...)``; the run
        functions pass ``cost`` only when they are given ``cost=``.
        """
        ...


P = TypeVar("P", bound=Permit)


class SlotMixin(Generic[P]):
    """Adds ``async with limiter.slot(): ...`` to a class with an ``acquire()`` method.

    The type parameter is the type of the permits ``acquire()`` returns.
    """

    @asynccontextmanager
    async def slot(self, cost: float = 1) -> AsyncIterator[P]:
        """Hold one permit of *cost* for the duration of the ``async with`` block.

        ``acquire()`` is called without an argument when *cost* is left at 1, so a class whose
        ``acquire()`` takes no cost keeps working.

        Example::

            async with limiter.slot(cost=len(batch)):
                await client.post(url, json=batch)
        """
        permit: P
        if cost.__class__ is int and cost == 1:
            permit = await self.acquire()  # type: ignore[attr-defined]
        else:
            permit = await self.acquire(cost=cost)  # type: ignore[attr-defined]
        try:
            yield permit
        finally:
            await permit.release()


# The event loops' timers wait whole milliseconds (epoll), and a sleeper wakes a little after
# that: a sleep shorter than a millisecond ends about 1.1 ms later.
_TIMER_PRECISION = 0.001
# How much lateness is caught up at rates above 1000/s: the timer's millisecond plus the
# scheduling delay on top of it, with room to spare.
_FAST_CATCH_UP = 0.002


def _catch_up(interval: float) -> float:
    """How much lateness of a start is caught up by keeping the schedule."""
    return interval if interval >= _TIMER_PRECISION else _FAST_CATCH_UP


def _fast_path_catch_up(interval: float) -> float:
    """How late a caller that does not wait may be and still keep the schedule."""
    return _FAST_CATCH_UP if interval < _TIMER_PRECISION else 0.0


def _check_seconds(value: object, name: str) -> float:
    """Return *value* as a float if it is a finite number >= 0 (a duration), else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ConcurrencyStatistics:
    """A snapshot of a :class:`ConcurrencyLimiter`.

    Attributes:
        max_at_once: the current limit.
        held: permits handed out and not yet released.
        waiting: tasks blocked in ``acquire()``, including those that will start as soon as a
            pause ends (each of them already has its place).
        paused_for: seconds left of the pause in force (see :meth:`ConcurrencyLimiter.pause`);
            0.0 if none.
    """

    max_at_once: int
    held: int
    waiting: int
    paused_for: float = 0.0


class _ConcurrencyPermit:
    __slots__ = ("_limiter",)

    def __init__(self, limiter: ConcurrencyLimiter) -> None:
        self._limiter: ConcurrencyLimiter | None = limiter

    async def settle(self, actual: float) -> None:
        """Nothing to settle: ``max_at_once`` counts tasks, not cost (*actual* is checked)."""
        check_actual_cost(actual)

    async def release(self) -> None:
        limiter = self._limiter
        if limiter is not None:
            self._limiter = None
            limiter._release_one()


class ConcurrencyLimiter(SlotMixin[CostPermit]):
    """At most ``max_at_once`` permits held at any moment; waiters are served first come, first
    served.

    One instance can be passed to several concurrent run calls (``limiter=``) so that a single
    limit covers all of them, and can be used directly with ``async with limiter.slot():``.
    Assigning :attr:`max_at_once` changes the limit for the next acquisitions; permits already
    held are not taken back. :meth:`pause` holds every start back for a while.

    Raises:
        TypeError: ``max_at_once`` is not an int.
        ValueError: ``max_at_once`` is below 1.
    """

    def __init__(self, max_at_once: int) -> None:
        self._max_at_once = check_max_at_once(max_at_once)
        # A released permit goes straight to the longest waiter, so a newcomer calling
        # acquire() cannot overtake it and one release wakes exactly one waiter.
        self._places = Places(self._max_at_once)
        # No start before this time (-inf: no pause, the hot path tests just that).
        self._paused_until = -math.inf
        # Tasks that have their place and sleep until the pause ends.
        self._sleepers = 0

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"ConcurrencyLimiter(max_at_once={stats.max_at_once}, held={stats.held}, "
            f"waiting={stats.waiting})"
        )

    @property
    def max_at_once(self) -> int:
        """The number of permits that may be held at once."""
        return self._max_at_once

    @max_at_once.setter
    def max_at_once(self, value: int) -> None:
        value = check_max_at_once(value)
        old, self._max_at_once = self._max_at_once, value
        self._places.give(value - old)

    def check_cost(self, cost: object) -> float:
        """Return *cost* as a float if it is a finite number > 0, else raise TypeError or
        ValueError (any valid cost is admitted: ``max_at_once`` counts tasks)."""
        return check_cost(cost)

    def statistics(self) -> ConcurrencyStatistics:
        """Return how many permits are held and how many tasks wait."""
        places = self._places
        sleepers = self._sleepers
        return ConcurrencyStatistics(
            self._max_at_once,
            self._max_at_once - places.free - sleepers,
            places.waiting + sleepers,
            self._paused_for(),
        )

    def _paused_for(self) -> float:
        if self._paused_until == -math.inf:
            return 0.0
        left = self._paused_until - anyio.current_time()
        if left <= 0:
            self._paused_until = -math.inf
            return 0.0
        return left

    async def pause(self, seconds: float) -> float:
        """Start nothing before *seconds* from now.

        A pause extends one in force, never shortens it. Permits already held are not taken
        back; tasks waiting keep their order: a place freed during the pause goes to the
        longest waiter, which starts when the pause ends. ``pause(0)`` changes nothing.

        Returns:
            Seconds until the pause in force ends (at least *seconds*).

        Raises:
            TypeError, ValueError: *seconds* is not a finite number >= 0.
        """
        seconds = _check_seconds(seconds, "seconds")
        until = anyio.current_time() + seconds
        if until > self._paused_until:
            self._paused_until = until
        return self._paused_for()

    async def throttled(self, retry_after: float | None = None) -> bool:
        """Report that the target pushed back: with *retry_after*, :meth:`pause` that long.

        ``max_at_once`` does not adapt (see :class:`RateLimiter`'s ``adaptive=``), so without
        *retry_after* this does nothing; it exists so that code reporting push-back can treat
        every limiter alike.

        Returns:
            False (nothing to cut).

        Raises:
            TypeError, ValueError: *retry_after* is not None or a finite number >= 0.
        """
        if retry_after is not None:
            await self.pause(_check_seconds(retry_after, "retry_after"))
        return False

    def acquire_nowait(self, cost: float = 1) -> CostPermit:
        """Take a permit without waiting (*cost* is checked, and ignored: a task is a task).

        Raises:
            TypeError, ValueError: *cost* is not a finite number > 0.
            anyio.WouldBlock: no permit is free, other tasks are already waiting for one, or a
                pause is in force.
        """
        if cost.__class__ is not int or cost != 1:
            check_cost(cost)
        if self._paused_until != -math.inf and self._paused_for() > 0:
            raise anyio.WouldBlock
        if self._places.take_nowait():
            return _ConcurrencyPermit(self)
        raise anyio.WouldBlock

    async def acquire(self, cost: float = 1) -> CostPermit:
        """Wait for a free permit and take it (*cost* is checked, and ignored: ``max_at_once``
        counts tasks).

        Raises:
            TypeError, ValueError: *cost* is not a finite number > 0.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        if cost.__class__ is not int or cost != 1:
            check_cost(cost)
        await self._places.take()
        if self._paused_until != -math.inf:
            await self._wait_for_pause()
        return _ConcurrencyPermit(self)

    async def _wait_for_pause(self) -> None:
        # The place is taken first, so the order of the queue is kept: the tasks that hold
        # places start together when the pause ends, and the next ones still queue behind.
        self._sleepers += 1
        try:
            while (left := self._paused_for()) > 0:
                await anyio.sleep(left)
        except BaseException:
            self._release_one()
            raise
        finally:
            self._sleepers -= 1

    def _release_one(self) -> None:
        self._places.give(1)


@dataclass(frozen=True)
class RateStatistics:
    """A snapshot of a :class:`RateLimiter`.

    Attributes:
        max_per_second: the current limit, or None if only ``rates`` limit the starts.
        burst: how many cost units may start back to back after an idle period.
        waiting: tasks sleeping until their start is allowed.
        next_start: seconds until a new ``acquire()`` (of cost 1) would return; 0.0 if it would
            return now.
        rates: the windows of the limiter, in the order given.
        used: for each window of ``rates``, what started in its last ``per`` seconds (cost, or
            calls for ``counts="calls"``), settled costs included.
        paused_for: seconds left of the pause in force (see :meth:`RateLimiter.pause`); 0.0
            if none.
        effective_max_per_second: the rate applied now: ``max_per_second``, or less after an
            adaptive limiter's cuts (see ``adaptive=``); None without ``max_per_second``.
        cuts: how many times push-back cut the rate (0 unless adaptive).
    """

    max_per_second: float | None
    burst: int
    waiting: int
    next_start: float
    rates: tuple[Rate, ...] = ()
    used: tuple[float, ...] = ()
    paused_for: float = 0.0
    effective_max_per_second: float | None = None
    cuts: int = 0


class _RatePermit(Reservation):
    """A started reservation: nothing to release, its cost can be settled."""

    __slots__ = ()

    async def release(self) -> None:
        return None

    async def settle(self, actual: float) -> None:
        """Charge or refund the difference between *actual* and the cost charged so far, at
        the original start (see :class:`RateLimiter`)."""
        self.schedule.settle(self, check_actual_cost(actual))


class RateLimiter(SlotMixin[CostPermit]):
    """At most ``max_per_second`` cost units started per second, with bursts of up to
    ``burst`` units, and at most ``limit`` units in any window of each ``Rate`` of ``rates``.

    ``max_per_second`` is the generic cell rate algorithm (GCRA) applied to the moments tasks
    really start. With ``burst=1`` starts of cost 1 are spaced ``1 / max_per_second`` apart
    (the meaning of aiometer 1.0's ``max_per_second``); with ``burst=b`` up to ``b`` units may
    start at once after an idle period; a start of cost ``c`` takes ``c / max_per_second`` of
    the schedule. Over any window of ``w`` seconds at most ``burst + max_per_second * w + 1``
    units start: the ``+ 1`` is the one start that may be caught up after the event loop woke
    a waiter late, and it is never more than one, however long the stall. Above 1000 starts
    per second, faster than the event loops' timers (about a millisecond), up to a
    millisecond's worth of starts may be caught up at once instead, which keeps the achieved
    rate at the limit.

    Each :class:`~aiometer.Rate` of ``rates`` is a sliding window, exact: the cost (or the
    number of calls) started in any ``per`` seconds never exceeds its ``limit`` plus the raises
    settled by permits in that window (how much a ``settle()`` put a permit above what it was
    charged just before): one overspending call exceeds the limit by at most its own
    overspend, and the debt delays the starts reserved after it until every window is back
    under its limit.
    An acquisition is charged to the GCRA and to every window, or waits; it never charges one
    window while another refuses. A window keeps one entry per start of its last ``per``
    seconds (about 100 bytes per start for all windows together, plus 8 per window).

    Waiters are served first come, first served: only the oldest sleeps until its start is
    allowed, and it hands over to the next when it starts or is cancelled. So a large cost at
    the head of the line is never overtaken by small ones behind it (they wait behind it), a
    late wake-up neither shifts the schedule nor releases a bunch of starts at once.

    The permit has nothing to release (a rate limit does not care how long a task runs), and
    has ``await permit.settle(actual)``: the difference between the actual cost and the cost
    acquired is charged (or refunded) at the permit's original start, in every ``counts="cost"``
    window and in the GCRA, so later starts move accordingly. A GCRA refund applies only while
    no later start was reserved; refunds always apply to the windows.

    When the target pushes back (a 429 or 503), report it with ``await
    limiter.throttled(retry_after)``: with a ``retry_after`` the limiter starts nothing for
    that long (:meth:`pause`), and with ``adaptive=`` the rate applied is cut multiplicatively,
    at most once per cool-down, then climbs back linearly to ``max_per_second`` while no more
    push-back arrives (see :class:`~aiometer.Adaptive`). Windows of ``rates`` do not adapt.

    Args:
        max_per_second: cost units per second (GCRA), or None for windows only.
        burst: units that may start back to back after an idle period (with max_per_second).
        rates: windows that hold together with ``max_per_second``.
        adaptive: True (the defaults of :class:`~aiometer.Adaptive`) or an ``Adaptive``: let
            ``throttled()`` cut the rate applied below ``max_per_second``. Needs
            ``max_per_second``.

    Raises:
        TypeError: ``max_per_second`` is not a number, ``burst`` is not an int, ``rates`` is
            not a sequence of Rate, or ``adaptive`` is neither a bool nor an Adaptive.
        ValueError: ``max_per_second`` is not finite and > 0, ``burst`` is below 1, two rates
            share ``per`` and ``counts``, neither ``max_per_second`` nor ``rates`` is given,
            ``adaptive`` without ``max_per_second``, or an adaptive floor above it.

    Example::

        limiter = RateLimiter(rates=[Rate(500, per=60, counts="calls"), Rate(200_000, per=60)])
        async with limiter.slot(cost=estimate) as permit:
            reply = await client.complete(prompt)
            await permit.settle(reply.tokens)
    """

    _whole_calls = False

    def __init__(
        self,
        max_per_second: float | None = None,
        *,
        burst: int = 1,
        rates: Iterable[Rate] = (),
        adaptive: bool | Adaptive = False,
    ) -> None:
        if max_per_second is not None:
            max_per_second = check_max_per_second(max_per_second)
        self._burst = check_burst(burst)
        windows = check_rates(rates)
        if max_per_second is None and not windows:
            raise ValueError("RateLimiter needs max_per_second or rates, got neither")
        options = check_adaptive(adaptive, max_per_second)
        self._max_per_second = max_per_second
        # The effective rate (None: not adaptive); the schedule runs at its current value.
        self._adaptive = (
            None
            if options is None or max_per_second is None
            else AdaptiveRate(options, max_per_second)
        )
        self._effective = max_per_second
        interval = None if max_per_second is None else 1.0 / max_per_second
        self._schedule = Schedule(interval, self._burst, windows, _RatePermit)
        self._schedule.whole_calls = self._whole_calls
        self._catch_up = 0.0 if interval is None else _catch_up(interval)
        self._fast_catch_up = 0.0 if interval is None else _fast_path_catch_up(interval)
        # The head is the one waiter that sleeps until its start is allowed; the others queue
        # behind it and are woken one at a time, as the head hands over.
        self._head_busy = False
        self._queue = WaitQueue()

    def __repr__(self) -> str:
        parts = []
        if self._max_per_second is not None:
            parts.append(f"max_per_second={self._max_per_second}, burst={self._burst}")
        if self._adaptive is not None:
            parts.append(f"adaptive={self._adaptive.options!r}")
        rates = self._schedule.rates
        if rates:
            parts.append(f"rates=[{', '.join(map(repr, rates))}]")
        return f"RateLimiter({', '.join(parts)})"

    @property
    def max_per_second(self) -> float | None:
        """The sustained number of cost units started per second (None: windows only)."""
        return self._max_per_second

    @max_per_second.setter
    def max_per_second(self, value: float) -> None:
        rate = check_max_per_second(value)
        adaptive = self._adaptive
        if adaptive is not None:
            check_floor(adaptive.options, rate)
        now = anyio.current_time()
        if adaptive is not None:
            # An adaptive limiter keeps its effective rate (at most the new maximum) and
            # recovers toward the new maximum.
            adaptive.set_maximum(rate, now)
            self._max_per_second = rate
            self._adapt(now)
            return
        self._max_per_second = rate
        self._set_effective(rate, now)

    def _set_effective(self, rate: float, now: float) -> None:
        interval = 1.0 / rate
        # The backlog is rescaled so that the new rate applies from now on.
        self._schedule.set_interval(interval, now)
        self._effective = rate
        self._catch_up = _catch_up(interval)
        self._fast_catch_up = _fast_path_catch_up(interval)

    def _adapt(self, now: float) -> None:
        assert self._adaptive is not None
        rate = self._adaptive.rate(now)
        if rate != self._effective:
            self._set_effective(rate, now)

    @property
    def adaptive(self) -> Adaptive | None:
        """The adaptive options, or None if the rate does not adapt."""
        return None if self._adaptive is None else self._adaptive.options

    async def pause(self, seconds: float) -> float:
        """Start nothing before *seconds* from now.

        A pause extends one in force, never shortens it. Tasks waiting keep their order: the
        longest waiter starts first when the pause ends, and after it the schedule resumes as
        after an idle period (at most ``burst`` at once, nothing caught up for the time
        paused). ``pause(0)`` changes nothing.

        Returns:
            Seconds until the pause in force ends (at least *seconds*).

        Raises:
            TypeError, ValueError: *seconds* is not a finite number >= 0.
        """
        seconds = _check_seconds(seconds, "seconds")
        now = anyio.current_time()
        schedule = self._schedule
        schedule.pause(now + seconds)
        return schedule.paused_until - now

    async def throttled(self, retry_after: float | None = None) -> bool:
        """Report that the target pushed back (a 429 or 503 answer).

        With *retry_after* (seconds, from the answer's ``Retry-After``), :meth:`pause` that
        long. With ``adaptive=``, cut the rate applied by the ``factor``, unless a cut happened
        less than ``cooldown`` seconds ago: report every push-back, the cool-down makes one
        burst of them count once. Without either, nothing changes.

        Returns:
            True if this report cut the rate.

        Raises:
            TypeError, ValueError: *retry_after* is not None or a finite number >= 0.

        Example::

            async with limiter.slot():
                response = await client.get(url)
            if response.status_code in (429, 503):
                await limiter.throttled(retry_after=seconds_from(response))
        """
        if retry_after is not None:
            retry_after = _check_seconds(retry_after, "retry_after")
        now = anyio.current_time()
        if retry_after is not None:
            self._schedule.pause(now + retry_after)
        if self._adaptive is not None and self._adaptive.cut(now):
            self._adapt(now)
            return True
        return False

    @property
    def burst(self) -> int:
        """How many cost units may start back to back after an idle period."""
        return self._burst

    @burst.setter
    def burst(self, value: int) -> None:
        self._burst = self._schedule.burst = check_burst(value)

    @property
    def rates(self) -> tuple[Rate, ...]:
        """The windows of the limiter, in the order given."""
        return self._schedule.rates

    def statistics(self) -> RateStatistics:
        """Return the limits, the waiting tasks, the time to the next start and the windows'
        usage."""
        now = anyio.current_time()
        adaptive = self._adaptive
        if adaptive is not None:
            self._adapt(now)
        schedule = self._schedule
        delay = schedule.earliest(now, 1) - now
        return RateStatistics(
            self._max_per_second,
            self._burst,
            self._waiting(),
            max(delay, 0.0),
            schedule.rates,
            schedule.used(now),
            max(schedule.paused_until - now, 0.0),
            self._effective,
            0 if adaptive is None else adaptive.cuts,
        )

    def _waiting(self) -> int:
        return len(self._queue) + self._head_busy

    def check_cost(self, cost: object) -> float:
        """Return *cost* as a float if this limiter can ever start it, else raise.

        The run functions call it before any work for a constant ``cost=``.

        Raises:
            TypeError, ValueError: *cost* is not a finite number > 0.
            ValueError: *cost* can never start (larger than ``burst`` with
                ``max_per_second``, or than the limit of a ``counts="cost"`` window).
        """
        value = check_cost(cost)
        reason = self._schedule.impossible(value)
        if reason is not None:
            raise ValueError(reason)
        return value

    def acquire_nowait(self, cost: float = 1) -> CostPermit:
        """Take a start of *cost* that is allowed now, without waiting.

        Raises:
            TypeError, ValueError: *cost* is not a finite number > 0, or can never start.
            anyio.WouldBlock: the start is not allowed yet (a pause included), or tasks are
                waiting.
        """
        if cost.__class__ is not int or cost != 1:
            cost = self.check_cost(cost)
        if self._head_busy:
            raise anyio.WouldBlock
        now = anyio.current_time()
        if self._adaptive is not None:
            self._adapt(now)
        permit = self._take_now(now, cost)
        if permit is None:
            raise anyio.WouldBlock
        return permit

    def _take_now(self, now: float, cost: float) -> _RatePermit | None:
        # Above 1000 starts per second, faster than the timers, a caller that comes back within
        # the catch-up window of its slot (a spawn loop whose head waiter woke a timer tick
        # late) keeps the schedule: the missed slots are caught up instead of lost, or the
        # achieved rate would drop to about two starts per timer tick. Later than that, and at
        # lower rates, the start counts from now (plain GCRA), so an idle limiter never bursts.
        schedule = self._schedule
        tat = schedule.tat
        return schedule.reserve(now, cost, now, tat if tat >= now - self._fast_catch_up else now)

    async def acquire(self, cost: float = 1) -> CostPermit:
        """Wait until a start of *cost* is allowed, in arrival order, and take it.

        Raises:
            TypeError, ValueError: at once, if *cost* is not a finite number > 0 or can never
                start (larger than ``burst`` with ``max_per_second``, or than the limit of a
                ``counts="cost"`` window).
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        if cost.__class__ is not int or cost != 1:
            cost = self.check_cost(cost)
        if not self._head_busy:
            now = anyio.current_time()
            if self._adaptive is not None:
                self._adapt(now)
            schedule = self._schedule
            tat = schedule.tat
            permit = schedule.reserve(
                now, cost, now, tat if tat >= now - self._fast_catch_up else now
            )
            if permit is not None:
                return permit
            self._head_busy = True
        else:
            # Woken when the head hands over; the head role comes with the wake-up.
            await self._queue.wait(on_lost=self._hand_over)
        schedule = self._schedule
        try:
            while True:
                now = anyio.current_time()
                if self._adaptive is not None:
                    self._adapt(now)
                # The head keeps the schedule (no drift from a late wake-up) but catches up at
                # most one interval of lateness, or two milliseconds (the timer precision of
                # the event loops plus scheduling) at rates above 1000/s: a long stall releases
                # one extra start, not a bunch. Windows always count the real start.
                caught_up = max(schedule.tat, now - self._catch_up)
                reservation = schedule.reserve(now, cost, now, caught_up)
                if reservation is not None:
                    break
                await anyio.sleep(schedule.earliest(now, cost) - now)
        finally:
            self._hand_over()
        return reservation

    def _hand_over(self) -> None:
        if not self._queue.wake(1):
            self._head_busy = False


class SpacingRateLimiter(RateLimiter):
    """The run functions' local ``max_per_second``: a call of cost ``c`` takes ``c /
    max_per_second`` of the schedule and starts once the schedule has room for all of it, so a
    cost above the burst waits instead of being refused. (Not exported: ``RateLimiter`` refuses
    such a cost, since its burst bound could not hold.)"""

    _whole_calls = True
