"""Swaps: a release rides with the same process's next acquisition (one acquire.lua call),
the freed slot still goes to the oldest waiter of the fleet, grants to the caller's own
waiters come back in the reply, and posted releases are never lost.

Two limiter objects with the same name stand for two processes (each has its own process id
and mailbox). Runs on asyncio (redis-py) and trio (coredis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers.tcp_proxy import Request, TcpProxy

from aiometer_redis import RedisLimiter
from aiometer_redis._client import ScriptArg
from aiometer_redis._scripts import Script
from aiometer_redis.testing import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
def connect(server: RedisServer, name: str) -> Any:
    """Makes a limiter of this test's name: one limiter object stands for one process."""

    def limiter(**options: Any) -> RedisLimiter:
        return RedisLimiter.from_url(server.url, name, **options)

    return limiter


class Calls:
    """Records the scripts a limiter runs: (script name, the ARGV after the header)."""

    def __init__(self, limiter: RedisLimiter) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        client = limiter._client
        assert client is not None
        run = client.run_script
        header = len(limiter.script_header)
        #: Set when a call carrying release items is sent; cleared by the test.
        self.swap_sent = anyio.Event()
        #: The calls sent with a PING in front (wake_first), as in ``calls``.
        self.woken_first: list[list[str]] = []

        async def recorded(
            script: Script,
            keys: Sequence[str],
            args: Sequence[ScriptArg],
            *,
            wake_first: bool = False,
        ) -> Any:
            tail = [str(a) for a in args[header:]]
            self.calls.append((script.name, tail))
            if wake_first:
                self.woken_first.append(tail)
            if script.name == "acquire" and any(a.startswith("-") for a in tail):
                self.swap_sent.set()
            return await run(script, keys, args, wake_first=wake_first)

        client.run_script = recorded  # type: ignore[method-assign]

    def named(self, name: str) -> list[list[str]]:
        return [tail for script, tail in self.calls if script == name]

    def swaps(self) -> list[list[str]]:
        """The acquire calls that carried release items."""
        return [tail for tail in self.named("acquire") if any(a.startswith("-") for a in tail)]


async def held_and_queued(*limiters: RedisLimiter) -> tuple[int, int]:
    """Holders and waiters in Redis, once every limiter given has sent its pending releases
    (statistics() sends them first)."""
    for limiter in limiters:
        stats = await limiter.statistics()
    return len(stats.holders), len(stats.waiters)


async def rpush_count(raw: Any) -> int:
    """Calls of RPUSH the server has run (scripts included): mailbox posts."""
    entry = (await raw.info("commandstats")).get("cmdstat_rpush")
    return 0 if entry is None else int(entry["calls"])


@pytest.mark.anyio
async def test_a_release_rides_with_the_next_acquisition(connect: Any) -> None:
    async with connect(max_at_once=1) as limiter:
        calls = Calls(limiter)
        for _ in range(20):
            async with limiter.slot():
                pass
        await limiter.statistics()  # sends the last release
        # 20 acquisitions, 20 releases: 19 swaps (release + acquire), the first acquire alone
        # and the last release alone (by the flusher or statistics()): 21 calls, no release.lua.
        assert calls.named("release") == []
        assert len(calls.named("acquire")) == 21
        assert len(calls.swaps()) == 20
        assert await held_and_queued(limiter) == (0, 0)


@pytest.mark.anyio
async def test_without_swaps_each_release_is_a_call_of_its_own(connect: Any) -> None:
    async with connect(max_at_once=1) as limiter:
        limiter._swap = False
        calls = Calls(limiter)
        for _ in range(5):
            async with limiter.slot():
                pass
            # release() has returned: Redis has freed the slot.
            assert limiter.is_idle()
        assert len(calls.named("release")) == 5
        assert len(calls.named("acquire")) == 5
        assert calls.swaps() == []


@pytest.mark.anyio
async def test_a_pending_release_goes_alone_when_no_acquisition_follows(connect: Any) -> None:
    async with connect(max_at_once=2) as limiter:
        calls = Calls(limiter)
        permit = await limiter.acquire()
        await permit.release()
        # release() did not wait for Redis: the release is pending.
        assert not limiter.is_idle()
        with anyio.fail_after(5):
            while not limiter.is_idle():
                await anyio.sleep(0.001)
        assert calls.swaps() == [[f"-{permit.lease_id}"]]
        assert await held_and_queued(limiter) == (0, 0)


@pytest.mark.anyio
async def test_pending_releases_are_sent_on_exit(connect: Any) -> None:
    async with connect(max_at_once=3) as watcher:
        async with connect(max_at_once=3) as limiter:
            permits = [await limiter.acquire() for _ in range(3)]
            assert await held_and_queued(watcher) == (3, 0)
            for permit in permits:
                await permit.release()
            assert not limiter.is_idle()
        # Left right after the releases: they were sent on the way out.
        assert await held_and_queued(watcher) == (0, 0)


@pytest.mark.anyio
async def test_statistics_sends_pending_releases_first(connect: Any) -> None:
    async with connect(max_at_once=1) as limiter:
        permit = await limiter.acquire()
        await permit.release()
        assert (await limiter.statistics()).holders == ()
        assert limiter.is_idle()


@pytest.mark.anyio
async def test_a_grant_to_an_own_waiter_comes_back_in_the_reply(connect: Any, raw: Any) -> None:
    async with connect(max_at_once=2) as x, connect(max_at_once=2) as y:
        y_permit = await y.acquire()  # y keeps one of the two slots throughout
        calls = Calls(x)
        order: list[str] = []
        first = await x.acquire()

        async def b() -> None:
            async with x.slot():
                order.append("b")

        before = await rpush_count(raw)
        async with anyio.create_task_group() as tg:
            tg.start_soon(b)
            with anyio.fail_after(5):
                while not (await x.statistics()).waiters:
                    await anyio.sleep(0.002)
            # x releases and asks again in one call: the slot goes to b (queued first) and
            # b's grant comes back in that call's reply; a queues behind b, and gets b's slot
            # from the call that carries b's release.
            calls.calls.clear()
            await first.release()
            async with x.slot():
                order.append("a")
        assert order == ["b", "a"]
        assert calls.swaps()[0][0] == f"-{first.lease_id}"
        # Both grants went to their waiters in replies: nothing was posted to a mailbox.
        assert await rpush_count(raw) == before
        await y_permit.release()
        assert await held_and_queued(x, y) == (0, 0)


@pytest.mark.anyio
async def test_the_freed_slot_goes_to_the_oldest_waiter_of_another_process(connect: Any) -> None:
    async with (
        connect(max_at_once=2) as x,
        connect(max_at_once=2) as y,
        connect(max_at_once=2) as z,
    ):
        z_permit = await z.acquire()  # z keeps one of the two slots throughout
        calls = Calls(x)
        order: list[str] = []
        x_permit = await x.acquire()

        async def take(limiter: RedisLimiter, label: str) -> None:
            async with limiter.slot():
                order.append(label)
                await anyio.sleep(0.01)

        async def queued(limiter: RedisLimiter, count: int) -> None:
            with anyio.fail_after(5):
                while len((await limiter.statistics()).waiters) < count:
                    await anyio.sleep(0.002)

        async with anyio.create_task_group() as tg:
            tg.start_soon(take, y, "y1")  # the oldest waiter, of process y
            await queued(x, 1)
            tg.start_soon(take, x, "x2")  # a waiter of x, younger
            await queued(x, 2)
            # x releases and asks again in one call: y1 gets the slot, then x2, then x3.
            calls.calls.clear()
            await x_permit.release()
            await take(x, "x3")
        assert order == ["y1", "x2", "x3"]
        assert calls.swaps()[0][0] == f"-{x_permit.lease_id}"
        await z_permit.release()
        assert await held_and_queued(x, y, z) == (0, 0)


@pytest.mark.anyio
@pytest.mark.parametrize("push", [True, False])
async def test_releases_after_a_queued_acquisition(connect: Any, push: bool) -> None:
    """Once a process's acquisition had to queue, its releases likely free slots for waiters
    of other processes. With a task of its own waiting (in Redis or at its local gate), a
    release rides with the next acquisition (which likely queues too, so it is marked '^':
    queued before the handoff reads the heads), behind a PING with pushed grants (so that
    Redis writes those grants before the swap's reply). With no task of its own waiting, the
    release goes alone at once, and release() waits for that call, not for an acquisition
    that may not come. Uncontended swaps, and any swap of a process woken through its
    mailbox, go without a PING, their acquisitions marked '+'."""
    x, y = connect(max_at_once=1), connect(max_at_once=1)
    for limiter in (x, y):
        limiter._push = push  # before entering: the wake-ups are chosen on entry
    async with x, y:
        calls = Calls(x)
        for _ in range(3):
            async with x.slot():
                pass
        x_permit = await x.acquire()
        assert len(calls.swaps()) == 3
        assert calls.woken_first == []

        async def take(limiter: RedisLimiter, hold: float) -> None:
            async with limiter.slot():
                await anyio.sleep(hold)

        async def queue_behind(limiter: RedisLimiter, hold: float, waiting: int) -> None:
            tg.start_soon(take, limiter, hold)
            with anyio.fail_after(5):
                while len((await x.statistics()).waiters) < waiting:
                    await anyio.sleep(0.002)

        async with anyio.create_task_group() as tg:
            await queue_behind(y, 0.05, 1)
            # y waits: x's swap hands the slot to y, and x's own acquisition queues.
            await x_permit.release()
            x_permit = await x.acquire()
        swaps = calls.swaps()
        assert len(swaps) == 4
        assert [swap[-1][0] for swap in swaps] == ["+"] * 4
        assert calls.woken_first == []

        # x's last acquisition queued and x has no waiter: the release goes alone, at once,
        # and has been answered when release() returns.
        await x_permit.release()
        assert x._acquires.pending == 0
        alone = calls.swaps()[4]
        assert alone == [f"-{x_permit.lease_id}"]
        assert calls.woken_first == ([alone] if push else [])

        # x's acquisition queues (behind y's hold); then, while x holds, y queues again and
        # a task of x waits at x's local gate (max_at_once=1): x's release rides with that
        # task's acquisition, marked '^'.
        async with anyio.create_task_group() as tg:
            tg.start_soon(take, y, 0.05)
            with anyio.fail_after(5):
                while not (await x.statistics()).holders:
                    await anyio.sleep(0.002)
            x_permit = await x.acquire()
            await queue_behind(y, 0.01, 1)
            tg.start_soon(take, x, 0)
            local = x._local
            assert local is not None
            with anyio.fail_after(5):
                while not local.statistics().waiting:
                    await anyio.sleep(0.002)
            await x_permit.release()
        (swap,) = (c for c in calls.swaps() if c[0] == f"-{x_permit.lease_id}")
        assert len(swap) == 2  # the release and the next acquisition
        assert swap[1].startswith("^")
        # (The release of x's last task, after an acquisition that queued, went alone too.)
        assert calls.woken_first[:2] == ([alone, swap] if push else [])
        assert await held_and_queued(x, y) == (0, 0)


@pytest.mark.anyio
@pytest.mark.parametrize("contended", [False, True])
async def test_a_caller_cancelled_during_its_swap_leaks_nothing(
    connect: Any, contended: bool
) -> None:
    async with (
        connect(max_at_once=1) as x,
        connect(max_at_once=1) as y,
    ):
        calls = Calls(x)
        permit = await x.acquire()
        got_y: list[bool] = []

        async def y_waits() -> None:
            async with y.slot():
                got_y.append(True)

        async with anyio.create_task_group() as tg:
            if contended:
                tg.start_soon(y_waits)  # queued: it gets the slot x releases
                with anyio.fail_after(5):
                    while not (await x.statistics()).waiters:
                        await anyio.sleep(0.002)
            with anyio.CancelScope() as scope:
                await permit.release()
                calls.swap_sent = anyio.Event()

                async def cancel_when_sent() -> None:
                    await calls.swap_sent.wait()
                    scope.cancel()

                tg.start_soon(cancel_when_sent)
                # The release rides with this acquisition; the caller is cancelled while the
                # call is in flight.
                await x.acquire()
                pytest.fail("the cancelled acquire returned a permit")
            assert scope.cancelled_caught
        assert calls.swaps(), "the release rode with the cancelled acquisition"
        assert got_y == ([True] if contended else [])
        with anyio.fail_after(5):
            while not x.is_idle():
                await anyio.sleep(0.002)
        # The release happened, the grant the cancelled caller got was given back (or its
        # queue entry withdrawn): nothing held, nothing queued.
        assert await held_and_queued(x, y) == (0, 0)
        assert x.is_idle()


@pytest.mark.anyio
async def test_a_release_sent_at_once_completes_in_a_cancelled_scope(connect: Any) -> None:
    """A release that goes alone at once (x's last acquisition queued, no task of x waits)
    is sent and answered even when its caller's scope is already cancelled: the slot goes to
    y's waiting task, and nothing stays held or queued."""
    async with connect(max_at_once=1) as x, connect(max_at_once=1) as y:
        got_y: list[bool] = []

        async def take_y(hold: float) -> None:
            async with y.slot():
                got_y.append(True)
                await anyio.sleep(hold)

        async with anyio.create_task_group() as tg:
            tg.start_soon(take_y, 0.05)
            with anyio.fail_after(5):
                while not (await x.statistics()).holders:
                    await anyio.sleep(0.002)
            permit = await x.acquire()  # queues behind y's hold
            tg.start_soon(take_y, 0)
            with anyio.fail_after(5):
                while not (await x.statistics()).waiters:
                    await anyio.sleep(0.002)
            assert x._release_at_once()
            with anyio.CancelScope() as scope:
                scope.cancel()
                await permit.release()
            assert x._acquires.pending == 0  # sent and answered, though cancelled
        assert got_y == [True, True]
        assert await held_and_queued(x, y) == (0, 0)


@pytest.mark.anyio
async def test_releasing_an_expired_lease_frees_nobody_elses_slot(connect: Any) -> None:
    async with (
        connect(max_at_once=1, lease_ttl=0.3) as x,
        connect(max_at_once=1, lease_ttl=30) as y,
    ):
        permit = await x.acquire()
        # x stops renewing (as a stalled process would): its lease expires and y takes the slot.
        x._leases.forget(permit.lease_id)
        with anyio.fail_after(5):
            y_permit = await y.acquire()
        queued = anyio.Event()
        got: list[str] = []

        async def x_again() -> None:
            queued.set()
            async with x.slot():
                got.append("x")

        async with anyio.create_task_group() as tg:
            # The stale release rides with x's next acquisition: it frees nothing, so x queues.
            await permit.release()
            tg.start_soon(x_again)
            await queued.wait()
            with anyio.fail_after(5):
                while not (await y.statistics()).waiters:
                    await anyio.sleep(0.002)
            stats = await y.statistics()
            assert [h.lease_id for h in stats.holders] == [y_permit.lease_id]
            assert got == []
            await y_permit.release()
        assert got == ["x"]
        assert await held_and_queued(x, y) == (0, 0)


@pytest.mark.anyio
@pytest.mark.backends("asyncio")  # redis-py: a cut connection is a failed attempt, retried
async def test_a_lost_swap_reply_does_not_strand_a_grant_to_an_own_waiter(
    connect: Any, server: RedisServer, name: str
) -> None:
    """The reply of a swap whose handoff granted this process's own waiter is lost (the
    connection is cut after the script ran): the retry releases nothing more and returns no
    grant, so the waiters ask again at once, well before their re-check (30 s here)."""
    dropped: list[Request] = []

    def first_swap(request: Request) -> bool:
        is_script = request[0].upper() in (b"EVALSHA", b"EVAL")
        if not dropped and is_script and any(a.startswith(b"-") for a in request[3:]):
            dropped.append(request)
            return True
        return False

    async with (
        TcpProxy(server.port, drop=first_swap) as proxy,
        connect(max_at_once=2) as y,
        RedisLimiter.from_url(proxy.url, name, max_at_once=2, recheck_interval=30) as x,
    ):
        y_permit = await y.acquire()  # y keeps one of the two slots throughout
        first = await x.acquire()
        got = anyio.Event()

        async def b() -> None:
            async with x.slot():
                got.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(b)
            with anyio.fail_after(5):
                while not (await y.statistics()).waiters:
                    await anyio.sleep(0.002)
            await first.release()  # goes alone: its handoff grants b, in the lost reply
            with anyio.fail_after(5):
                await got.wait()
        assert dropped
        assert len(proxy.dropped) == 1
        await y_permit.release()
        assert await held_and_queued(x, y) == (0, 0)


@pytest.mark.anyio
@pytest.mark.parametrize("workers", [12, 40])
async def test_statistics_returns_under_steady_load(
    server: RedisServer, name: str, workers: int
) -> None:
    """statistics() first sends the releases posted so far; under steady load some script
    call is always in flight, and it must not wait for a moment with none (before the fix it
    did not return while workers kept acquiring: here, not before they stop after 3 s)."""
    async with RedisLimiter.from_url(server.url, name, max_at_once=10) as limiter:
        done = 0
        stop = anyio.Event()

        async def worker() -> None:
            nonlocal done
            while not stop.is_set():
                async with limiter.slot():
                    await anyio.lowlevel.checkpoint()
                done += 1

        async def stop_later() -> None:
            await anyio.sleep(3)
            stop.set()

        async with anyio.create_task_group() as tg:
            for _ in range(workers):
                tg.start_soon(worker)
            await anyio.sleep(0.2)
            tg.start_soon(stop_later)
            began = anyio.current_time()
            statistics = await limiter.statistics()
            took = anyio.current_time() - began
            before = done
            await anyio.sleep(0.1)
            loaded = done > before
            stop.set()
            tg.cancel_scope.cancel()
        assert took < 2, took
        assert loaded  # the workers were still going when it returned
        assert len(statistics.holders) <= 10
