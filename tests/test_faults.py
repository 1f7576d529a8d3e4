"""Fault injection against real redis-server processes: crashes and restarts of Redis, a
frozen Redis, a frozen lease holder, connections cut after a script ran but before its reply
arrived, and cancellation at every await point of acquire and release.

Every test is bounded (``anyio.fail_after`` or a subprocess time-out) so that nothing hangs,
and checks the limiter's guarantees directly: the documented error type, every slot back
afterwards (no holder, no waiter left in Redis), no double admission.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import redis.asyncio
import sniffio
from anyio.streams.buffered import BufferedByteReceiveStream
from helpers.tcp_proxy import Request, TcpProxy, script_rule

import aiometer
from aiometer import Rate
from aiometer_redis import LeaseLostError, RedisLimiter, RedisPermit, RedisUnavailableError
from aiometer_redis._client import ScriptClient, adapt
from aiometer_redis._keys import limiter_keys
from aiometer_redis._scripts import WRITERS, load_script
from aiometer_redis._state import LimiterState, read_state
from aiometer_redis.testing import RedisServer, max_overlap, over_limit_seconds, window_violations
from aiometer_redis.testing._resp import send_command

pytestmark = pytest.mark.redis

WORKER = Path(__file__).parent / "helpers" / "fleet_worker.py"
SHA = {name: load_script(name).sha1 for name in WRITERS}


# -- helpers ----------------------------------------------------------------------------------


@asynccontextmanager
async def direct(url: str) -> AsyncIterator[tuple[Any, ScriptClient]]:
    """A client straight to Redis (no proxy), for the test's own reads: the library client
    of the running backend (redis-py on asyncio, coredis on trio) and its adapter."""
    if sniffio.current_async_library() == "asyncio":
        client: Any = redis.asyncio.Redis.from_url(url)
        try:
            yield client, adapt(client)
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
    else:
        import coredis

        async with coredis.Redis.from_url(url) as other:
            yield other, adapt(other)


async def state_of(url: str, name: str) -> LimiterState:
    async with direct(url) as (_, client):
        return await read_state(client, limiter_keys(name))


async def preload_scripts(url: str) -> None:
    """Load the scripts so that EVALSHA succeeds at once: a reply the proxy throws away is
    then always the reply of a script that ran, never a NOSCRIPT error."""
    async with direct(url) as (raw, _):
        for script in WRITERS:
            await raw.script_load(load_script(script).source)


async def assert_clean(url: str, name: str) -> None:
    """No holder and no waiter left in Redis (read by a fresh limiter), and a fresh acquire
    is granted at once."""
    async with RedisLimiter.from_url(url, name, max_at_once=1, lease_ttl=5) as fresh:
        stats = await fresh.statistics()
        assert stats.holders == (), stats.holders
        assert stats.waiters == (), stats.waiters
        with anyio.fail_after(0.5):
            permit = await fresh.acquire()
        await permit.release()
        assert (await fresh.statistics()).holders == ()


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float = 3.0, what: str = "the condition"
) -> None:
    """Poll the async *check* every 5 ms until it returns something true."""
    with anyio.move_on_after(timeout) as scope:
        while not await check():
            await anyio.sleep(0.005)
    assert not scope.cancelled_caught, f"{what} did not happen within {timeout:g} s"


def is_script(request: Request, script: str) -> bool:
    return (
        len(request) >= 2
        and request[0].upper() == b"EVALSHA"
        and request[1] == SHA[script].encode()
    )


def drop_some_of_each() -> Callable[[Request], bool]:
    """A proxy drop rule: every 3rd acquire and release call, every 2nd renew and cancel
    call (each script counted on its own, so that every kind gets its replies dropped)."""
    every = {"acquire": 3, "release": 3, "renew": 2, "cancel": 2}
    rules = [script_rule([SHA[script]], every=n) for script, n in every.items()]
    # Each rule counts only its own script's calls, so stopping at the first match is fine.
    return lambda request: any(rule(request) for rule in rules)


def hold_replies(script: str, seconds: float) -> Callable[[Request], float]:
    """A proxy delay rule: hold the replies to *script* for *seconds*."""
    return lambda request: seconds if is_script(request, script) else 0.0


# -- Redis crashes and restarts ---------------------------------------------------------------


async def _run_through_restart(
    server: RedisServer, name: str, limit: int, task_time: float
) -> tuple[list[tuple[float, float]], float, float]:
    """Three limiter instances (three "processes": their own ids, clients and local gates)
    run 50 ms tasks through one limit while Redis is killed and started again 0.6 s in.

    Returns every task's (start, end) and the moments Redis was killed and answered again
    (all on time.monotonic()).
    """
    intervals: list[tuple[float, float]] = []
    outage: list[float] = []
    deadline = time.monotonic() + 2.0

    def items() -> Iterator[None]:
        while time.monotonic() < deadline:
            yield None

    async def task(_: None) -> None:
        start = time.monotonic()
        await anyio.sleep(task_time)
        intervals.append((start, time.monotonic()))

    async def instance() -> None:
        async with RedisLimiter.from_url(
            server.url,
            name,
            max_at_once=limit,
            lease_ttl=5,
            retry_window=10,
            # Queued waiters whose queue entries the crash wiped ask again soon after Redis
            # is back, while tasks admitted before the crash may still run.
            recheck_interval=0.02,
        ) as limiter:
            await aiometer.run_on_each(task, items(), limiter=limiter, max_at_once=3)

    async def crash() -> None:
        await anyio.sleep(0.6)
        outage.append(time.monotonic())
        await anyio.to_thread.run_sync(server.restart)
        outage.append(time.monotonic())

    with anyio.fail_after(30):
        async with anyio.create_task_group() as task_group:
            for _ in range(3):
                task_group.start_soon(instance)
            task_group.start_soon(crash)
    killed, back = outage
    return intervals, killed, back


@pytest.mark.slow
@pytest.mark.anyio
async def test_restart_without_persistence_over_admission_is_bounded(name: str) -> None:
    """Redis killed (SIGKILL) and restarted empty mid-run: the run goes on and completes
    (the retry window spans the outage). The new Redis has forgotten the leases, so tasks it
    admits may overlap the ones still running from before the crash, but only for about one
    task duration after Redis is back: more than max_at_once run at once for at most the
    outage + one task time, never more than twice the limit, and the tasks admitted by the
    new Redis obey the limit among themselves.

    measured (8 runs, both backends): over the limit for 0.005-0.015 s in all, with 3-4
    tasks at once, for an outage of 0.023-0.026 s and 50 ms tasks; the first task after the
    restart started 0.002-0.1 s after Redis answered again.
    """
    limit, task_time = 2, 0.05
    with RedisServer() as server:
        intervals, killed, back = await _run_through_restart(server, name, limit, task_time)
        outage = back - killed
        over = over_limit_seconds(intervals, limit)
        assert intervals
        assert over <= outage + task_time + 0.05, (over, outage)
        assert max_overlap(intervals) <= 2 * limit
        after = [iv for iv in intervals if iv[0] >= back]
        assert after, "no task ran after the restart"
        assert max_overlap(after) <= limit
        assert max_overlap([iv for iv in intervals if iv[1] <= killed]) <= limit
        await assert_clean(server.url, name)


@pytest.mark.slow
@pytest.mark.anyio
async def test_restart_with_persistence_never_over_admits(name: str) -> None:
    """The same crash and restart with appendonly/appendfsync always: every reply a client
    saw was on disk, the leases survive with their expiries, a call whose reply was lost is
    retried with the same ids, so max_at_once holds throughout (never more than 2 at once)
    and the run completes.

    measured (8 runs): at most 2 at once every time; outage 0.022-0.064 s; the first task
    after the restart started 0.005-0.14 s after Redis answered again.
    """
    limit, task_time = 2, 0.05
    persistent = ["--appendonly", "yes", "--appendfsync", "always"]
    with RedisServer(extra_args=persistent) as server:
        intervals, _, back = await _run_through_restart(server, name, limit, task_time)
        assert max_overlap(intervals) <= limit
        assert [iv for iv in intervals if iv[0] >= back], "no task ran after the restart"
        await assert_clean(server.url, name)


# -- a frozen Redis ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_frozen_redis_fails_closed_within_the_retry_window(name: str) -> None:
    """Redis frozen (SIGSTOP) longer than the retry window: acquire() raises
    RedisUnavailableError within retry_window + 1 s instead of hanging. After SIGCONT the
    same limiter acquires again (within 0.5 s), and no holder or waiter is
    left behind: the acquire that sat in the frozen server's socket buffer ran when the
    server woke up and granted a lease that nobody holds; the limiter must withdraw it.

    measured: raised after 0.50 s; the next acquire got the slot a few milliseconds after
    SIGCONT: the first call Redis answers triggers the withdrawal of the orphaned lease.
    """
    retry_window, lease_ttl = 0.5, 5.0
    with RedisServer() as server:
        async with RedisLimiter.from_url(
            server.url, name, max_at_once=1, retry_window=retry_window, lease_ttl=lease_ttl
        ) as limiter:
            async with limiter.slot():
                pass  # connected, scripts cached
            server.pause()
            try:
                start = time.monotonic()
                with anyio.fail_after(retry_window + 5), pytest.raises(RedisUnavailableError):
                    await limiter.acquire()
                failed_after = time.monotonic() - start
            finally:
                server.resume()
            assert failed_after <= retry_window + 1, failed_after

            resumed = time.monotonic()
            with anyio.move_on_after(3) as scope:
                permit = await limiter.acquire()
            state = await state_of(server.url, name)
            assert not scope.cancelled_caught, (
                f"no slot within 3 s of SIGCONT; holders in Redis: {state.holders}"
            )
            # The acquire that ran on the frozen server after we gave up on it holds the slot
            # until the limiter withdraws it, which it does as soon as Redis answers again.
            recovered = time.monotonic() - resumed
            assert recovered < 0.5, recovered
            assert [h.lease_id for h in state.holders] == [permit.lease_id]
            await permit.release()
        await assert_clean(server.url, name)


@pytest.mark.anyio
async def test_local_fallback_while_redis_is_frozen(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """on_unavailable="local": while Redis is frozen, acquire() succeeds through in-process
    limits after one retry window (permit.fallback, still at most max_at_once in this
    process), both transitions are logged as warnings, and once Redis answers again permits
    come from Redis (permit.fallback False) with nothing left behind.

    measured: in-process permits after 0.30 s (one retry window); Redis permits again
    0.10-0.13 s after SIGCONT.
    """
    caplog.set_level(logging.WARNING, logger="aiometer_redis")
    retry_window = 0.3
    with RedisServer() as server:
        async with RedisLimiter.from_url(
            server.url,
            name,
            max_at_once=2,
            retry_window=retry_window,
            lease_ttl=5,
            on_unavailable="local",
        ) as limiter:
            async with limiter.slot() as permit:
                assert not permit.fallback
            server.pause()
            try:
                start = time.monotonic()
                with anyio.fail_after(retry_window + 3):
                    first = await limiter.acquire()
                assert first.fallback
                assert time.monotonic() - start <= retry_window + 1
                with anyio.fail_after(0.5):
                    second = await limiter.acquire()
                assert second.fallback
                with anyio.move_on_after(0.2) as scope:
                    await limiter.acquire()  # the in-process max_at_once=2 is full
                assert scope.cancelled_caught
                await first.release()
                await second.release()
            finally:
                server.resume()

            resumed = time.monotonic()
            with anyio.fail_after(5):
                while True:
                    permit = await limiter.acquire()
                    if not permit.fallback:
                        break
                    await permit.release()
                    await anyio.sleep(0.02)
            assert time.monotonic() - resumed < 3
            state = await state_of(server.url, name)
            assert [h.lease_id for h in state.holders] == [permit.lease_id]
            await permit.release()
        await assert_clean(server.url, name)
    messages = [r.getMessage() for r in caplog.records if r.name == "aiometer_redis"]
    down = [i for i, m in enumerate(messages) if "falling back to in-process limits" in m]
    up = [i for i, m in enumerate(messages) if "Redis is back" in m]
    assert down, messages
    assert up, messages
    assert down[0] < up[0]
    assert all(
        r.levelno == logging.WARNING
        for r in caplog.records
        if "falling back" in r.getMessage() or "Redis is back" in r.getMessage()
    )


# -- a frozen holder --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_frozen_holder_loses_its_lease_and_reports_it(
    server: RedisServer, name: str, anyio_backend: str, tmp_path: Path
) -> None:
    """A worker process holding the only slot is frozen (SIGSTOP) longer than its lease:
    the slot goes to a waiter within lease_ttl + 1 s; after SIGCONT the worker's renewal
    finds the lease lost and reports it through on_lease_lost ("LOST" within a few
    seconds), and does not silently take the slot back: Redis shows only the new lease.

    measured: slot taken over 1.00 s after SIGSTOP; "LOST" 1-2 ms after SIGCONT.
    """
    lease_ttl = 1.0
    client = "redis" if anyio_backend == "asyncio" else "coredis"
    stderr_path = tmp_path / "holder.err"
    command = [
        sys.executable,
        str(WORKER),
        "--url",
        server.url,
        "--name",
        name,
        "--max-at-once",
        "1",
        "--lease-ttl",
        str(lease_ttl),
        "--hold",
        "1",
        "--report-lost",
        "--backend",
        anyio_backend,
        "--client",
        client,
    ]
    stderr = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        process = await anyio.open_process(command, stderr=stderr)
    finally:
        os.close(stderr)
    try:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)

        async def next_line(timeout: float) -> str:
            try:
                with anyio.fail_after(timeout):
                    return (await lines.receive_until(b"\n", 1000)).decode().strip()
            except (TimeoutError, anyio.IncompleteRead):
                pytest.fail(f"no line from the holder; its stderr:\n{stderr_path.read_text()}")

        assert await next_line(20) == "HOLDING"
        async with RedisLimiter.from_url(
            server.url, name, max_at_once=1, lease_ttl=lease_ttl
        ) as limiter:
            assert len((await limiter.statistics()).holders) == 1
            os.kill(process.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                with anyio.fail_after(lease_ttl + 5):
                    permit = await limiter.acquire()
                taken_after = time.monotonic() - stopped
            finally:
                os.kill(process.pid, signal.SIGCONT)
            continued = time.monotonic()
            assert taken_after <= lease_ttl + 1, taken_after
            assert await next_line(5) == "LOST"
            assert time.monotonic() - continued < 3
            # Two more renewal periods: the holder still runs, and never took the slot back.
            await anyio.sleep(2 * lease_ttl / 3 + 0.1)
            assert process.returncode is None
            holders = (await limiter.statistics()).holders
            assert [h.lease_id for h in holders] == [permit.lease_id]
            await permit.release()
        await assert_clean(server.url, name)
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.fail_after(10):
            await process.aclose()


# -- replies lost after the script ran --------------------------------------------------------


@pytest.mark.anyio
async def test_lost_replies_rate_only_reserve_once(server: RedisServer, name: str) -> None:
    """Through a proxy that cuts the connection after every 3rd acquire script has run and
    before its reply arrives, a rate-only limiter's N acquisitions raise the issued counter
    by exactly N (a retried call does not reserve a second start), and the starts keep the
    rate without wasting reservations.

    measured: 7 of 22 acquire calls' replies dropped; issued +15 for 15 acquisitions;
    19.8-20.0 starts per second at a limit of 20.
    """
    rate, count = 20.0, 15
    await preload_scripts(server.url)
    before = (await state_of(server.url, name)).issued
    starts: list[float] = []
    with anyio.fail_after(20):
        async with (
            TcpProxy(server.port, drop=script_rule([SHA["acquire"]], every=3)) as proxy,
            RedisLimiter.from_url(proxy.url, name, max_per_second=rate) as limiter,
        ):
            for _ in range(count):
                await limiter.acquire()
                starts.append(time.monotonic())
    assert proxy.errors == []
    assert len(proxy.dropped) >= count // 3
    assert all(not d.reply.startswith(b"-") for d in proxy.dropped), proxy.dropped
    issued = (await state_of(server.url, name)).issued - before
    assert issued == count, f"{issued} reservations for {count} acquisitions"
    assert window_violations(starts, rate, 1, [0.05, 0.1, 0.25, 0.5]) == []
    achieved = (count - 1) / (starts[-1] - starts[0])
    assert achieved >= 0.8 * rate, achieved


@pytest.mark.anyio
async def test_lost_replies_concurrency_never_double_admits(server: RedisServer, name: str) -> None:
    """Through a proxy that cuts the connection after every 3rd acquire and release call
    (every 2nd renew and cancel call) has run, two limiter instances with max_at_once=1 each take
    and give back the slot N times: never two holders at once, every acquire got its own
    fencing token, and nothing is held or queued at the end.

    measured: 14 of 46 script replies dropped (acquire and release; no renewal or cancel
    happens in this short run); 16 grants with 16 distinct tokens; issued +25 (16 tokens
    and 9 tickets).
    """
    rounds = 8
    await preload_scripts(server.url)
    before = (await state_of(server.url, name)).issued
    tokens: list[int] = []
    running = peak = 0

    async def take_turns(limiter: RedisLimiter) -> None:
        nonlocal running, peak
        for _ in range(rounds):
            permit = await limiter.acquire()
            running += 1
            peak = max(peak, running)
            tokens.append(permit.token)
            state = await state_of(server.url, name)
            assert [h.lease_id for h in state.holders] == [permit.lease_id]
            await anyio.sleep(0.005)
            running -= 1
            await permit.release()

    with anyio.fail_after(30):
        async with (
            TcpProxy(server.port, drop=drop_some_of_each()) as proxy,
            RedisLimiter.from_url(proxy.url, name, max_at_once=1, lease_ttl=5) as one,
            RedisLimiter.from_url(proxy.url, name, max_at_once=1, lease_ttl=5) as two,
            anyio.create_task_group() as task_group,
        ):
            task_group.start_soon(take_turns, one)
            task_group.start_soon(take_turns, two)
    assert proxy.errors == []
    dropped = {script for script in SHA for d in proxy.dropped if is_script(d.request, script)}
    # Releases ride with the next acquisition (release items '-<lease id>' in acquire.lua).
    swaps = [
        d
        for d in proxy.dropped
        if is_script(d.request, "acquire") and any(a.startswith(b"-") for a in d.request[3:])
    ]
    assert "acquire" in dropped, proxy.dropped
    assert swaps, proxy.dropped
    assert all(not d.reply.startswith(b"-") for d in proxy.dropped), proxy.dropped
    assert peak == 1
    assert len(tokens) == 2 * rounds
    assert len(set(tokens)) == len(tokens), tokens
    state = await state_of(server.url, name)
    assert state.holders == ()
    assert state.waiters == ()
    # One fencing token per grant and at most one ticket per acquisition: a retried call
    # neither granted twice nor queued twice.
    assert state.issued - before <= 2 * len(tokens)
    await assert_clean(server.url, name)


# -- cancellation at each await point ---------------------------------------------------------


async def _wait_until_queued(url: str, name: str, count: int) -> None:
    async def queued() -> bool:
        return len((await state_of(url, name)).waiters) >= count

    await wait_for(queued, what=f"{count} waiter(s) queued in Redis")


@pytest.mark.anyio
async def test_cancel_while_queued(server: RedisServer, name: str) -> None:
    """A waiter cancelled while queued in Redis for a slot is withdrawn: nothing is left
    queued or held. Also when the slot frees at the same moment as the cancellation (the
    grant races the cancel): either the waiter got the slot and gave it back, or the grant
    was undone; never a stranded lease.
    """
    rng = random.Random(7)
    with anyio.fail_after(20):
        async with (
            RedisLimiter.from_url(server.url, name, max_at_once=1, lease_ttl=5) as holder,
            RedisLimiter.from_url(server.url, name, max_at_once=1, lease_ttl=5) as waiter,
        ):
            for attempt in range(8):
                held = await holder.acquire()
                scope = anyio.CancelScope()

                async def wait_for_slot(scope: anyio.CancelScope = scope) -> None:
                    with scope:
                        permit = await waiter.acquire()
                        await permit.release()

                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(wait_for_slot)
                    await _wait_until_queued(server.url, name, 1)
                    if attempt == 0:
                        scope.cancel()  # plainly queued
                        await anyio.sleep(0.05)
                        await held.release()
                    else:
                        release_first = attempt % 2 == 0
                        if release_first:
                            await held.release()
                        await anyio.sleep(rng.uniform(0, 0.003))
                        scope.cancel()
                        if not release_first:
                            await held.release()
                state = await state_of(server.url, name)
                assert state.holders == (), (attempt, state)
                assert state.waiters == (), (attempt, state)
            assert (await waiter.statistics()).local_waiting == 0
        await assert_clean(server.url, name)


@pytest.mark.anyio
async def test_cancel_while_sleeping_the_rate_delay(server: RedisServer, name: str) -> None:
    """A coroutine granted a slot but cancelled while it sleeps the rate delay before its
    start (max_at_once=1, max_per_second=2: the second start waits 0.5 s) gives the slot
    back: no holder, no waiter, the slot free at once.
    """
    with anyio.fail_after(10):
        async with RedisLimiter.from_url(
            server.url, name, max_at_once=1, max_per_second=2, lease_ttl=5
        ) as limiter:
            first = await limiter.acquire()
            await first.release()
            returned = False

            async def second() -> None:
                nonlocal returned
                await limiter.acquire()
                returned = True

            async with anyio.create_task_group() as task_group:
                started = time.monotonic()
                task_group.start_soon(second)

                async def granted() -> bool:
                    return len((await state_of(server.url, name)).holders) == 1

                await wait_for(granted, what="the grant")
                task_group.cancel_scope.cancel()
            assert not returned
            assert time.monotonic() - started < 0.45, "cancelled after the delay, not during"
            state = await state_of(server.url, name)
            assert state.holders == ()
            assert state.waiters == ()
        await assert_clean(server.url, name)


@pytest.mark.anyio
async def test_cancel_while_releasing(server: RedisServer, name: str) -> None:
    """release() inside an already cancelled scope still gives the slot back (the release,
    posted, goes alone when no acquisition follows), and, without swaps, release() cancelled
    while its script call is on the wire (the proxy holds the reply 0.2 s) too, and the call
    ends within the wire time. (A swap cancelled on the wire: tests/test_swap.py.)
    """
    with anyio.fail_after(15):
        async with RedisLimiter.from_url(server.url, name, max_at_once=1, lease_ttl=5) as limiter:
            permit = await limiter.acquire()
            with anyio.CancelScope() as scope:
                scope.cancel()
                await permit.release()

            async def idle() -> bool:
                return limiter.is_idle()

            await wait_for(idle, what="the release")
            state = await state_of(server.url, name)
            assert state.holders == ()
        await preload_scripts(server.url)
        async with (
            TcpProxy(server.port, delay=hold_replies("release", 0.2)) as proxy,
            RedisLimiter.from_url(proxy.url, name, max_at_once=1, lease_ttl=5) as limiter,
        ):
            limiter._swap = False
            for pause in (0.0, 0.05):
                permit = await limiter.acquire()
                start = time.monotonic()
                with anyio.move_on_after(pause):
                    await permit.release()
                assert time.monotonic() - start < 0.2 + 0.5
                state = await state_of(server.url, name)
                assert state.holders == (), (pause, state)
                assert state.waiters == ()
        await assert_clean(server.url, name)


def hold_first_release(seconds: float) -> Callable[[Request], float]:
    """A proxy delay rule: hold for *seconds* the reply to the first call that releases
    leases (release.lua, or acquire.lua carrying ``-<lease id>`` items)."""
    held = False

    def rule(request: Request) -> float:
        nonlocal held
        releases = is_script(request, "release") or (
            is_script(request, "acquire")
            and any(item.startswith(b"-") for item in request[3 + int(request[2]) + 9 :])
        )
        if releases and not held:
            held = True
            return seconds
        return 0.0

    return rule


@pytest.mark.anyio
@pytest.mark.parametrize("swap", [True, False], ids=["swap", "separate"])
async def test_a_release_whose_reply_is_lost_keeps_its_start_in_the_windows(
    server: RedisServer, name: str, swap: bool
) -> None:
    """A release whose call fails on the client side (its reply comes after retry_window)
    may have run. When Redis answers again it is sent again as a release (a no-op for a
    lease no longer held), never withdrawn like an acquisition that never started: that
    would refund a start that happened to the rate windows, and let the fleet start more
    than the window allows."""
    await preload_scripts(server.url)
    with anyio.fail_after(20):
        async with (
            TcpProxy(server.port, delay=hold_first_release(1.0)) as proxy,
            RedisLimiter.from_url(
                proxy.url,
                name,
                max_at_once=5,
                rates=[Rate(2, per=60)],
                retry_window=0.3,
                lease_ttl=0.9,
            ) as limiter,
        ):
            limiter._swap = swap
            permit = await limiter.acquire()
            # Alone, its call fails after retry_window (the release has run in Redis).
            await permit.release()

            async def idle() -> bool:
                return limiter.is_idle()

            # Released again by the renewal loop (every 0.3 s) once Redis answers.
            await wait_for(idle, what="the lost release to be sent again")
            statistics = await limiter.statistics()
            assert statistics.rates_used == (1.0,)
            assert statistics.holders == ()
            second = await limiter.acquire()
            assert (await limiter.statistics()).rates_used == (2.0,)
            with anyio.move_on_after(0.5) as scope:
                await limiter.acquire()
            assert scope.cancelled_caught  # a third start would wait for the window
            await second.release()


@pytest.mark.anyio
async def test_a_lease_that_expires_while_its_block_blocks_the_loop_is_reported(
    server: RedisServer, name: str
) -> None:
    """A block that keeps the event loop busy (here time.sleep) for longer than lease_ttl:
    no renewal could run, Redis let the lease go, and the permit is given back after that.
    The loss is reported as when a renewal finds it (LeaseLostError from slot(), the
    callback, leases_lost), not passed over because the lease left the table first."""
    lost: list[LeaseLostError] = []
    async with RedisLimiter.from_url(
        server.url, name, max_at_once=1, lease_ttl=0.5, on_lease_lost=lost.append
    ) as limiter:
        with pytest.raises(LeaseLostError):
            async with limiter.slot():
                time.sleep(0.8)  # noqa: ASYNC251 - the point: nothing else can run
        assert len(lost) == 1
        assert (await limiter.statistics()).leases_lost == 1
        # A block that lets the renewals run keeps its lease.
        async with limiter.slot() as permit:
            await anyio.sleep(0.8)
        assert not permit.lost
        assert len(lost) == 1


@pytest.mark.anyio
async def test_a_settle_whose_reply_is_lost_is_charged_once(server: RedisServer, name: str) -> None:
    """settle.lua runs, its reply is lost (the proxy cuts the connection), and the limiter
    sends the call again: the difference is charged once, not twice (before the fix, a
    limiter with max_per_second and no rates charged 4 intervals for a settle of 2)."""
    cut = 0

    def cut_the_first_settle(request: Request) -> bool:
        nonlocal cut
        if is_script(request, "settle"):
            cut += 1
            return cut == 1
        return False

    def tat(limiter: RedisLimiter) -> float:
        reply = send_command(server.port, "GET", limiter.keys[3])
        assert reply is not None
        assert reply.startswith("$"), reply
        return float(reply.split("\r\n")[1])

    await preload_scripts(server.url)
    with anyio.fail_after(20):
        async with (
            TcpProxy(server.port, drop=cut_the_first_settle) as proxy,
            RedisLimiter.from_url(proxy.url, name, max_per_second=10, burst=5) as limiter,
        ):
            permit = await limiter.acquire(2)
            before = tat(limiter)
            await permit.settle(4)
            assert cut == 2  # cut once, then sent again
            assert len(proxy.dropped) == 1
            assert tat(limiter) - before == pytest.approx(2 * 100_000, abs=1)


@pytest.mark.anyio
async def test_a_caller_that_waited_for_its_local_slot_survives_a_brief_failure(
    server: RedisServer, name: str
) -> None:
    """A caller waits longer than retry_window for one of its process's own slots while Redis
    answers; then another call's attempt fails, and the caller gets its slot while that call
    waits its 50 ms to try again. Redis has not failed for retry_window of the caller's wait:
    it gets its slot, instead of a RedisUnavailableError raised before anything was sent
    (its retry window ran from when it began to wait)."""
    with anyio.fail_after(20):
        async with RedisLimiter.from_url(
            server.url, name, max_at_once=1, retry_window=0.5
        ) as limiter:
            first = await limiter.acquire()
            waited: list[float] = []

            async def second() -> None:
                began = time.monotonic()
                permit = await limiter.acquire()
                waited.append(time.monotonic() - began)
                await permit.release()

            async with anyio.create_task_group() as tg:
                tg.start_soon(second)
                await anyio.sleep(0.8)
                # What an attempt sent now and failed at once leaves while its call waits to
                # try again (set here: not every client library lets a cut connection
                # through, coredis retries it).
                limiter._failing_since = anyio.current_time()
                await first.release()
            assert len(waited) == 1
            assert waited[0] > 0.8
            assert limiter._failing_since is None  # the second's call succeeded


@pytest.mark.anyio
async def test_cancel_while_renewal_in_flight(server: RedisServer, name: str) -> None:
    """The limiter's ``async with`` block cancelled at random moments while a slot is held
    (lease_ttl=0.3: a renewal every 0.1 s, and the proxy holds each renewal's reply 40 ms so
    that one is often on the wire when the cancellation lands): each time the block is left
    within 1 s, the slot is back at once, nothing is queued, and a fresh acquire succeeds
    immediately. (The cancelled scope encloses the limiter, and so the client that
    from_url made, and its background tasks: the release must still get through.)

    measured: a renewal was on the wire at 5-6 of the 10 cancellations.
    """
    rng = random.Random(11)
    hits = 0
    await preload_scripts(server.url)
    with anyio.fail_after(30):
        async with TcpProxy(server.port, delay=hold_replies("renew", 0.04)) as proxy:

            def renewing() -> bool:
                return any(is_script(request, "renew") for request in proxy.in_flight())

            for attempt in range(10):
                with anyio.CancelScope() as scope:
                    async with (
                        RedisLimiter.from_url(
                            proxy.url, name, max_at_once=1, lease_ttl=0.3
                        ) as limiter,
                        limiter.slot(),
                    ):
                        if attempt % 2 == 0:

                            async def in_flight() -> bool:
                                return renewing()

                            await wait_for(in_flight, what="a renewal on the wire")
                            await anyio.sleep(rng.uniform(0, 0.03))
                        else:
                            await anyio.sleep(rng.uniform(0, 0.3))
                        hits += renewing()
                        cancelled = time.monotonic()
                        scope.cancel()
                        await anyio.sleep_forever()
                exit_took = time.monotonic() - cancelled
                state = await state_of(server.url, name)
                assert exit_took < 1.0, (attempt, exit_took, state)
                assert state.holders == (), (attempt, state)
                assert state.waiters == (), (attempt, state)
                await assert_clean(server.url, name)
    assert hits >= 3, f"a renewal was on the wire at only {hits} of 10 cancellations"


@pytest.mark.anyio
async def test_cancel_while_acquire_is_on_the_wire(server: RedisServer, name: str) -> None:
    """Cancelled while the acquire script call is on the wire (the proxy holds its reply
    0.2 s): the call is finished before the cancellation takes effect (within the wire
    time), and whatever it was granted is given back; a call that carried several
    coroutines' acquisitions serves the others normally; a waiter whose reply said
    "queued" is withdrawn. Nothing is left held or queued.
    """
    wire = 0.2
    await preload_scripts(server.url)
    with anyio.fail_after(20):
        async with (
            TcpProxy(server.port, delay=hold_replies("acquire", wire)) as proxy,
            RedisLimiter.from_url(proxy.url, name, max_at_once=3, lease_ttl=5) as limiter,
        ):
            # One coroutine, in slot(): the body never runs to completion.
            start = time.monotonic()
            with anyio.move_on_after(0.05):
                async with limiter.slot():
                    await anyio.sleep_forever()
            assert time.monotonic() - start < wire + 0.5
            state = await state_of(server.url, name)
            assert state.holders == (), state
            assert state.waiters == (), state

            # Three coroutines in one script call; one of them is cancelled.
            permits: list[RedisPermit] = []
            victim = anyio.CancelScope()

            async def take(scope: anyio.CancelScope | None) -> None:
                with scope or anyio.CancelScope():
                    permit = await limiter.acquire()
                    try:
                        permits.append(permit)
                        await anyio.sleep(0.5)
                    finally:
                        await permit.release()

            async with anyio.create_task_group() as task_group:
                for scope in (None, victim, None):
                    task_group.start_soon(take, scope)

                async def on_the_wire() -> bool:
                    return any(is_script(r, "acquire") for r in proxy.in_flight())

                await wait_for(on_the_wire, what="the acquire call on the wire")
                victim.cancel()
            assert len(permits) >= 2
            state = await state_of(server.url, name)
            assert state.holders == (), state
            assert state.waiters == (), state

        # A call whose reply is "queued": the slot is taken by another limiter.
        async with (
            TcpProxy(server.port, delay=hold_replies("acquire", wire)) as proxy,
            RedisLimiter.from_url(proxy.url, name, max_at_once=1, lease_ttl=5) as limiter,
            RedisLimiter.from_url(server.url, name, max_at_once=1, lease_ttl=5) as other,
        ):
            held = await other.acquire()
            with anyio.move_on_after(0.05):
                await limiter.acquire()
            state = await state_of(server.url, name)
            assert [h.lease_id for h in state.holders] == [held.lease_id]
            assert state.waiters == (), state
            await held.release()
        await assert_clean(server.url, name)
