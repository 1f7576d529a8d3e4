"""The four run functions: thin sinks on top of the engine."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import LambdaType
from typing import Any, Literal, TypeVar, overload

import anyio
import anyio.lowlevel

from ._engine import (
    ClosingSource,
    CostArg,
    Engine,
    Selector,
    SettleArg,
    Source,
    check_costs,
    check_limiters,
    reraise_single,
)
from ._limiters import Limiter
from ._validation import check_callable, check_max_at_once, check_max_per_second
from ._waiting import Places, WaitQueue

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

__all__ = ["amap", "run_all", "run_any", "run_on_each"]

T = TypeVar("T")
R = TypeVar("R")

AsyncFns = Iterable[Callable[[], Awaitable[R]]] | AsyncIterable[Callable[[], Awaitable[R]]]
LimiterArg = Limiter | Sequence[Limiter] | Selector | None


def _check_limits(
    max_at_once: int | None, max_per_second: float | None, limiter: LimiterArg
) -> list[Limiter] | Selector:
    if max_at_once is not None:
        check_max_at_once(max_at_once)
    if max_per_second is not None:
        check_max_per_second(max_per_second)
    return check_limiters(limiter)


def _is_lambda(fn: object) -> bool:
    return isinstance(fn, LambdaType) and fn.__name__ == "<lambda>"


def _check_fns(async_fns: object, entrypoint: str) -> None:
    """Check a Sequence of functions up front; other iterables are checked as they are pulled."""
    if isinstance(async_fns, Sequence):
        for fn in async_fns:
            _check_fn(fn, entrypoint)


def _check_fn(fn: object, entrypoint: str) -> None:
    check_callable(fn, f"every item of {entrypoint}()'s async_fns")
    if _is_lambda(fn):
        raise ValueError(
            f"{entrypoint}() got a lambda in async_fns. A lambda made in a loop sees the loop "
            f"variable's last value, so every call would get the same argument. Use "
            f"functools.partial(async_fn, value) instead."
        )


def _checked_fns(async_fns: Any, entrypoint: str) -> Any:
    if isinstance(async_fns, Sequence):
        return async_fns
    if isinstance(async_fns, AsyncIterable):

        async def checked_async() -> AsyncIterator[Any]:
            async for fn in async_fns:
                _check_fn(fn, entrypoint)
                yield fn

        return ClosingSource(checked_async(), async_fns)

    def checked() -> Iterable[Any]:
        for fn in async_fns:
            _check_fn(fn, entrypoint)
            yield fn

    return checked()


async def run_on_each(
    async_fn: Callable[[T], Awaitable[Any]],
    args: Source[T],
    *,
    max_at_once: int | None = None,
    max_per_second: float | None = None,
    limiter: LimiterArg = None,
    cost: CostArg = None,
    settle: SettleArg = None,
) -> None:
    """Run ``async_fn(arg)`` for every item of *args*; return when all are done.

    Args:
        async_fn: the async function to call on each item.
        args: a sequence, any iterable (a generator, say) or an async iterable; pulled lazily,
            one item ahead of a free slot.
        max_at_once: at most this many calls run at the same time.
        max_per_second: at most this many calls start per second (burst 1).
        limiter: an :class:`aiometer.Limiter` or a sequence of them, taken after the local
            ``max_at_once`` slot and before the local ``max_per_second`` start; or a function
            of the item returning its limiter(s), e.g. one limiter per site: a busy site's
            items then wait in their own queue while the other sites' items keep flowing.
        cost: what one call costs the rate limits: a number, or a function of the item
            returning one (a finite number > 0). Every limiter is then acquired with
            ``acquire(cost=...)``, the local ``max_per_second`` included (it counts cost units;
            a call costing more than one unit starts when the schedule has room for all of
            it). ``max_at_once`` still counts calls. None (the default) calls ``acquire()``
            without an argument, so limiters of your own need not take a cost.
        settle: ``settle(item, result)`` returns the actual cost of a call that succeeded;
            every permit with a ``settle`` method (those of :class:`RateLimiter` and
            ``RedisLimiter``) is settled to it before it is released. A call that raises keeps
            its estimated cost.

    Raises:
        TypeError, ValueError: a bad argument, before anything runs, including a constant
            ``cost`` that a limiter refuses in its ``check_cost`` method (both in-process
            limiters have one). A ``cost`` function's bad or refused value, or an exception
            raised by ``cost`` or ``settle``, is the error of that item's call.
        Exception: the first exception raised by a call, as itself, after the other calls
            were cancelled; an ExceptionGroup if several failed at the same moment.

    Example::

        limiter = RateLimiter(rates=[Rate(500, per=60, counts="calls"), Rate(90_000, per=60)])
        await run_on_each(
            complete,
            prompts,
            max_at_once=20,
            limiter=limiter,
            cost=lambda prompt: estimate_tokens(prompt),
            settle=lambda prompt, reply: reply.usage.total_tokens,
        )
    """
    check_callable(async_fn, "async_fn")
    limiters = _check_limits(max_at_once, max_per_second, limiter)
    check_costs(cost, settle)
    engine = Engine(
        async_fn,
        args,
        max_at_once=max_at_once,
        max_per_second=max_per_second,
        limiters=limiters,
        cost=cost,
        settle=settle,
        deliver=None,
    )
    await engine.run()


@overload
async def run_all(
    async_fns: AsyncFns[R],
    *,
    max_at_once: int | None = ...,
    max_per_second: float | None = ...,
    limiter: LimiterArg = ...,
    cost: CostArg = ...,
    settle: SettleArg = ...,
    return_exceptions: Literal[False] = ...,
) -> list[R]: ...


@overload
async def run_all(
    async_fns: AsyncFns[R],
    *,
    max_at_once: int | None = ...,
    max_per_second: float | None = ...,
    limiter: LimiterArg = ...,
    cost: CostArg = ...,
    settle: SettleArg = ...,
    return_exceptions: Literal[True],
) -> list[R | Exception]: ...


async def run_all(
    async_fns: AsyncFns[R],
    *,
    max_at_once: int | None = None,
    max_per_second: float | None = None,
    limiter: LimiterArg = None,
    cost: CostArg = None,
    settle: SettleArg = None,
    return_exceptions: bool = False,
) -> list[R] | list[R | Exception]:
    """Call every function of *async_fns* and return their results in input order.

    Args:
        async_fns: functions taking no argument (use :func:`functools.partial`); a lambda is
            refused, since lambdas made in a loop all see the loop variable's last value.
        max_at_once, max_per_second, limiter: as for :func:`run_on_each`.
        cost, settle: as for :func:`run_on_each`; the item they get is the function.
        return_exceptions: if true, an exception raised by a function takes the place of its
            result and the others keep running.

    Raises:
        ValueError: *async_fns* holds a lambda (checked before anything runs for a sequence,
            as each item is pulled otherwise).
        Exception: as for :func:`run_on_each`, unless ``return_exceptions`` is true.
    """
    _check_fns(async_fns, "run_all")
    limiters = _check_limits(max_at_once, max_per_second, limiter)
    check_costs(cost, settle)
    results: list[Any] = [None] * len(async_fns) if isinstance(async_fns, Sequence) else []

    def deliver(index: int, value: Any) -> None:
        if index >= len(results):
            results.extend([None] * (index + 1 - len(results)))
        results[index] = value

    engine = Engine(
        None,
        _checked_fns(async_fns, "run_all"),
        max_at_once=max_at_once,
        max_per_second=max_per_second,
        limiters=limiters,
        cost=cost,
        settle=settle,
        deliver=deliver,
        on_error=deliver if return_exceptions else None,
    )
    await engine.run()
    return results


class _OrderedResults:
    """Ordered amap's results: a reorder buffer that the consumer reads in input order.

    Workers put every result into ``pending`` without waiting. The gate is a FIFO semaphore of
    ``window`` places: each pull takes one, and the consumer gives one back for each result it
    takes, so no item is pulled more than ``window`` ahead of the next result taken, and
    ``pending`` (results finished out of turn plus results ready and not yet taken) never
    holds more than ``window`` results however slow one task or the consumer is. A result
    taken wakes one worker waiting at the gate: one hand-off per item, where a reorder buffer
    feeding a separate bounded buffer needs two.
    """

    def __init__(self, window: int) -> None:
        self._next = 0
        self._pending: dict[int, Any] = {}
        self._places = Places(window)
        self._readers = WaitQueue()
        self._closed = False
        self._since_checkpoint = 0

    async def gate(self) -> None:
        await self._places.take()

    def deliver(self, index: int, value: Any) -> None:
        self._pending[index] = value
        if index == self._next and self._readers.waiting:
            self._readers.wake(1)

    def deliver_pair(self, index: int, value: Any) -> None:
        self.deliver(index, (index, value))

    def close(self) -> None:
        self._closed = True
        self._readers.wake_all()

    def __aiter__(self) -> _OrderedResults:
        return self

    async def __anext__(self) -> Any:
        pending = self._pending
        while self._next not in pending:
            if self._closed:
                raise StopAsyncIteration
            self._since_checkpoint = 0
            await self._readers.wait()
        value = pending.pop(self._next)
        self._next += 1
        self._places.give(1)
        if self._next in pending and self._readers.waiting:
            self._readers.wake(1)
        self._since_checkpoint += 1
        if self._since_checkpoint >= 64:
            self._since_checkpoint = 0
            await anyio.lowlevel.checkpoint()
        return value


@overload
def amap(
    async_fn: Callable[[T], Awaitable[R]],
    args: Source[T],
    *,
    max_at_once: int | None = ...,
    max_per_second: float | None = ...,
    limiter: LimiterArg = ...,
    cost: CostArg = ...,
    settle: SettleArg = ...,
    ordered: bool = ...,
    include_index: Literal[False] = ...,
    return_exceptions: Literal[False] = ...,
) -> AbstractAsyncContextManager[AsyncIterator[R]]: ...


@overload
def amap(
    async_fn: Callable[[T], Awaitable[R]],
    args: Source[T],
    *,
    max_at_once: int | None = ...,
    max_per_second: float | None = ...,
    limiter: LimiterArg = ...,
    cost: CostArg = ...,
    settle: SettleArg = ...,
    ordered: bool = ...,
    include_index: Literal[True],
    return_exceptions: Literal[False] = ...,
) -> AbstractAsyncContextManager[AsyncIterator[tuple[int, R]]]: ...


@overload
def amap(
    async_fn: Callable[[T], Awaitable[R]],
    args: Source[T],
    *,
    max_at_once: int | None = ...,
    max_per_second: float | None = ...,
    limiter: LimiterArg = ...,
    cost: CostArg = ...,
    settle: SettleArg = ...,
    ordered: bool = ...,
    include_index: Literal[False] = ...,
    return_exceptions: Literal[True],
) -> AbstractAsyncContextManager[AsyncIterator[R | Exception]]: ...


@overload
def amap(
    async_fn: Callable[[T], Awaitable[R]],
    args: Source[T],
    *,
    max_at_once: int | None = ...,
    max_per_second: float | None = ...,
    limiter: LimiterArg = ...,
    cost: CostArg = ...,
    settle: SettleArg = ...,
    ordered: bool = ...,
    include_index: Literal[True],
    return_exceptions: Literal[True],
) -> AbstractAsyncContextManager[AsyncIterator[tuple[int, R | Exception]]]: ...


def amap(
    async_fn: Callable[[T], Awaitable[R]],
    args: Source[T],
    *,
    max_at_once: int | None = None,
    max_per_second: float | None = None,
    limiter: LimiterArg = None,
    cost: CostArg = None,
    settle: SettleArg = None,
    ordered: bool = False,
    include_index: bool = False,
    return_exceptions: bool = False,
) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
    """Run ``async_fn(arg)`` for every item of *args* and iterate over the results.

    Use it as ``async with amap(fn, args) as results: async for result in results: ...``.

    Args:
        async_fn, args, max_at_once, max_per_second, limiter, cost, settle: as for
            :func:`run_on_each`.
        ordered: yield results in input order (default: as they finish). Backpressure still
            holds: workers run at most ``max_at_once`` items ahead of the next result due.
        include_index: yield ``(index, result)`` pairs, *index* being the item's position.
        return_exceptions: yield an exception raised by ``async_fn`` in place of its result
            instead of failing the whole block.

    The result buffer is bounded (``max_at_once`` results, or none when unbounded): a slow
    consumer slows the workers. Leaving the ``async with`` block, by ``break``, ``return`` or an
    exception, cancels the calls still running and closes an async generator passed as *args*.

    Raises:
        TypeError, ValueError: a bad argument, raised by this call before anything runs.
        Exception: the first exception raised by a call, from the ``async with`` block.
    """
    check_callable(async_fn, "async_fn")
    limiters = _check_limits(max_at_once, max_per_second, limiter)
    check_costs(cost, settle)
    return _amap(
        async_fn,
        args,
        max_at_once=max_at_once,
        max_per_second=max_per_second,
        limiters=limiters,
        cost=cost,
        settle=settle,
        ordered=ordered,
        include_index=include_index,
        return_exceptions=return_exceptions,
    )


class _Results:
    """The result buffer between amap's workers and its consumer.

    Holds at most *capacity* results: a worker delivering into a full buffer waits, which is
    how a slow consumer slows the workers down. ``capacity=None`` (amap without max_at_once,
    where nothing bounds the number of tasks anyway) never makes a worker wait. Each result
    taken frees one place and wakes one waiting worker; each result put wakes one waiting
    reader. A deque with FIFO waiter queues costs much less per item than a memory object
    stream.
    """

    def __init__(self, capacity: int | None) -> None:
        self._items: deque[Any] = deque()
        # Free places; a place freed while a worker waits is handed straight to it.
        self._free = capacity if capacity is not None else 0
        self._bounded = capacity is not None
        self._putters = WaitQueue()
        self._readers = WaitQueue()
        self._closed = False
        self._since_checkpoint = 0

    def put_nowait(self, value: Any) -> None:
        self._items.append(value)
        if self._readers.waiting:
            self._readers.wake(1)

    def put(self, value: Any) -> Awaitable[None] | None:
        """Put *value*; return None if it went in at once, else an awaitable to wait for room."""
        if self._free > 0:
            self._free -= 1
            self.put_nowait(value)
            return None
        return self._put_when_room(value)

    async def _put_when_room(self, value: Any) -> None:
        # Woken means a place was handed over; cancelled right after, it is passed on.
        await self._putters.wait(on_lost=self._give_place)
        self.put_nowait(value)

    def _give_place(self) -> None:
        if not self._putters.wake(1):
            self._free += 1

    def close(self) -> None:
        self._closed = True
        self._readers.wake_all()

    def __aiter__(self) -> _Results:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            self._since_checkpoint = 0
            await self._readers.wait()
        value = self._items.popleft()
        if self._bounded:
            if self._putters.waiting:
                self._putters.wake(1)
            else:
                self._free += 1
        # Taking buffered results needs no await; still let cancellation in now and then.
        self._since_checkpoint += 1
        if self._since_checkpoint >= 64:
            self._since_checkpoint = 0
            await anyio.lowlevel.checkpoint()
        return value


@asynccontextmanager
async def _amap(
    async_fn: Callable[[Any], Awaitable[Any]],
    args: Source[Any],
    *,
    max_at_once: int | None,
    max_per_second: float | None,
    limiters: list[Limiter] | Selector,
    cost: CostArg,
    settle: SettleArg,
    ordered: bool,
    include_index: bool,
    return_exceptions: bool,
) -> AsyncIterator[AsyncIterator[Any]]:
    results: _Results | _OrderedResults
    gate = None
    deliver: Callable[[int, Any], Awaitable[None] | None]
    if ordered:
        ordered_results = results = _OrderedResults(window=max_at_once or 2**62)
        gate = ordered_results.gate
        deliver = ordered_results.deliver_pair if include_index else ordered_results.deliver
    else:
        plain = results = _Results(max_at_once)
        put: Callable[[Any], Awaitable[None] | None] = (
            plain.put_nowait if max_at_once is None else plain.put
        )
        if include_index:

            def deliver_index(index: int, value: Any) -> Awaitable[None] | None:
                return put((index, value))

            deliver = deliver_index
        else:

            def deliver_value(index: int, value: Any) -> Awaitable[None] | None:
                return put(value)

            deliver = deliver_value

    engine = Engine(
        async_fn,
        args,
        max_at_once=max_at_once,
        max_per_second=max_per_second,
        limiters=limiters,
        cost=cost,
        settle=settle,
        deliver=deliver,
        on_error=deliver if return_exceptions else None,
        gate=gate,
    )

    async def produce() -> None:
        try:
            await engine.run()
        finally:
            results.close()

    failure: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            try:
                yield results
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        failure = reraise_single(group)
        if failure is None:
            raise
    if failure is not None:
        raise failure


async def run_any(
    async_fns: AsyncFns[R],
    *,
    max_at_once: int | None = None,
    max_per_second: float | None = None,
    limiter: LimiterArg = None,
    cost: CostArg = None,
    settle: SettleArg = None,
) -> R:
    """Return the result of the first function of *async_fns* to succeed.

    The other calls are cancelled as soon as one succeeds. A call that raises does not end the
    run while others may still succeed.

    Args:
        async_fns: functions taking no argument; lambdas are refused as in :func:`run_all`.
        max_at_once, max_per_second, limiter: as for :func:`run_on_each`.
        cost, settle: as for :func:`run_on_each`; the item they get is the function.

    Raises:
        ValueError: *async_fns* is empty or holds a lambda.
        Exception: every call failed: the one failure as itself, or an ExceptionGroup of all
            of them in input order.
    """
    _check_fns(async_fns, "run_any")
    if isinstance(async_fns, Sequence) and not async_fns:
        raise ValueError("run_any() needs at least one function, got an empty sequence")
    limiters = _check_limits(max_at_once, max_per_second, limiter)
    check_costs(cost, settle)
    results: list[R] = []
    errors: dict[int, Exception] = {}

    with anyio.CancelScope() as scope:

        def deliver(index: int, value: Any) -> None:
            if not results:
                results.append(value)
                scope.cancel()

        def on_error(index: int, exc: Exception) -> None:
            errors[index] = exc

        engine = Engine(
            None,
            _checked_fns(async_fns, "run_any"),
            max_at_once=max_at_once,
            max_per_second=max_per_second,
            limiters=limiters,
            cost=cost,
            settle=settle,
            deliver=deliver,
            on_error=on_error,
        )
        await engine.run()
    if results:
        return results[0]
    if not errors:
        raise ValueError("run_any() needs at least one function, got none")
    failures = [errors[index] for index in sorted(errors)]
    if len(failures) == 1:
        raise failures[0]
    raise ExceptionGroup(f"run_any(): all {len(failures)} functions failed", failures)
