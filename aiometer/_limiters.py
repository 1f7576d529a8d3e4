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

# How late the event loops may wake a sleeper (asyncio's epoll waits whole milliseconds).
_TIMER_SLACK = 0.001


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
        self._held = 0
        # Insertion-ordered, so the first key is the longest waiter; removal of a cancelled
        # waiter is O(1).
        self._waiters: dict[anyio.Event, None] = {}

    def __repr__(self) -> str:
        return (
            f"ConcurrencyLimiter(max_at_once={self._max_at_once}, held={self._held}, "
            f"waiting={len(self._waiters)})"
        )

    @property
    def max_at_once(self) -> int:
        """The number of permits that may be held at once."""
        return self._max_at_once

    @max_at_once.setter
    def max_at_once(self, value: int) -> None:
        self._max_at_once = check_max_at_once(value)
        self._wake()

    def statistics(self) -> ConcurrencyStatistics:
        """Return how many permits are held and how many tasks wait."""
        return ConcurrencyStatistics(self._max_at_once, self._held, len(self._waiters))

    def acquire_nowait(self) -> Permit:
        """Take a permit without waiting.

        Raises:
            anyio.WouldBlock: no permit is free, or other tasks are already waiting for one.
        """
        if self._held < self._max_at_once and not self._waiters:
            self._held += 1
            return _ConcurrencyPermit(self)
        raise anyio.WouldBlock

    async def acquire(self) -> Permit:
        """Wait for a free permit and take it."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._held < self._max_at_once and not self._waiters:
            self._held += 1
            return _ConcurrencyPermit(self)
        event = anyio.Event()
        self._waiters[event] = None
        try:
            await event.wait()
        except BaseException:
            if event in self._waiters:
                del self._waiters[event]
            else:
                # The slot was handed to us as we were cancelled: pass it on.
                self._release_one()
            raise
        return _ConcurrencyPermit(self)

    def _release_one(self) -> None:
        self._held -= 1
        self._wake()

    def _wake(self) -> None:
        # A released slot goes straight to the longest waiter (``held`` is counted for it
        # here), so a newcomer calling acquire() cannot overtake it.
        while self._waiters and self._held < self._max_at_once:
            event = next(iter(self._waiters))
            del self._waiters[event]
            self._held += 1
            event.set()


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
        # Theoretical arrival time of the next start (GCRA); -inf means "idle forever".
        self._tat = -math.inf
        # Waiting tasks in arrival order; the first one is the head, the only one sleeping.
        self._waiters: dict[anyio.Event, None] = {}

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
        return RateStatistics(
            self._max_per_second, self._burst, len(self._waiters), max(delay, 0.0)
        )

    def acquire_nowait(self) -> Permit:
        """Take a start that is allowed now, without waiting.

        Raises:
            anyio.WouldBlock: the next start is not allowed yet, or tasks are waiting.
        """
        now = anyio.current_time()
        if self._waiters or self._delay(now) > 0:
            raise anyio.WouldBlock
        self._tat = max(self._tat, now) + self._interval
        return _NULL_PERMIT

    async def acquire(self) -> Permit:
        """Wait until a start is allowed, in arrival order, and take it."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        now = anyio.current_time()
        if not self._waiters and self._delay(now) <= 0:
            self._tat = max(self._tat, now) + self._interval
            return _NULL_PERMIT
        event = anyio.Event()
        self._waiters[event] = None
        try:
            if next(iter(self._waiters)) is not event:
                await event.wait()
            while (delay := self._delay(anyio.current_time())) > 0:
                await anyio.sleep(delay)
            # A queued waiter keeps the schedule (no drift from a late wake-up) but catches up
            # at most one interval of lateness, or one millisecond (the timer precision of the
            # event loops) at rates above 1000/s: a long stall releases one extra start, not a
            # bunch.
            now = anyio.current_time() - max(self._interval, _TIMER_SLACK)
            self._tat = max(self._tat, now) + self._interval
        finally:
            head = next(iter(self._waiters)) is event
            del self._waiters[event]
            if head and self._waiters:
                next(iter(self._waiters)).set()
        return _NULL_PERMIT
