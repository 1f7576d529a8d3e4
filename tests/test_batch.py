"""The Batcher that merges the script calls of one process's coroutines."""

from __future__ import annotations

import sys

import anyio
import anyio.lowlevel
import pytest

from aiometer_redis._batch import Batcher
from aiometer_redis._exceptions import RedisReplyError

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup


@pytest.mark.anyio
async def test_a_failed_call_gives_each_waiter_its_own_exception() -> None:
    """Every caller of a failed call raises an exception object of its own (same type, same
    message, chained from the one the leader raises), so tracebacks do not pile up on one
    object and a group of the callers' failures holds distinct objects."""
    release = anyio.Event()
    calls: list[list[str]] = []

    async def run(items: list[str], deadline: float) -> list[object]:
        calls.append(items)
        await release.wait()
        raise RedisReplyError("limiter 'x': acquire failed with OOM", "OOM")

    batcher = Batcher(run)
    caught: list[BaseException] = []

    async def submit(item: str) -> None:
        try:
            await batcher.submit(item, anyio.current_time() + 10)
        except RedisReplyError as exc:
            caught.append(exc)
            raise

    with pytest.raises(ExceptionGroup) as group:
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(submit, str(i))
            await anyio.wait_all_tasks_blocked()
            release.set()

    assert sum(len(items) for items in calls) == 5
    assert len(caught) == 5
    assert len({id(exc) for exc in caught}) == 5
    assert len({id(exc) for exc in group.value.exceptions}) == 5
    # Each call's leader raises the call's exception; the others raise copies chained from it.
    originals = [exc for exc in caught if exc.__cause__ is None]
    assert len(originals) == len(calls) == 2
    for exc in caught:
        assert type(exc) is RedisReplyError
        assert str(exc) == "limiter 'x': acquire failed with OOM"
        assert exc.code == "OOM"
        assert exc in originals or any(exc.__cause__ is one for one in originals)


@pytest.mark.anyio
async def test_replies_still_go_to_their_callers() -> None:
    async def run(items: list[str], deadline: float) -> list[object]:
        await anyio.lowlevel.checkpoint()
        return [f"reply {item}" for item in items]

    batcher = Batcher(run)
    replies: dict[str, object] = {}

    async def submit(item: str) -> None:
        replies[item] = await batcher.submit(item, anyio.current_time() + 10)

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(submit, str(i))
    assert replies == {str(i): f"reply {i}" for i in range(5)}
