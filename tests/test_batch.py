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


@pytest.mark.anyio
async def test_a_posted_item_rides_with_the_next_call_or_goes_alone() -> None:
    """A posted item goes in front of the items of the next call, whoever sends it; flush()
    sends the items posted so far at once (or with the call a leader sends next); and with
    neither, the flusher sends them alone a few ticks later."""
    calls: list[list[str]] = []

    async def run(items: list[str], deadline: float) -> list[str]:
        calls.append(items)
        await anyio.sleep(0.01)
        return [f"ok {item}" for item in items if not item.startswith("-")]

    batcher = Batcher(run)
    deadline = anyio.current_time() + 5
    batcher.post("-a", deadline)
    assert await batcher.submit("b", deadline) == "ok b"
    batcher.post("-c", deadline)
    await batcher.flush()
    assert calls == [["-a", "b"], ["-c"]]
    async with anyio.create_task_group() as tg:
        tg.start_soon(batcher.flush_loop)
        batcher.post("-d", deadline)
        with anyio.fail_after(5):
            while batcher.pending:
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert calls[-1] == ["-d"]


@pytest.mark.anyio
async def test_a_queued_entry_never_waits_past_its_deadline() -> None:
    """An entry queued behind a call in flight leaves the queue with TimeoutError at its own
    deadline when that comes before the call in flight ends; when its deadline is the later
    one, it goes in the next call once the call in flight ends (here: fails at its deadline)."""
    calls: list[list[str]] = []

    async def run(items: list[str], deadline: float) -> list[str]:
        calls.append(items)
        if "slow" in items:
            await anyio.sleep_until(deadline)
            raise RedisReplyError("limiter 'x': no answer", "TIMEOUT")
        return [f"ok {item}" for item in items]

    batcher = Batcher(run)
    outcomes: dict[str, object] = {}
    ended: dict[str, float] = {}

    async def submit(item: str, seconds: float) -> None:
        try:
            outcomes[item] = await batcher.submit(item, anyio.current_time() + seconds)
        except (TimeoutError, RedisReplyError) as exc:
            outcomes[item] = type(exc).__name__
        ended[item] = anyio.current_time()

    began = anyio.current_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(submit, "slow", 0.3)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(submit, "early", 0.1)  # due before the call in flight ends
        tg.start_soon(submit, "late", 5.0)  # due after it
    assert outcomes["slow"] == "RedisReplyError"
    assert outcomes["early"] == "TimeoutError"
    assert outcomes["late"] == "ok late"
    assert calls == [["slow"], ["late"]]
    assert ended["early"] - began >= 0.1
    assert ended["early"] < ended["slow"]  # it did not wait for the call in flight
    assert ended["slow"] - began >= 0.3
