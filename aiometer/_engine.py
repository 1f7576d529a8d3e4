"""The one scheduling engine behind run_on_each, run_all, amap and run_any.

Items flow like this::

    source --pull--> acquire limiters --> call --> release permits --> deliver to the sink

With ``max_at_once`` set, the engine starts ``max_at_once`` long-lived workers; each one pulls
the next item, takes the remaining limiters (user limiters, then the local rate), runs the
task and starts over. A pool is the local concurrency limit itself and costs a few
microseconds per item where spawning a task costs about twenty. Without ``max_at_once`` there
is no bound to size a pool by, so a single loop pulls items, takes the limiters and spawns one
task per item.

Either way an item is pulled only when a worker is free (or, unbounded, right before its task
is spawned), so a generator of any length runs in memory bounded by ``max_at_once``.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel

from ._limiters import Limiter, Permit, SpacingRateLimiter
from ._validation import (
    check_actual_cost,
    check_callable,
    check_cost,
    check_max_at_once,
    check_max_per_second,
)
from ._waiting import WaitQueue

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "ClosingSource",
    "CostArg",
    "Deliver",
    "Engine",
    "Selector",
    "SettleArg",
    "Source",
    "check_costs",
    "check_limiters",
    "reraise_single",
]

T = TypeVar("T")
Source = Iterable[T] | AsyncIterable[T]
Deliver = Callable[[int, Any], Awaitable[None] | None]

_DONE: Any = object()


Selector = Callable[[Any], "Limiter | Sequence[Limiter]"]
CostArg = float | Callable[[Any], float] | None
SettleArg = Callable[[Any, Any], float] | None


def check_costs(cost: CostArg, settle: SettleArg) -> None:
    """Check ``cost=`` (a number or a function of the item) and ``settle=`` (a function)."""
    if cost is not None and not callable(cost):
        check_cost(cost)
    if settle is not None:
        check_callable(settle, "settle")


def check_limiters(
    limiter: Limiter | Sequence[Limiter] | Selector | None,
) -> list[Limiter] | Selector:
    """Return ``limiter=`` as a list, or as is if it is a function that picks the limiters of
    each item; raise TypeError for anything else."""
    if limiter is None:
        return []
    if callable(limiter) and not hasattr(limiter, "acquire") and not isinstance(limiter, Sequence):
        return limiter
    given: list[Any] = list(limiter) if isinstance(limiter, Sequence) else [limiter]
    for item in given:
        if not callable(getattr(item, "acquire", None)):
            raise TypeError(
                f"limiter must be an aiometer.Limiter, a sequence of them, or a function of "
                f"the item returning them, got {type(item).__name__}"
            )
    limiters: list[Limiter] = given
    return limiters


def reraise_single(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """Return the only exception of a task group's *group*, or None if it holds several.

    A task group wraps even a single failure in an exception group; the run functions raise
    that failure as itself so that ``except SomeError`` works as with aiometer 1.0.
    """
    if len(group.exceptions) == 1:
        return group.exceptions[0]
    return None


_NO_PERMITS: tuple[Permit, ...] = ()


class ClosingSource:
    """An async iterable that wraps an async generator passed in by the user.

    The engine closes it (and with it the wrapped generator) on every way out, as it closes an
    async generator passed in directly.
    """

    def __init__(self, inner: AsyncIterator[Any], wrapped: object) -> None:
        self._inner = inner
        self._wrapped = wrapped

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._inner

    async def aclose(self) -> None:
        """Close the wrapper, then the wrapped async generator."""
        try:
            await self._inner.aclose()  # type: ignore[attr-defined]
        finally:
            aclose = getattr(self._wrapped, "aclose", None)
            if aclose is not None:
                await aclose()


def _cost_checks(limiters: Sequence[Limiter]) -> list[Callable[[float], object]]:
    """The ``check_cost`` methods of the limiters that have one."""
    checks = (getattr(limiter, "check_cost", None) for limiter in limiters)
    return [check for check in checks if callable(check)]


async def _release_all(permits: Sequence[Permit]) -> None:
    for permit in reversed(permits):
        await permit.release()


async def _abandon_all(permits: Sequence[Permit]) -> None:
    """Give back the permits taken for a task that will not run (a later limiter failed, or
    the acquisition was cancelled): each one with a ``settle`` method is settled to 0 first
    (nothing ran, so nothing is charged to its rate windows), then all are released."""
    for permit in reversed(permits):
        settle = getattr(permit, "settle", None)
        if settle is not None:
            # Best effort: if the refund fails the charge stays (the error being raised
            # already says what failed), and the permit is released all the same.
            with contextlib.suppress(Exception):
                await settle(0)
        await permit.release()


class Engine(Generic[T]):
    """Runs ``fn(item)`` (or ``item()`` when *fn* is None) for every item of *source*.

    Args:
        fn: the async function applied to each item, or None to call each item.
        source: the items, pulled lazily.
        max_at_once: size of the worker pool, or None for one task per item.
        max_per_second: local rate limit, taken after *limiters*.
        limiters: user limiters, taken in order after the local concurrency slot.
        deliver: called with ``(index, result)`` after the task's permits are released; may
            return an awaitable, which is awaited (this is how amap applies backpressure).
        on_error: called with ``(index, exception)`` for a task that raised an Exception;
            None means the exception propagates and fails the run.
        gate: awaited before each pull (ordered amap uses it to bound its reorder buffer).
        cost: the cost of each item (a number, or a function of the item) passed to every
            limiter's ``acquire(cost=...)``; None calls ``acquire()`` without an argument.
        settle: ``settle(item, result)`` returns the actual cost of a task that succeeded;
            each permit with a ``settle`` method is settled to it before it is released.
    """

    def __init__(
        self,
        fn: Callable[[T], Awaitable[Any]] | None,
        source: Source[T],
        *,
        max_at_once: int | None,
        max_per_second: float | None,
        limiters: list[Limiter] | Selector,
        deliver: Deliver | None,
        on_error: Deliver | None = None,
        gate: Callable[[], Awaitable[None]] | None = None,
        cost: CostArg = None,
        settle: SettleArg = None,
    ) -> None:
        if max_at_once is not None:
            check_max_at_once(max_at_once)
        check_costs(cost, settle)
        self._cost_fn: Callable[[Any], float] | None = None
        self._cost: float | None = None
        if callable(cost):
            self._cost_fn = cost
        elif cost is not None:
            self._cost = check_cost(cost)
        self._costed = cost is not None
        self._settle = settle
        self._run = self._run_settling if settle is not None else self._run_one
        self._select: Selector | None = None
        if callable(limiters):
            self._select = limiters
            self._limiters: list[Limiter] = []
        else:
            self._limiters = list(limiters)
        # The local max_per_second counts cost units too: a call of cost c takes
        # c / max_per_second of its schedule (burst 1: a cost above 1 starts once the
        # previous calls' time is paid).
        if max_per_second is not None:
            check_max_per_second(max_per_second)
            self._limiters.append(SpacingRateLimiter(max_per_second))
        # Limiters that can tell a cost they would never admit (check_cost) are asked before
        # anything runs (a constant cost) or as each item's cost is known.
        self._cost_checks = _cost_checks(self._limiters)
        if self._cost is not None:
            for check in self._cost_checks:
                check(self._cost)
        self._fn = fn
        self._max_at_once = max_at_once
        self._deliver = deliver
        self._on_error = on_error
        self._gate = gate
        self._index = 0
        self._async_source: AsyncIterator[T] | None = None
        self._sync_source: Iterator[T] | None = None
        self._closable: Any = None
        self._size_hint: int | None = None
        if isinstance(source, AsyncIterable):
            self._async_source = aiter(source)
            if inspect.isasyncgen(source) or isinstance(source, ClosingSource):
                self._closable = source
        elif isinstance(source, Iterable):
            if isinstance(source, Sequence):
                self._size_hint = len(source)
            self._sync_source = iter(source)
        else:
            raise TypeError(
                f"args must be an iterable or an async iterable, got {type(source).__name__}"
            )
        self._pull_lock = anyio.Lock() if self._async_source is not None else None
        # Per-limiter queues for limiter=<function of the item> (see _selecting_worker).
        self._parked: dict[tuple[int, ...], deque[tuple[int, Any, list[Limiter]]]] = {}
        self._parked_total = 0
        self._park_limit = max(16 * (max_at_once or 1), 256)
        self._busy: set[tuple[int, ...]] = set()
        # Selecting workers with nothing to do wait here; see _selecting_worker.
        self._idle = WaitQueue()
        self._exhausted = False

    async def run(self) -> None:
        """Run every item; raise the first failure as itself (several as a group)."""
        failure: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                if self._max_at_once is None:
                    await self._spawn_loop(tg)
                else:
                    workers = self._max_at_once
                    if self._size_hint is not None:
                        workers = min(workers, self._size_hint)
                    worker = self._worker if self._select is None else self._selecting_worker
                    for _ in range(workers):
                        tg.start_soon(worker)
        except BaseExceptionGroup as group:
            failure = reraise_single(group)
            if failure is None:
                raise
        finally:
            if self._closable is not None:
                with anyio.CancelScope(shield=True):
                    await self._closable.aclose()
        if failure is not None:
            raise failure

    async def _pull(self) -> tuple[int, Any]:
        if self._gate is not None:
            await self._gate()
        if self._sync_source is not None:
            item = next(self._sync_source, _DONE)
        else:
            assert self._async_source is not None
            assert self._pull_lock is not None
            async with self._pull_lock:
                try:
                    item = await self._async_source.__anext__()
                except StopAsyncIteration:
                    item = _DONE
        index = self._index
        if item is not _DONE:
            self._index = index + 1
        return index, item

    def _selected(self, item: Any) -> list[Limiter]:
        assert self._select is not None
        chosen = self._select(item)
        chosen_list = list(chosen) if isinstance(chosen, Sequence) else [chosen]
        for limiter in chosen_list:
            if not callable(getattr(limiter, "acquire", None)):
                raise TypeError(
                    f"the limiter= function must return a Limiter or a sequence of them, "
                    f"got {type(limiter).__name__}"
                )
        return chosen_list

    async def _run_selected(self, index: int, item: Any) -> None:
        if self._costed:
            await self._start_costed(index, item, self._selected(item))
        else:
            await self._run(index, item, await self._acquire(self._selected(item)))

    def _cost_of(self, item: Any, chosen: list[Limiter] | None = None) -> float:
        if self._cost_fn is None:
            assert self._cost is not None
            cost = self._cost
        else:
            cost = check_cost(self._cost_fn(item), "cost(item)")
            for check in self._cost_checks:
                check(cost)
        if chosen:
            for check in _cost_checks(chosen):
                check(cost)
        return cost

    async def _start_costed(self, index: int, item: Any, first: list[Limiter] | None) -> None:
        """Acquire the limiters with the item's cost and run it; a cost function's error is
        the task's error."""
        try:
            cost = self._cost_of(item, first)
        except Exception as exc:
            await self._fail(index, exc)
            return
        await self._run(index, item, await self._acquire(first, cost))

    async def _fail(self, index: int, exc: Exception) -> None:
        if self._on_error is None:
            raise exc
        delivered = self._on_error(index, exc)
        if delivered is not None:
            await delivered

    async def _selecting_worker(self) -> None:
        # With a limiter per item (e.g. one per site), a worker that would wait for a busy
        # site's limiter while another worker already waits for it parks the item in that
        # site's queue and pulls the next one instead, so a slow site cannot hold up the
        # others. Parked items are served first, in order, and there are at most
        # ``_park_limit`` of them: beyond that, workers stop pulling until a site frees up.
        #
        # A worker with nothing to do waits in ``_idle``, and each change that makes one job
        # possible wakes one worker: a site with parked items frees up, or the parked count
        # drops below the limit. Only the end of the work (source exhausted, nothing parked)
        # wakes them all, once, to return.
        while True:
            job = self._take_parked()
            if job is None:
                if self._exhausted or self._parked_total >= self._park_limit:
                    if self._exhausted and not self._parked_total:
                        return
                    await self._idle.wait()
                    continue
                index, item = await self._pull()
                if item is _DONE:
                    self._exhausted = True
                    if not self._parked_total:
                        self._idle.wake_all()
                    continue
                chosen = self._selected(item)
                key = tuple(map(id, chosen))
                if key in self._busy:
                    self._parked.setdefault(key, deque()).append((index, item, chosen))
                    self._parked_total += 1
                    continue
                job = (key, index, item, chosen)
            key, index, item, chosen = job
            cost = None
            if self._costed:
                try:
                    cost = self._cost_of(item, chosen)
                except Exception as exc:
                    await self._fail(index, exc)
                    await anyio.lowlevel.checkpoint()
                    continue
            self._busy.add(key)
            try:
                permits = await self._acquire(chosen, cost)
            finally:
                self._busy.discard(key)
                if key in self._parked:
                    self._idle.wake(1)
            await self._run(index, item, permits)
            await anyio.lowlevel.checkpoint()

    def _take_parked(self) -> tuple[tuple[int, ...], int, Any, list[Limiter]] | None:
        for key, queue in self._parked.items():
            if key not in self._busy:
                index, item, chosen = queue.popleft()
                if not queue:
                    del self._parked[key]
                self._parked_total -= 1
                if self._exhausted:
                    if not self._parked_total:
                        self._idle.wake_all()
                elif self._parked_total == self._park_limit - 1:
                    self._idle.wake(1)
                return key, index, item, chosen
        return None

    async def _acquire(
        self, first: list[Limiter] | None = None, cost: float | None = None
    ) -> list[Permit]:
        permits: list[Permit] = []
        try:
            if cost is None:
                for limiter in first or ():
                    permits.append(await limiter.acquire())
                for limiter in self._limiters:
                    permits.append(await limiter.acquire())
            else:
                for limiter in first or ():
                    permits.append(await limiter.acquire(cost=cost))  # type: ignore[call-arg]
                for limiter in self._limiters:
                    permits.append(await limiter.acquire(cost=cost))  # type: ignore[call-arg]
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _abandon_all(permits)
            raise
        return permits

    async def _run_one(self, index: int, item: Any, permits: Sequence[Permit]) -> None:
        fn = self._fn
        try:
            result = await (item() if fn is None else fn(item))
        except Exception as exc:
            if permits:
                await _release_all(permits)
            if self._on_error is None:
                raise
            delivered = self._on_error(index, exc)
        except BaseException:
            if permits:
                await _release_all(permits)
            raise
        else:
            if permits:
                await _release_all(permits)
            if self._deliver is None:
                return
            delivered = self._deliver(index, result)
        if delivered is not None:
            await delivered

    async def _run_settling(self, index: int, item: Any, permits: Sequence[Permit]) -> None:
        """``_run_one`` with ``settle=``: a task that succeeded settles its permits to the
        actual cost before they are released; an error of ``settle`` is the task's error."""
        fn = self._fn
        settle = self._settle
        assert settle is not None
        try:
            result = await (item() if fn is None else fn(item))
            actual = check_actual_cost(settle(item, result), "settle(item, result)")
            for permit in permits:
                settle_permit = getattr(permit, "settle", None)
                if settle_permit is not None:
                    await settle_permit(actual)
        except Exception as exc:
            if permits:
                await _release_all(permits)
            if self._on_error is None:
                raise
            delivered = self._on_error(index, exc)
        except BaseException:
            if permits:
                await _release_all(permits)
            raise
        else:
            if permits:
                await _release_all(permits)
            if self._deliver is None:
                return
            delivered = self._deliver(index, result)
        if delivered is not None:
            await delivered

    async def _worker(self) -> None:
        sync_source = self._sync_source if self._gate is None else None
        limiters = self._limiters
        run_one = self._run
        costed = self._costed and bool(limiters)
        checkpoint = anyio.lowlevel.checkpoint
        while True:
            if sync_source is not None:
                # Fast path: pulling from a plain iterator needs no await.
                item = next(sync_source, _DONE)
                if item is _DONE:
                    return
                index = self._index
                self._index = index + 1
            else:
                index, item = await self._pull()
                if item is _DONE:
                    return
            if costed:
                await self._start_costed(index, item, None)
            else:
                await run_one(index, item, await self._acquire() if limiters else _NO_PERMITS)
            # A task that never awaits would otherwise keep this worker from yielding.
            await checkpoint()

    async def _spawn_loop(self, tg: anyio.abc.TaskGroup) -> None:
        limiters = self._limiters
        run_one = self._run
        start_soon = tg.start_soon
        checkpoint = anyio.lowlevel.checkpoint
        sync_source = self._sync_source if self._gate is None else None
        while True:
            if sync_source is not None:
                item = next(sync_source, _DONE)
                if item is _DONE:
                    return
                index = self._index
                self._index = index + 1
            else:
                index, item = await self._pull()
                if item is _DONE:
                    return
            if self._select is not None:
                start_soon(self._run_selected, index, item)
                continue
            if not limiters:
                start_soon(run_one, index, item, _NO_PERMITS)
                continue
            if self._costed:
                try:
                    cost = self._cost_of(item)
                except Exception as exc:
                    await self._fail(index, exc)
                    continue
                start_soon(run_one, index, item, await self._acquire(None, cost))
            else:
                start_soon(run_one, index, item, await self._acquire())
            # Let the task begin before the next start is taken: when a rate limiter catches up
            # after a late timer, its tasks then begin one by one as they are granted, not all
            # together on the loop's next pass.
            await checkpoint()
