"""Grants pushed over pub/sub: a process's waiters are woken by messages Redis publishes on the
process's channel, not by a BLPOP of its mailbox list (cluster clients keep the mailbox)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers.fleet import run_workers

from aiometer_redis import RedisLimiter
from aiometer_redis import _leases as leases_module
from aiometer_redis._client import ScriptClient, client_from_url
from aiometer_redis._keys import KeyLayout
from aiometer_redis._scripts import Script, decode_acquire_reply
from aiometer_redis.testing import RedisCluster3, RedisServer, max_overlap
from aiometer_redis.testing._resp import send_command

pytestmark = pytest.mark.redis

WORKER = Path(__file__).parent / "helpers" / "fleet_worker.py"
PREVIOUS_LUA = Path(__file__).parent / "helpers" / "previous_lua"

#: (flavour, backend): the client library the limiter is given, on each event loop it runs on.
FLAVOURS = [("redis-py", "asyncio"), ("coredis", "asyncio"), ("coredis-trio", "trio")]


@asynccontextmanager
async def open_client(flavour: str, url: str) -> AsyncIterator[Any]:
    """A client of *flavour* for *url* (the limiter is given it; the test closes it)."""
    if flavour == "redis-py":
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(url)
        try:
            yield client
        finally:
            await client.aclose()
    else:
        import coredis

        async with coredis.Redis.from_url(url) as other:
            yield other


async def queue_once(
    holder: RedisLimiter, waiter: RedisLimiter, meanwhile: Callable[[], Awaitable[None]]
) -> None:
    """A task of *waiter* queues for the slot *holder* takes, while *meanwhile* runs; then
    the slot is given back and the task takes it."""
    held = await holder.acquire()

    async def wait_once() -> None:
        async with waiter.slot():
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_once)
        await meanwhile()
        await held.release()


def command_stats(server: RedisServer) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (lower-case names)."""
    reply = send_command(server.port, "INFO", "commandstats")
    assert reply is not None
    return {
        command.lower(): int(calls)
        for command, calls in re.findall(r"cmdstat_([\w|]+):calls=(\d+)", reply)
    }


def reset_stats(server: RedisServer) -> None:
    assert send_command(server.port, "CONFIG", "RESETSTAT") == "+OK\r\n"


def pubsub_clients(server: RedisServer) -> int:
    reply = send_command(server.port, "CLIENT", "LIST", "TYPE", "pubsub")
    assert reply is not None
    return reply.count("id=")


async def zcard(server: RedisServer, key: str) -> int:
    reply = send_command(server.port, "ZCARD", key)
    assert reply is not None
    assert reply.startswith(":"), reply
    return int(reply[1:])


# -- a fleet of processes -----------------------------------------------------------------------

FLEET_CLIENTS = [
    pytest.param(["--backend", "asyncio", "--client", "redis"], id="asyncio-redis"),
    pytest.param(["--backend", "asyncio", "--client", "coredis"], id="asyncio-coredis"),
    pytest.param(["--backend", "trio", "--client", "coredis"], id="trio-coredis"),
]


@pytest.mark.slow
@pytest.mark.parametrize("client", FLEET_CLIENTS)
def test_fleet_wakeups_are_pushed(
    server: RedisServer, name: str, tmp_path: Path, client: list[str]
) -> None:
    # Four processes share two slots: most freed slots go to another process's waiter, and
    # every such wake-up is a PUBLISH of the script, read from the subscription: no BLPOP, no
    # mailbox list, and about one script call per task.
    limit = 2
    options = ["--max-at-once", str(limit), "--task-time", "0.005", "--pool", "4", *client]
    reset_stats(server)
    outs, _ = run_workers(
        WORKER, ["--url", server.url, "--name", name], [options] * 4, tmp_path, duration=1.5
    )
    stats = command_stats(server)
    intervals = [
        (float(a), float(b)) for out in outs for a, b in json.loads(out.read_text())["intervals"]
    ]
    tasks = len(intervals)
    assert tasks > 100
    assert max_overlap(intervals) <= limit
    assert stats.get("blpop", 0) == 0
    # A grant goes to the list of its channel's name only when published before its process
    # has subscribed (at most the first grant or two of each process here).
    assert stats.get("rpush", 0) <= 4 * limit, (stats, tasks)
    assert stats.get("publish", 0) > tasks / 4  # most grants cross processes
    requests = stats.get("evalsha", 0) + stats.get("eval", 0) + stats.get("subscribe", 0)
    assert requests / tasks < 1.5, (stats, tasks)


# -- one process, several limiter objects (each one is a process for Redis) -------------------


@pytest.mark.anyio
async def test_grants_to_another_limiter_arrive_by_push(
    server: RedisServer, name: str, flavour: str
) -> None:
    layout = KeyLayout.of(name)
    async with (
        open_client(flavour, server.url) as one,
        open_client(flavour, server.url) as two,
        RedisLimiter(one, name, max_at_once=1, recheck_interval=30) as first,
        RedisLimiter(two, name, max_at_once=1, recheck_interval=30) as second,
    ):
        reset_stats(server)
        permit = await first.acquire()
        got: list[float] = []

        async def wait_for_slot() -> None:
            async with second.slot():
                got.append(anyio.current_time())

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_slot)
            while await zcard(server, layout.keys[1]) == 0:  # queued
                await anyio.sleep(0.01)
            await anyio.sleep(0.2)  # subscribed (and the re-check made) by now
            released = anyio.current_time()
            await permit.release()
        # Pushed: well before the 30 s re-check.
        assert len(got) == 1
        assert got[0] - released < 1.0
        stats = command_stats(server)
        assert stats.get("blpop", 0) == 0
        assert stats.get("publish", 0) >= 1
        assert stats.get("subscribe", 0) == 1
        assert send_command(server.port, "EXISTS", second._mailbox) == ":0\r\n"
        assert second._mailbox.endswith("!")


@pytest.mark.anyio
async def test_a_subscribed_process_deletes_the_list_of_its_channel_name(
    server: RedisServer, name: str, flavour: str
) -> None:
    """A grant published while its process is not subscribed (yet) reaches nobody, and goes
    to the list of the channel's name (where a process refused SUBSCRIBE reads it). Once
    subscribed, the process asks again for its waiters and deletes that list: it would only
    grow, between subscriptions, until it expired."""
    async with (
        open_client(flavour, server.url) as one,
        open_client(flavour, server.url) as two,
        RedisLimiter(one, name, max_at_once=1, recheck_interval=30) as first,
        RedisLimiter(two, name, max_at_once=1, recheck_interval=30) as second,
    ):
        assert second._mailbox.endswith("!")
        # What such a grant leaves behind (second has no waiter yet, so no subscription).
        send_command(server.port, "RPUSH", second._mailbox, f"{second._mailbox}:9|1|0")

        async def list_deleted() -> None:
            with anyio.fail_after(5):
                while send_command(server.port, "EXISTS", second._mailbox) != ":0\r\n":
                    await anyio.sleep(0.01)

        await queue_once(first, second, list_deleted)


@pytest.mark.anyio
async def test_a_grant_pushed_before_its_waiter_is_queued_here_is_kept(
    server: RedisServer, name: str, flavour: str
) -> None:
    """The push loop may read a grant for a waiter before the task whose acquire call queued
    it runs again (on trio both can become ready in one scheduler batch, run in any order):
    the grant is kept for the waiter, not dropped until it asks again recheck_interval
    later."""
    async with (
        open_client(flavour, server.url) as one,
        open_client(flavour, server.url) as two,
        RedisLimiter(one, name, max_at_once=1, recheck_interval=30) as first,
        RedisLimiter(two, name, max_at_once=1, recheck_interval=30) as second,
    ):
        # second waits once, so that its subscription is live (it lingers 5 s).
        await queue_once(first, second, lambda: anyio.sleep(0.3))
        held = await first.acquire()
        delivered = anyio.Event()
        deliver = second._leases.deliver

        def delivering(message: str) -> None:
            deliver(message)
            delivered.set()

        second._leases.deliver = delivering  # type: ignore[method-assign]
        submit = second._submit_acquire

        async def submit_then_grant(*args: Any, **kwargs: Any) -> Any:
            reply = await submit(*args, **kwargs)
            if reply[0] == 0:
                # Queued: the slot comes free now, and the push loop reads its grant before
                # this task goes on.
                await held.release()
                with anyio.fail_after(2):
                    await delivered.wait()
            return reply

        second._submit_acquire = submit_then_grant  # type: ignore[method-assign]
        with anyio.fail_after(3):
            permit = await second.acquire()
        await permit.release()


@pytest.mark.anyio
async def test_push_off_keeps_the_mailbox(server: RedisServer, name: str, flavour: str) -> None:
    async with open_client(flavour, server.url) as one, open_client(flavour, server.url) as two:
        first = RedisLimiter(one, name, max_at_once=1, recheck_interval=30)
        second = RedisLimiter(two, name, max_at_once=1, recheck_interval=30)
        second._push = False
        async with first, second:
            reset_stats(server)
            permit = await first.acquire()
            async with anyio.create_task_group() as tg:
                tg.start_soon(second.acquire)
                await anyio.sleep(0.2)
                released = anyio.current_time()
                await permit.release()
            assert anyio.current_time() - released < 1.0
            stats = command_stats(server)
            assert stats.get("subscribe", 0) == 0
            assert stats.get("publish", 0) == 0
            assert stats.get("blpop", 0) >= 1
            assert not second._mailbox.endswith("!")
            await second.reset()


@pytest.mark.anyio
async def test_subscriber_killed_while_waiters_are_queued(
    server: RedisServer, name: str, flavour: str
) -> None:
    # Each round: the holder keeps both slots while the other limiter queues two waiters; the
    # subscription's connection is killed, and both slots are released at once. Grants published
    # while it reconnects are lost, but the re-subscription wakes the waiters to ask again: they
    # get their slots well before their own re-check (10 s).
    layout = KeyLayout.of(name)
    rounds = 6
    waits: list[float] = []

    async def take(limiter: RedisLimiter, got: list[float], done: anyio.Event) -> None:
        async with limiter.slot():
            got.append(anyio.current_time())
            if len(got) == 2:
                done.set()
            await done.wait()

    async with (
        open_client(flavour, server.url) as one,
        open_client(flavour, server.url) as two,
        RedisLimiter(one, name, max_at_once=2, recheck_interval=10) as holder,
        RedisLimiter(two, name, max_at_once=2, recheck_interval=10) as waiter,
    ):
        for _ in range(rounds):
            permits = [await holder.acquire(), await holder.acquire()]
            done = anyio.Event()
            got: list[float] = []
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(take, waiter, got, done)
                    tg.start_soon(take, waiter, got, done)
                    while await zcard(server, layout.keys[1]) < 2:
                        await anyio.sleep(0.01)
                    while pubsub_clients(server) == 0:
                        await anyio.sleep(0.01)
                    reply = send_command(server.port, "CLIENT", "KILL", "TYPE", "pubsub")
                    assert reply is not None
                    assert reply.startswith(":")
                    released = anyio.current_time()
                    for permit in permits:
                        await permit.release()
            waits.append(max(got) - released)
        assert not waiter._leases.waiters
        assert not holder._leases.held
    # Every waiter got its slot; allow one round in six to be slow (a loaded machine).
    assert len(waits) == rounds
    assert sum(wait < 2.0 for wait in waits) >= rounds - 1, waits
    assert await zcard(server, layout.keys[0]) == 0  # holders
    assert await zcard(server, layout.keys[1]) == 0  # queue


@pytest.mark.anyio
async def test_subscription_is_dropped_once_nobody_waits(
    server: RedisServer, name: str, flavour: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leases_module, "PUSH_LINGER", 0.2)
    monkeypatch.setattr(leases_module, "_PUSH_POLL", 0.05)
    before = pubsub_clients(server)
    async with (
        open_client(flavour, server.url) as one,
        open_client(flavour, server.url) as two,
        RedisLimiter(one, name, max_at_once=1) as first,
        RedisLimiter(two, name, max_at_once=1) as second,
    ):
        # No waiter yet: no subscription.
        await anyio.sleep(0.1)
        assert pubsub_clients(server) == before
        permit = await first.acquire()
        async with anyio.create_task_group() as tg:
            tg.start_soon(second.acquire)
            await anyio.sleep(0.2)
            assert pubsub_clients(server) == before + 1
            await permit.release()
        # Subscribed while the waiter waited; dropped PUSH_LINGER after it left.
        with anyio.fail_after(5):
            while pubsub_clients(server) > before:
                await anyio.sleep(0.05)
    assert pubsub_clients(server) == before


@pytest.mark.anyio
async def test_leaving_while_subscribed_closes_the_subscription(
    server: RedisServer, name: str, flavour: str
) -> None:
    before = pubsub_clients(server)
    async with (
        open_client(flavour, server.url) as one,
        open_client(flavour, server.url) as two,
        RedisLimiter(one, name, max_at_once=1) as first,
    ):
        permit = await first.acquire()
        async with RedisLimiter(two, name, max_at_once=1) as second:
            with anyio.move_on_after(0.3):
                await second.acquire()  # queued, never granted: cancelled
            assert pubsub_clients(server) == before + 1
            async with anyio.create_task_group() as tg:
                tg.start_soon(second.acquire)
                await anyio.sleep(0.1)
                tg.cancel_scope.cancel()  # the limiter is left while its subscription is live
        assert pubsub_clients(server) == before
        await permit.release()
        assert (await first.statistics()).waiters == ()


# -- the previous version's scripts next to a pushing process -------------------------------


def previous_script(name: str) -> Script:
    """A script of the previous version (mailbox lists only), sent the way it was sent."""
    parts = ["_read", "_shared", name]
    source = "\n".join((PREVIOUS_LUA / f"{part}.lua").read_text("utf-8") for part in parts)
    return Script.from_source(f"previous_{name}", source)


class OldProcess:
    """One process of the previous version: its waiters queue and are woken by BLPOP of its
    mailbox list, or ask again after a re-check (its scripts make that idempotent)."""

    def __init__(self, client: ScriptClient, limiter: RedisLimiter) -> None:
        self.client = client
        self.header = list(limiter.script_header[:7])
        self.keys = list(limiter.keys[:8])
        self.process = "00000000000000ab"
        self.mailbox = KeyLayout.of(limiter.name).mailbox(self.process)
        self.acquire_script = previous_script("acquire")
        self.release_script = previous_script("release")
        self.count = 0

    async def run(self, script: Script, *args: str) -> Any:
        return await self.client.run_script(script, self.keys, [*self.header, *args])

    async def acquire(self) -> str:
        self.count += 1
        waiter = f"{self.process}:{self.count}"
        while True:
            [reply] = decode_acquire_reply(await self.run(self.acquire_script, waiter))
            if reply[0] == 1:
                return waiter
            # One BLPOP for any of this process's waiters; a re-ask sorts it out.
            await self.client.blpop(self.mailbox, 0.2)

    async def release(self, lease_id: str) -> None:
        await self.run(self.release_script, lease_id)


@pytest.mark.anyio
async def test_old_version_process_shares_a_limiter(
    server: RedisServer, name: str, flavour: str
) -> None:
    # A new (pushing) process and an old one (mailbox lists) share three slots. Grants the
    # old scripts make for the new process's waiters go to a list nobody reads: the new waiters
    # learn of them at their re-check (0.2 s here). Nobody strands, max_at_once holds.
    intervals: list[tuple[float, float]] = []

    async def task() -> None:
        began = time.monotonic()
        await anyio.sleep(0.02)
        intervals.append((began, time.monotonic()))

    async def new_worker(limiter: RedisLimiter, n: int) -> None:
        for _ in range(n):
            async with limiter.slot():
                await task()

    async def old_worker(old: OldProcess, n: int) -> None:
        for _ in range(n):
            lease = await old.acquire()
            try:
                await task()
            finally:
                await old.release(lease)

    layout = KeyLayout.of(name)
    async with (
        open_client(flavour, server.url) as one,
        RedisLimiter(one, name, max_at_once=3, recheck_interval=0.2) as limiter,
        client_from_url(server.url) as client,
    ):
        old = OldProcess(client, limiter)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(new_worker, limiter, 8)
                    tg.start_soon(old_worker, old, 8)
        assert limiter._mailbox.endswith("!")
    assert len(intervals) == 48
    assert max_overlap(intervals) <= 3
    assert await zcard(server, layout.keys[0]) == 0
    assert await zcard(server, layout.keys[1]) == 0


# -- cluster clients keep the mailbox -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.backends("asyncio")
@pytest.mark.anyio
async def test_cluster_clients_keep_the_mailbox(cluster: RedisCluster3, name: str) -> None:
    import redis.asyncio

    one = redis.asyncio.RedisCluster.from_url(cluster.url)
    two = redis.asyncio.RedisCluster.from_url(cluster.url)
    try:
        async with (
            RedisLimiter(one, name, max_at_once=1, recheck_interval=30) as first,
            RedisLimiter(two, name, max_at_once=1, recheck_interval=30) as second,
        ):
            assert not second._mailbox.endswith("!")
            permit = await first.acquire()
            got: list[float] = []

            async def wait_for_slot() -> None:
                async with second.slot():
                    got.append(anyio.current_time())

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_for_slot)
                await anyio.sleep(0.3)
                for port in cluster.alive_ports():
                    reply = send_command(port, "CLIENT", "LIST", "TYPE", "pubsub")
                    assert reply is not None
                    assert "id=" not in reply
                released = anyio.current_time()
                await permit.release()
            assert len(got) == 1
            assert got[0] - released < 1.0  # BLPOP, not the 30 s re-check
    finally:
        await one.aclose()
        await two.aclose()
