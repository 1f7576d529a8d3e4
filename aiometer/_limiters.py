"""The limiter protocol and the two in-process limiters.

A limiter hands out permits: ``acquire()`` waits until one more task may start and returns a
permit; the engine calls ``release()`` on that permit exactly once when the task ends, however it
ends. The engine takes limiters in a fixed order (concurrency before rate) so that a burst of
freed concurrency slots can never start more tasks than the rate allows.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import anyio
import anyio.lowlevel

from ._validation import check_burst, check_max_at_once, check_max_per_second
from ._waiting import Places, WaitQueue

__all__ = [
    "ConcurrencyLimiter",
    "ConcurrencyStatistics",
    "Limiter",
    "Permit",
    "RateLimiter",
    "RateStatistics",
    "SlotMixin",
]


@runtime_checkable
class Permit(Protocol):
    """The right of one task to run, handed out by :meth:`Limiter.acquire`."""

    async def release(self) -> None:
        """Give the permit back.

        Idempotent: a second call does nothing. Implementations must finish the release even when
        the calling scope is being cancelled (shield any I/O they do), so that cancellation can
        never leak a slot.
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
        """Wait until one more task may start and return its permit."""
        ...


class SlotMixin:
    """Adds ``async with limiter.slot(): ...`` to a class with an ``acquire()`` method."""

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Permit]:
        """Hold one permit for the duration of the ``async with`` block.

        Example::

            async with limiter.slot():
                await client.get(url)
        """
        permit = await self.acquire()  # type: ignore[attr-defined]
        try:
            yield permit
        finally:
            await permit.release()


class _NullPermit:
    """The permit of a limiter that has nothing to give back (rate limits)."""

    __slots__ = ()

    async def release(self) -> None:
        return None


_NULL_PERMIT = _NullPermit()

# The event loops' timers wait whole milliseconds (epoll), and a sleeper wakes a little after
# that: a sleep shorter than a millisecond ends about 1.1 ms later.
_TIMER_PRECISION = 0.001
# How much lateness is caught up at rates above 1000/s: the timer's millisecond plus the
# scheduling delay on top of it, with room to spare.
_FAST_CATCH_UP = 0.002


def _catch_up(interval: float) -> float:
    """How much lateness of a start is caught up by keeping the schedule."""
    return interval if interval >= _TIMER_PRECISION else _FAST_CATCH_UP


@dataclass(frozen=True)
class ConcurrencyStatistics:
    """A snapshot of a :class:`ConcurrencyLimiter`.

    Attributes:
        max_at_once: the current limit.
        held: permits handed out and not yet released.
        waiting: tasks blocked in ``acquire()``.
    """

    max_at_once: int
    held: int
    waiting: int


class _ConcurrencyPermit:
    __slots__ = ("_limiter",)

    def __init__(self, limiter: ConcurrencyLimiter) -> None:
        self._limiter: ConcurrencyLimiter | None = limiter

    async def release(self) -> None:
        limiter = self._limiter
        if limiter is not None:
            self._limiter = None
            limiter._release_one()


class ConcurrencyLimiter(SlotMixin):
    """At most ``max_at_once`` permits held at any moment; waiters are served first come, first
    served.

    One instance can be passed to several concurrent run calls (``limiter=``) so that a single
    limit covers all of them, and can be used directly with ``async with limiter.slot():``.
    Assigning :attr:`max_at_once` changes the limit for the next acquisitions; permits already
    held are not taken back.

    Raises:
        TypeError: ``max_at_once`` is not an int.
        ValueError: ``max_at_once`` is below 1.
    """

    def __init__(self, max_at_once: int) -> None:
        self._max_at_once = check_max_at_once(max_at_once)
        # A released permit goes straight to the longest waiter, so a newcomer calling
        # acquire() cannot overtake it and one release wakes exactly one waiter.
        self._places = Places(self._max_at_once)

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

    def statistics(self) -> ConcurrencyStatistics:
        """Return how many permits are held and how many tasks wait."""
        places = self._places
        return ConcurrencyStatistics(
            self._max_at_once, self._max_at_once - places.free, places.waiting
        )

    def acquire_nowait(self) -> Permit:
        """Take a permit without waiting.

        Raises:
            anyio.WouldBlock: no permit is free, or other tasks are already waiting for one.
        """
        if self._places.take_nowait():
            return _ConcurrencyPermit(self)
        raise anyio.WouldBlock

    async def acquire(self) -> Permit:
        """Wait for a free permit and take it."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        await self._places.take()
        return _ConcurrencyPermit(self)

    def _release_one(self) -> None:
        self._places.give(1)


@dataclass(frozen=True)
class RateStatistics:
    """A snapshot of a :class:`RateLimiter`.

    Attributes:
        max_per_second: the current limit.
        burst: how many starts may happen back to back after an idle period.
        waiting: tasks sleeping until their reserved start time.
        next_start: seconds until a new ``acquire()`` would return; 0.0 if it would return now.
    """

    max_per_second: float
    burst: int
    waiting: int
    next_start: float


class RateLimiter(SlotMixin):
    """At most ``max_per_second`` starts per second, with bursts of up to ``burst`` starts.

    This is the generic cell rate algorithm (GCRA) applied to the moments tasks really start.
    With ``burst=1`` starts are spaced ``1 / max_per_second`` apart (the meaning of aiometer
    1.0's ``max_per_second``); with ``burst=b`` up to ``b`` starts may happen at once after an
    idle period. Over any window of ``w`` seconds at most ``burst + max_per_second * w + 1``
    tasks start: the ``+ 1`` is the one start that may be caught up after the event loop woke a
    waiter late, and it is never more than one, however long the stall. Above 1000 starts per
    second, faster than the event loops' timers (about a millisecond), up to a millisecond's
    worth of starts may be caught up at once instead, which keeps the achieved rate at the
    limit.

    Waiters are served first come, first served: only the oldest sleeps until its start is
    allowed, and it hands over to the next when it starts or is cancelled. So a late wake-up
    neither shifts the schedule (no drift, the achieved rate stays at the limit) nor releases
    a bunch of starts at once. The permit has nothing to release: a rate limit does not care
    how long a task runs.

    Raises:
        TypeError: ``max_per_second`` is not a number or ``burst`` is not an int.
        ValueError: ``max_per_second`` is not finite and > 0, or ``burst`` is below 1.
    """

    def __init__(self, max_per_second: float, *, burst: int = 1) -> None:
        self._max_per_second = check_max_per_second(max_per_second)
        self._burst = check_burst(burst)
        self._interval = 1.0 / self._max_per_second
        self._catch_up = _catch_up(self._interval)
        # Theoretical arrival time of the next start (GCRA); -inf means "idle forever".
        self._tat = -math.inf
        # The head is the one waiter that sleeps until its start is allowed; the others queue
        # behind it and are woken one at a time, as the head hands over.
        self._head_busy = False
        self._queue = WaitQueue()

    def __repr__(self) -> str:
        return f"RateLimiter(max_per_second={self._max_per_second}, burst={self._burst})"

    @property
    def max_per_second(self) -> float:
        """The sustained number of starts per second."""
        return self._max_per_second

    @max_per_second.setter
    def max_per_second(self, value: float) -> None:
        rate = check_max_per_second(value)
        interval = 1.0 / rate
        # Rescale the backlog so that the new rate applies from now on.
        now = anyio.current_time()
        if self._tat > now:
            self._tat = now + (self._tat - now) * interval / self._interval
        self._max_per_second = rate
        self._interval = interval
        self._catch_up = _catch_up(interval)

    @property
    def burst(self) -> int:
        """How many starts may happen back to back after an idle period."""
        return self._burst

    @burst.setter
    def burst(self, value: int) -> None:
        self._burst = check_burst(value)

    def _delay(self, now: float) -> float:
        """Seconds until a start is allowed (<= 0: now)."""
        return self._tat - (self._burst - 1) * self._interval - now

    def statistics(self) -> RateStatistics:
        """Return the limit, the number of waiting tasks and the time to the next start."""
        delay = self._delay(anyio.current_time())
        return RateStatistics(self._max_per_second, self._burst, self._waiting(), max(delay, 0.0))

    def _fast_path_catch_up(self) -> float:
        return self._catch_up if self._interval < _TIMER_PRECISION else 0.0

    def _waiting(self) -> int:
        return len(self._queue) + self._head_busy

    def _take(self, now: float) -> None:
        # Above 1000 starts per second, faster than the timers, a caller that comes back within
        # the catch-up window of its slot (a spawn loop whose head waiter woke a timer tick
        # late) keeps the schedule: the missed slots are caught up instead of lost, or the
        # achieved rate would drop to about two starts per timer tick. Later than that, and at
        # lower rates, the start counts from now (plain GCRA), so an idle limiter never bursts.
        tat = self._tat
        if tat < now - self._fast_path_catch_up():
            tat = now
        self._tat = tat + self._interval

    def acquire_nowait(self) -> Permit:
        """Take a start that is allowed now, without waiting.

        Raises:
            anyio.WouldBlock: the next start is not allowed yet, or tasks are waiting.
        """
        now = anyio.current_time()
        if self._head_busy or self._delay(now) > 0:
            raise anyio.WouldBlock
        self._take(now)
        return _NULL_PERMIT

    async def acquire(self) -> Permit:
        """Wait until a start is allowed, in arrival order, and take it."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        now = anyio.current_time()
        if not self._head_busy:
            if self._delay(now) <= 0:
                self._take(now)
                return _NULL_PERMIT
            self._head_busy = True
        else:
            # Woken when the head hands over; the head role comes with the wake-up.
            await self._queue.wait(on_lost=self._hand_over)
        try:
            while (delay := self._delay(anyio.current_time())) > 0:
                await anyio.sleep(delay)
            # The head keeps the schedule (no drift from a late wake-up) but catches up at most
            # one interval of lateness, or two milliseconds (the timer precision of the event
            # loops plus scheduling) at rates above 1000/s: a long stall releases one extra
            # start, not a bunch.
            now = anyio.current_time() - self._catch_up
            self._tat = max(self._tat, now) + self._interval
        finally:
            self._hand_over()
        return _NULL_PERMIT

    def _hand_over(self) -> None:
        if not self._queue.wake(1):
            self._head_busy = False
