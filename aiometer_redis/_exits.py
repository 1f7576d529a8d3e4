"""Leaving an ``async with`` block that runs background tasks, and which event loop runs us."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import anyio.lowlevel

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["LoopCheck", "current_loop", "exit_unwrapped"]


def _same(one: BaseException, other: BaseException) -> bool:
    """*one* is *other*, or a copy of the group *other* with the same leaves (trio splits
    groups on their way through a cancelled scope, which derives new group objects)."""
    if one is other:
        return True
    if not (isinstance(one, BaseExceptionGroup) and isinstance(other, BaseExceptionGroup)):
        return False
    return (
        one.message == other.message
        and len(one.exceptions) == len(other.exceptions)
        and all(_same(a, b) for a, b in zip(one.exceptions, other.exceptions, strict=True))
    )


def _only(group: BaseExceptionGroup[BaseException], exc: BaseException) -> bool:
    """True if *group* is *exc*, or only wraps *exc* (itself possibly a group)."""
    return _same(group, exc) or all(
        _same(inner, exc) or (isinstance(inner, BaseExceptionGroup) and _only(inner, exc))
        for inner in group.exceptions
    )


def current_loop() -> object:
    """The running event loop (asyncio) or run (trio), as an object compared by identity."""
    return anyio.lowlevel.current_token().native_token


class LoopCheck:
    """The event loop (or trio run) an object was entered in, checked cheaply on hot paths.

    ``anyio.current_time()`` and :func:`current_loop` look the backend up on every call
    (a few us each, several times per acquisition); bound to the loop once, the clock is
    the loop's own and the check one identity test.
    """

    __slots__ = ("_asyncio", "_trio_token", "clock", "loop")

    def __init__(self) -> None:
        #: The loop (:func:`current_loop`) bound last; None before.
        self.loop: object = None
        #: ``anyio.current_time()`` of that loop (the same clock, read directly).
        self.clock: Callable[[], float] = anyio.current_time
        self._asyncio = False
        self._trio_token: Callable[[], object] | None = None

    def bind(self) -> None:
        """Bind to the running loop."""
        loop = current_loop()
        self.loop = loop
        self._asyncio = isinstance(loop, asyncio.AbstractEventLoop)
        self._trio_token = None
        if self._asyncio:
            self.clock = loop.time  # type: ignore[attr-defined]
        elif type(loop).__module__.partition(".")[0] == "trio":
            import trio

            self.clock = trio.current_time
            self._trio_token = trio.lowlevel.current_trio_token
        else:  # pragma: no cover - another anyio backend
            self.clock = anyio.current_time

    def in_loop(self) -> bool:
        """Whether the running loop is the one bound (False outside any loop)."""
        try:
            if self._asyncio:
                return asyncio.get_running_loop() is self.loop
            if self._trio_token is not None:
                return self._trio_token() is self.loop
            return current_loop() is self.loop
        except RuntimeError:  # no loop of that kind runs here
            return False


async def exit_unwrapped(
    aexit: Callable[[], Awaitable[bool | None]], exc: BaseException | None
) -> bool | None:
    """Run *aexit* (the exit of a task group, or of a stack holding one) for an ``async with``
    block that raised *exc*: a group that only wraps *exc* is handed back as *exc* itself, so
    ``except SomeError`` around the block works."""
    try:
        return await aexit()
    except BaseExceptionGroup as group:
        if exc is None or not _only(group, exc):
            raise
    # Raised here, outside the handler, so that the group is not chained onto it.
    raise exc
