"""Targeted wake-ups: a FIFO queue of waiting tasks and a FIFO semaphore built on it.

Where several tasks wait for one condition, a shared event set on every change wakes all of
them for a single freed place (a thundering herd: the cost per item grows with the number of
waiters). Each waiter here has its own event instead, and the side that frees places wakes
exactly that many waiters, longest waiting first.
"""

from __future__ import annotations

from asyncio import Future, _get_running_loop
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = ["Places", "WaitQueue"]


class _Signal(Protocol):
    def set(self) -> None: ...

    def wait(self) -> Awaitable[object]: ...


# Tests replace this with a factory of counting events; None means "the running loop's own".
_new_signal: Callable[[], _Signal] | None = None


class _Waiter:
    """One waiting task's one-shot wake-up: a bare future on asyncio, a parked task on trio.

    Both are much cheaper than an ``anyio.Event`` per waiter. A cancelled wait cancels the
    future (or unparks the trio task), after which ``set()`` does nothing.
    """

    __slots__ = ("_event", "_future", "_task", "abandoned", "woken")

    def __init__(self) -> None:
        self.woken = False
        self.abandoned = False
        self._event: _Signal | None = None
        self._future: Future[None] | None = None
        self._task: Any = None
        if _new_signal is not None:
            self._event = _new_signal()
            return
        loop = _get_running_loop()
        if loop is not None:
            self._future = loop.create_future()

    def set(self) -> None:
        future = self._future
        if future is not None:
            if not future.done():
                future.set_result(None)
        elif self._event is not None:
            self._event.set()
        elif self._task is not None:
            task, self._task = self._task, None
            _trio().reschedule(task)

    def wait(self) -> Awaitable[object]:
        if self._future is not None:
            return self._future
        if self._event is not None:
            return self._event.wait()
        return self._park()

    async def _park(self) -> None:
        lowlevel = _trio()
        self._task = lowlevel.current_task()

        def abort(_: object) -> object:
            self._task = None
            return lowlevel.Abort.SUCCEEDED

        await lowlevel.wait_task_rescheduled(abort)


_TRIO_LOWLEVEL: Any = None


def _trio() -> Any:
    """``trio.lowlevel``, imported on first use (anyio runs only on asyncio and trio)."""
    global _TRIO_LOWLEVEL
    if _TRIO_LOWLEVEL is None:
        import trio.lowlevel

        _TRIO_LOWLEVEL = trio.lowlevel
    return _TRIO_LOWLEVEL


def _worth_compacting(abandoned: int, queued: int) -> bool:
    """Whether cancelled waiters make up enough of a queue to rebuild it without them.

    They are skipped when reached, but a queue that is never woken (a limit held for a long
    time while waiters time out) would otherwise keep every one of them.
    """
    return abandoned > 32 and 2 * abandoned > queued


def _live(queue: deque[_Waiter]) -> deque[_Waiter]:
    return deque(waiter for waiter in queue if not waiter.abandoned)


class WaitQueue:
    """Tasks waiting for one condition, woken first come, first served, *n* at a time.

    A waiter cancelled after it was woken passes its wake-up on to the next waiter, so a
    cancellation never loses one. A waiter cancelled before that is only marked abandoned
    (removing it from the middle of a deque would cost O(n)); wake() skips it.
    """

    __slots__ = ("_abandoned", "_queue", "waiting")

    def __init__(self) -> None:
        self._queue: deque[_Waiter] = deque()
        #: How many tasks wait (read-only; a plain attribute, cheap to test on hot paths).
        self.waiting = 0
        self._abandoned = 0

    def __len__(self) -> int:
        return self.waiting

    @property
    def backlog(self) -> int:
        """Entries kept in the queue: the waiting tasks plus cancelled ones not yet dropped."""
        return len(self._queue)

    async def wait(self, on_lost: Callable[[], object] | None = None) -> None:
        """Wait until woken by :meth:`wake`.

        If the task is cancelled after it was woken, *on_lost* is called (by default the
        wake-up is passed on to the next waiter).
        """
        waiter = _Waiter()
        self._queue.append(waiter)
        self.waiting += 1
        try:
            await waiter.wait()
        except BaseException:
            if not waiter.woken:
                waiter.abandoned = True
                self.waiting -= 1
                self._abandoned += 1
                if _worth_compacting(self._abandoned, len(self._queue)):
                    self._queue = _live(self._queue)
                    self._abandoned = 0
            elif on_lost is None:
                self.wake(1)
            else:
                on_lost()
            raise

    def wake(self, n: int = 1) -> int:
        """Wake the *n* longest waiting tasks (fewer if fewer wait); return how many."""
        queue = self._queue
        woken = 0
        while woken < n and queue:
            waiter = queue.popleft()
            if waiter.abandoned:
                self._abandoned -= 1
                continue
            waiter.woken = True
            self.waiting -= 1
            waiter.set()
            woken += 1
        return woken

    def wake_all(self) -> int:
        """Wake every waiting task; return how many."""
        return self.wake(self.waiting)


class Places:
    """A FIFO semaphore: *free* places, each freed place handed straight to the longest waiter.

    A freed place goes to a waiter before anyone else can take it, so a task arriving later
    never overtakes one that waits, and one freed place wakes exactly one waiter. *free* may go
    negative (a limit lowered while places are taken): the places given back first pay that
    off.
    """

    __slots__ = ("_free", "_queue")

    def __init__(self, free: int) -> None:
        self._free = free
        self._queue = WaitQueue()

    @property
    def free(self) -> int:
        """Places free now (negative: taken beyond the current number of places)."""
        return self._free

    @property
    def waiting(self) -> int:
        """How many tasks wait for a place."""
        return self._queue.waiting

    @property
    def backlog(self) -> int:
        """Entries kept in the queue: the waiting tasks plus cancelled ones not yet dropped."""
        return self._queue.backlog

    def take_nowait(self) -> bool:
        """Take a place if one is free; return whether one was taken.

        A free place implies that nobody waits: places are handed to waiters first.
        """
        if self._free > 0:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        """Wait for a place and take it (the caller checks for cancellation first)."""
        if self._free > 0:
            self._free -= 1
            return
        # Woken means a place was handed over; cancelled right after, it is passed on.
        await self._queue.wait(on_lost=self._pass_on)

    def _pass_on(self) -> None:
        self.give(1)

    def give(self, n: int = 1) -> None:
        """Free *n* places (or take -n back): hand them to waiters first, in arrival order."""
        self._free += n
        if self._free > 0 and self._queue.waiting:
            self._free -= self._queue.wake(self._free)
