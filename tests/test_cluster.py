"""RedisLimiter against a real three-shard Redis Cluster (aiometer_redis.testing.RedisCluster3).

Every limiter's keys share one hash tag, so its scripts run on the shard that owns the slot;
the mailbox key (built inside the scripts from the same tag) must land there too, and the
dispatcher's BLPOP on it must be routed to that shard as well.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio

import aiometer
from aiometer_redis import RedisLimiter
from aiometer_redis._keys import limiter_keys, mailbox_prefix
from aiometer_redis.testing import RedisCluster3, max_overlap, window_violations
from aiometer_redis.testing._resp import encode_command

pytestmark = [pytest.mark.redis, pytest.mark.slow]

# One client library per backend: redis-py is asyncio only, coredis runs on both
# (conftest.py parametrizes "flavour" and "anyio_backend" together from this list).
FLAVOURS = [
    ("redis-py-asyncio", "asyncio"),
    ("coredis-asyncio", "asyncio"),
    ("coredis-trio", "trio"),
]


@pytest.fixture
async def client(cluster: RedisCluster3, flavour: str) -> AsyncIterator[Any]:
    """A cluster client of the flavour's library, started from one node (it discovers all)."""
    if flavour.startswith("redis-py"):
        # Every limiter with a queued waiter parks one BLPOP on a pooled connection for up to
        # recheck_interval, so 200 limiters need more than redis-py's 100 connections per node
        # (MaxConnectionsError otherwise) or coredis's 32 in all (script calls then starve
        # past retry_window).
        redis_py: Any = redis.asyncio.RedisCluster.from_url(cluster.url, max_connections=512)
        # Deliberately not initialised here: the limiter's adapter must discover the cluster
        # before its first concurrent commands (redis-py 8 races otherwise).
        try:
            yield redis_py
        finally:
            await redis_py.aclose()
    else:
        import coredis

        host, port = cluster.startup_nodes[0]
        async with coredis.RedisCluster(host, port, max_connections=512) as core:
            yield core


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def node_command(port: int, *args: str) -> bytes:
    """Send one command straight to one node (either backend) and return its first line."""
    request = encode_command(args)
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += await stream.receive()
    return reply


class Peaks:
    """Running and peak concurrency per limiter name."""

    def __init__(self) -> None:
        self.running: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.done: dict[str, int] = defaultdict(int)

    def enter(self, name: str) -> None:
        self.running[name] += 1
        self.peak[name] = max(self.peak[name], self.running[name])

    def leave(self, name: str) -> None:
        self.running[name] -= 1
        self.done[name] += 1


# -- one limiter on a cluster -----------------------------------------------------------------


@pytest.mark.anyio
async def test_acquire_release_statistics_reset(client: Any) -> None:
    name = unique("one")
    async with RedisLimiter(client, name, max_at_once=2, lease_ttl=5) as limiter:
        async with limiter.slot() as permit:
            stats = await limiter.statistics()
            assert [h.lease_id for h in stats.holders] == [permit.lease_id]
            assert 4 < stats.holders[0].expires_in <= 5
            assert stats.local_held == 1
            assert permit.token >= 1
        stats = await limiter.statistics()
        assert stats.holders == ()
        assert stats.local_held == 0
        await limiter.acquire()
        assert len((await limiter.statistics()).holders) == 1
        await limiter.reset()
        stats = await limiter.statistics()
        assert stats.holders == ()
        assert stats.waiters == ()


@pytest.mark.anyio
async def test_hand_off_between_two_limiters_goes_through_the_mailbox(client: Any) -> None:
    # A long recheck_interval: the queued waiter can only be woken in time by the grant that
    # release.lua pushes to its mailbox (RPUSH inside the script, BLPOP on another
    # connection of the same client).
    name = unique("handoff")
    options: dict[str, Any] = {"max_at_once": 1, "lease_ttl": 10, "recheck_interval": 30}
    async with (
        RedisLimiter(client, name, **options) as first,
        RedisLimiter(client, name, **options) as second,
    ):
        held = await first.acquire()
        granted: list[float] = []
        async with anyio.create_task_group() as tg:

            async def wait_for_slot() -> None:
                async with second.slot():
                    granted.append(anyio.current_time())

            tg.start_soon(wait_for_slot)
            with anyio.fail_after(5):
                while not (await first.statistics()).waiters:
                    await anyio.sleep(0.01)
            stats = await first.statistics()
            assert [h.lease_id for h in stats.holders] == [held.lease_id]
            assert len(stats.waiters) == 1
            assert (await second.statistics()).local_waiting == 1
            released_at = anyio.current_time()
            await held.release()
        assert len(granted) == 1
        assert granted[0] - released_at < 1.0
        stats = await second.statistics()
        assert stats.holders == ()
        assert stats.waiters == ()


@pytest.mark.anyio
async def test_script_flush_on_every_node_mid_run(cluster: RedisCluster3, client: Any) -> None:
    name = unique("flush")
    peaks = Peaks()
    flushed = anyio.Event()

    async def task(_: int) -> None:
        peaks.enter(name)
        await anyio.sleep(0.005)
        peaks.leave(name)
        if peaks.done[name] == 10 and not flushed.is_set():
            for port in cluster.ports:
                assert await node_command(port, "SCRIPT", "FLUSH") == b"+OK\r\n"
            flushed.set()

    async with (
        RedisLimiter(client, name, max_at_once=2, lease_ttl=5) as first,
        RedisLimiter(client, name, max_at_once=2, lease_ttl=5) as second,
    ):
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for limiter in (first, second):
                    tg.start_soon(partial(aiometer.run_on_each, task, range(30), limiter=limiter))
        assert flushed.is_set()
        assert peaks.done[name] == 60
        assert peaks.peak[name] == 2
        stats = await first.statistics()
        assert stats.holders == ()
        assert stats.waiters == ()


# -- many limiters across the shards ----------------------------------------------------------

LIMITERS = [f"site-{i}" for i in range(100)]


@pytest.fixture(scope="module")
def owners(cluster: RedisCluster3) -> dict[str, int]:
    """The port of the node that owns each limiter's slot (CLUSTER KEYSLOT + CLUSTER SLOTS)."""
    # The slot depends on the hash tag (the name) only, so the default prefix stands for the
    # per-run prefix the test uses.
    node: Any = redis.Redis(port=cluster.ports[0], decode_responses=True)
    try:
        ranges = [
            (int(start), int(end), int(master[1]))
            for start, end, master, *_ in node.execute_command("CLUSTER", "SLOTS")
        ]
        found: dict[str, int] = {}
        for name in LIMITERS:
            # The mailbox key is built inside the scripts: it must share the slot too.
            keys = [*limiter_keys(name), mailbox_prefix(name, "aiometer") + "0123abcd"]
            slots = {int(node.execute_command("CLUSTER", "KEYSLOT", key)) for key in keys}
            assert len(slots) == 1, (name, slots)
            (slot,) = slots
            found[name] = next(port for start, end, port in ranges if start <= slot <= end)
    finally:
        node.close()
    return found


def test_limiters_land_on_every_shard(cluster: RedisCluster3, owners: dict[str, int]) -> None:
    per_node = {
        port: sum(1 for owner in owners.values() if owner == port) for port in cluster.ports
    }
    assert all(count > 0 for count in per_node.values()), per_node


@pytest.mark.anyio
async def test_hundred_limiters_on_three_shards(
    cluster: RedisCluster3, client: Any, owners: dict[str, int]
) -> None:
    # The shard check comes first: a run whose limiters all sat on one node proves little.
    assert set(owners.values()) == set(cluster.ports)
    prefix = unique("many")
    peaks = Peaks()
    tasks_per_run = 8

    async def task(name: str) -> None:
        peaks.enter(name)
        await anyio.sleep(0.003)
        peaks.leave(name)

    async def two_processes(name: str) -> None:
        # Two limiter objects per name: the limit of 2 must hold across them, in Redis.
        async with (
            RedisLimiter(client, name, max_at_once=2, lease_ttl=10, prefix=prefix) as first,
            RedisLimiter(client, name, max_at_once=2, lease_ttl=10, prefix=prefix) as second,
        ):
            async with anyio.create_task_group() as tg:
                for limiter in (first, second):
                    tg.start_soon(
                        partial(aiometer.run_on_each, task, [name] * tasks_per_run, limiter=limiter)
                    )
            # Each sends its own pending releases (they ride with acquisitions) first.
            await second.statistics()
            stats = await first.statistics()
            assert stats.holders == (), name
            assert stats.waiters == (), name

    with anyio.fail_after(25):
        async with anyio.create_task_group() as tg:
            for name in LIMITERS:
                tg.start_soon(two_processes, name)

    assert dict(peaks.done) == dict.fromkeys(LIMITERS, 2 * tasks_per_run)
    assert max(peaks.peak.values()) == 2
    assert all(peak <= 2 for peak in peaks.peak.values()), peaks.peak
    assert all(running == 0 for running in peaks.running.values())


# -- many limiters, several OS processes --------------------------------------------------------

CLUSTER_WORKER = Path(__file__).parent / "helpers" / "cluster_worker.py"

#: One worker process per client library and backend: they share the 100 limiters.
PROCESSES = [
    ["--client", "redis", "--backend", "asyncio"],
    ["--client", "coredis", "--backend", "asyncio"],
    ["--client", "coredis", "--backend", "trio"],
]


def _run_cluster_fleet(
    cluster: RedisCluster3, tmp_path: Path, options: list[str], duration: float
) -> tuple[list[dict[str, list[tuple[float, float]]]], float]:
    """Start one cluster_worker per entry of PROCESSES, release them together once all are
    ready, and return each one's intervals per limiter and the shared start time."""
    outs = [tmp_path / f"cluster-worker{i}.json" for i in range(len(PROCESSES))]
    common = [sys.executable, str(CLUSTER_WORKER), "--port", str(cluster.ports[0])]
    procs = [
        subprocess.Popen(
            [*common, *options, *extra, "--duration", repr(duration), "--out", str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for out, extra in zip(outs, PROCESSES, strict=True)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "READY"
        start_at = time.time() + 0.5
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{start_at!r}\n")
            proc.stdin.close()
        for proc in procs:
            assert proc.wait(timeout=duration + 60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    results = []
    for out in outs:
        raw = json.loads(out.read_text())
        results.append(
            {name: [(float(a), float(b)) for a, b in spans] for name, spans in raw.items()}
        )
    return results, start_at


def test_hundred_limiters_shared_by_three_processes(
    cluster: RedisCluster3, owners: dict[str, int], tmp_path: Path
) -> None:
    """Three OS processes (redis-py on asyncio, coredis on asyncio and on trio) each run the
    same 100 limiters, spread over the three shards; every limiter's limits hold across
    them."""
    assert set(owners.values()) == set(cluster.ports)
    prefix = unique("fleet")
    max_at_once, rate, burst, task_time, duration = 2, 5.0, 2, 0.25, 3.0
    options = [
        *("--names", ",".join(LIMITERS), "--prefix", prefix),
        *("--max-at-once", str(max_at_once), "--max-per-second", repr(rate)),
        *("--burst", str(burst), "--task-time", repr(task_time)),
    ]
    results, start_at = _run_cluster_fleet(cluster, tmp_path, options, duration)

    late = start_at + duration + 5.0
    peaks = {}
    for name in LIMITERS:
        spans = [span for result in results for span in result[name]]
        starts = [start for start, _ in spans]
        peaks[name] = max_overlap(spans)
        assert peaks[name] <= max_at_once, name
        assert window_violations(starts, rate, burst, [0.5, 1.0, 2.0]) == [], name
        # Items pulled before the deadline still start after it, at the limiter's pace.
        assert all(start_at - 0.01 <= start <= late for start in starts), name
        # Not a vacuous pass: 12 local workers per limiter kept each one busy, so at 5/s
        # for 3 s every limiter started well over 10 tasks...
        assert len(starts) >= 10, (name, len(starts))
    # ... and both limits were reached: tasks of 0.25 s at 5/s overlap, up to the cap of 2.
    assert sum(peak == max_at_once for peak in peaks.values()) >= 90, peaks
    # Each process took part in the fleet's work, not one of them alone.
    per_process = [sum(len(spans) for spans in result.values()) for result in results]
    assert min(per_process) >= 0.1 * sum(per_process), per_process

    # Nothing is left held or queued once every process has left.
    node: Any = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        for name in LIMITERS:
            holders, queue, *_ = limiter_keys(name, prefix)
            assert node.zcard(holders) == 0, name
            assert node.zcard(queue) == 0, name
    finally:
        node.close()
