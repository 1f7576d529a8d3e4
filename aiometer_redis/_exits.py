"""Leaving an ``async with`` block that runs background tasks, and which event loop runs us."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable

import anyio.lowlevel

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["current_loop", "exit_unwrapped"]


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
