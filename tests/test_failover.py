"""RedisLimiter through a primary failover: a Redis Cluster shard's primary killed (its
replica promoted), and a Sentinel-managed primary killed (the replica promoted by the
sentinel).

Each test runs the same workload through one limiter (200 tasks of 50 ms, three at once),
kills the primary that holds the limiter's keys mid-run, and checks that the run completes
within the retry window, then measures how long more than three tasks ran at once (the
promoted replica may have missed the last writes, so it can forget leases) and the longest
stretch without a task start (the outage as the limiter sees it).
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis
import redis.asyncio
import redis.asyncio.sentinel

import aiometer
from aiometer_redis import RedisLimiter
from aiometer_redis._client import RedisPyClient, adapt
from aiometer_redis._keys import limiter_keys
from aiometer_redis.testing import (
    RedisCluster3,
    find_redis_server,
    max_overlap,
    over_limit_seconds,
)
from aiometer_redis.testing._cluster import _free_ports
from aiometer_redis.testing._resp import send_command

# redis-py (the client both tests use) is asyncio only.
pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.backends("asyncio")]

LIMIT = 3
TASKS = 200
TASK_TIME = 0.05
RETRY_WINDOW = 10.0
KILL_AFTER = 0.6


@dataclass
class Run:
    """What one run through a failover looked like (all times on time.monotonic())."""

    intervals: list[tuple[float, float]]
    began: float
    ended: float
    killed: float
    promoted: float

    @property
    def outage(self) -> float:
        return self.promoted - self.killed

    @property
    def over_admission(self) -> float:
        return over_limit_seconds(self.intervals, LIMIT)

    @property
    def stall(self) -> float:
        starts = sorted(start for start, _ in self.intervals)
        return max(later - earlier for earlier, later in itertools.pairwise(starts))

    def summary(self) -> str:
        return (
            f"run {self.ended - self.began:.2f}s, outage {self.outage:.2f}s, "
            f"stall {self.stall:.2f}s, over-admission {self.over_admission:.3f}s, "
            f"peak {max_overlap(self.intervals)}"
        )


async def run_through_failover(
    client: Any, name: str, fail_over: Callable[[], Awaitable[None]]
) -> tuple[Run, str]:
    """Run the workload through one limiter on *client* (a client, or a URL for
    ``RedisLimiter.from_url``); *fail_over* (started KILL_AFTER into the run) kills the
    primary and returns once the replica is promoted.

    Returns the run and the limiter's last statistics (holders, waiters) as text.
    """
    intervals: list[tuple[float, float]] = []
    marks: list[float] = []

    async def task(_: int) -> None:
        start = time.monotonic()
        await anyio.sleep(TASK_TIME)
        intervals.append((start, time.monotonic()))

    async def failover() -> None:
        await anyio.sleep(KILL_AFTER)
        marks.append(time.monotonic())
        await fail_over()
        marks.append(time.monotonic())

    options: dict[str, Any] = {
        "max_at_once": LIMIT,
        "lease_ttl": 5,
        "retry_window": RETRY_WINDOW,
        "recheck_interval": 0.05,
    }
    if isinstance(client, str):
        limiter = RedisLimiter.from_url(client, name, **options)
    else:
        limiter = RedisLimiter(client, name, **options)
    async with limiter:
        began = time.monotonic()
        with anyio.fail_after(RETRY_WINDOW + 15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(failover)
                await aiometer.run_on_each(task, range(TASKS), limiter=limiter)
        ended = time.monotonic()
        stats = await limiter.statistics()
        left = f"holders={stats.holders} waiters={stats.waiters}"
    killed, promoted = marks
    return Run(intervals, began, ended, killed, promoted), left


def check(run: Run) -> None:
    assert len(run.intervals) == TASKS
    # The kill happened mid-run, not after the run was over.
    assert run.began < run.killed < run.ended - TASK_TIME, run.summary()
    # Nothing waits for longer than the retry window, and the whole run fits within the
    # undisturbed run time (TASKS / LIMIT tasks back to back) plus the window.
    assert run.stall < RETRY_WINDOW, run.summary()
    # Starts resume soon after the promotion: the limiter's retry backoff is capped at 1 s,
    # and an attempt that still reached the old primary (the client learns of the promotion
    # a little after the test does) costs one more backoff.
    assert run.stall <= run.outage + 2 * 1.0 + TASK_TIME + 0.5, run.summary()
    assert run.ended - run.began < TASKS / LIMIT * TASK_TIME + RETRY_WINDOW, run.summary()
    # The promoted replica may lack the last lease writes: tasks it admits can overlap
    # tasks admitted before the kill, but only while those still run (one task time after
    # the replica answers); before the failover no new task starts at all.
    assert run.over_admission <= run.outage + TASK_TIME, run.summary()
    assert max_overlap(run.intervals) <= 2 * LIMIT, run.summary()


# -- Redis Cluster ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cluster_primary_killed_mid_run(replicated_cluster: RedisCluster3) -> None:
    """The primary of the shard holding the limiter's keys is SIGKILLed 0.6 s into the run;
    its replica is promoted (cluster-node-timeout 1 s) and the run completes.

    measured (redis 7.0, redis-py 8.1, five runs): outage (kill to promotion seen)
    1.97-2.57 s, stall (longest gap between starts) 2.04-2.87 s, over-admission 0.000 s
    (peak 3: the replica had every lease write), run 5.56-6.42 s against about 3.3 s
    undisturbed; about 13 s with the six-node cluster's start.
    """
    cluster = replicated_cluster
    name = f"failover-{uuid.uuid4().hex[:8]}"
    node: Any = redis.Redis(port=cluster.ports[0], decode_responses=True)
    try:
        slots = {int(node.execute_command("CLUSTER", "KEYSLOT", k)) for k in limiter_keys(name)}
    finally:
        node.close()
    assert len(slots) == 1
    (slot,) = slots
    primary = cluster.owner_of_slot(slot)
    replica = cluster.replica_of(primary)

    async def fail_over() -> None:
        await anyio.to_thread.run_sync(cluster.kill_primary, primary)
        await anyio.to_thread.run_sync(cluster.wait_for_failover, replica)

    client: Any = redis.asyncio.RedisCluster.from_url(cluster.url, max_connections=512)
    try:
        run, left = await run_through_failover(client, name, fail_over)
    finally:
        await client.aclose()
    print(f"cluster failover: {run.summary()}; {left}")
    assert cluster.owner_of_slot(slot) == replica
    check(run)


# -- Sentinel -----------------------------------------------------------------------------------


class SentinelSetup:
    """One primary, one replica and one sentinel (quorum 1) on loopback ports."""

    def __init__(self) -> None:
        self.primary, self.replica, self.sentinel = _free_ports(3)
        self._dir = Path(tempfile.mkdtemp(prefix="aiometer-sentinel-"))
        self._processes: dict[int, subprocess.Popen[bytes]] = {}

    def _spawn(self, port: int, *args: str) -> None:
        with open(self._dir / f"redis-{port}.log", "ab") as log:
            self._processes[port] = subprocess.Popen(
                [find_redis_server(), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not happen within {timeout:g}s:\n{self._logs()}")
            time.sleep(0.02)

    def _logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-10:])
            for path in sorted(self._dir.glob("redis-*.log"))
        )

    def start(self) -> None:
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        common += ["--dir", str(self._dir)]
        self._spawn(self.primary, "--port", str(self.primary), *common)
        self._wait(lambda: (send_command(self.primary, "PING") or "").startswith("+PONG"), "start")
        self._spawn(
            self.replica,
            "--port",
            str(self.replica),
            "--replicaof",
            "127.0.0.1",
            str(self.primary),
            *common,
        )
        self._wait(
            lambda: (
                "master_link_status:up" in (send_command(self.replica, "INFO", "replication") or "")
            ),
            "replica sync",
        )
        config = self._dir / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel}\n"
            "bind 127.0.0.1\n"
            f"dir {self._dir}\n"
            f"sentinel monitor mymaster 127.0.0.1 {self.primary} 1\n"
            "sentinel down-after-milliseconds mymaster 500\n"
            "sentinel failover-timeout mymaster 2000\n"
        )
        self._spawn(self.sentinel, str(config), "--sentinel")
        self._wait(lambda: self.known_replicas() >= 1, "sentinel discovering the replica")

    def _sentinel_client(self) -> Any:
        return redis.Redis(port=self.sentinel, socket_timeout=1.0, decode_responses=True)

    def known_replicas(self) -> int:
        client = self._sentinel_client()
        try:
            return int(client.sentinel_master("mymaster")["num-slaves"])
        except redis.ConnectionError:
            return 0
        finally:
            client.close()

    def master_port(self) -> int:
        client = self._sentinel_client()
        try:
            _, port = client.sentinel_get_master_addr_by_name("mymaster")
            return int(port)
        finally:
            client.close()

    def kill_primary(self) -> None:
        process = self._processes[self.primary]
        process.kill()
        process.wait()

    def wait_for_failover(self) -> None:
        self._wait(
            lambda: (
                self.master_port() == self.replica
                and "role:master" in (send_command(self.replica, "INFO", "replication") or "")
            ),
            "the replica's promotion",
        )

    def stop(self) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self._processes.values():
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelSetup]:
    setup = SentinelSetup()
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.mark.anyio
async def test_sentinel_primary_killed_mid_run(sentinel_setup: SentinelSetup) -> None:
    """The sentinel-monitored primary is SIGKILLed 0.6 s into the run; the sentinel
    (down-after 500 ms) promotes the replica, the client follows it and the run completes.

    measured (redis 7.0, redis-py 8.1, five runs): outage (kill to promotion seen)
    1.82-2.03 s, stall (longest gap between starts) 2.62 s (once 3.62 s: one more retry
    backoff), over-admission 0.000 s (peak 3),
    run 6.11-6.12 s against about 3.3 s undisturbed; about 12 s in all.
    """
    setup = sentinel_setup
    name = f"sentinel-{uuid.uuid4().hex[:8]}"
    # redis.asyncio.sentinel is untyped.
    sentinel_class: Any = redis.asyncio.sentinel.Sentinel
    sentinel = sentinel_class([("127.0.0.1", setup.sentinel)])
    client = sentinel.master_for("mymaster")
    assert isinstance(client, redis.asyncio.Redis)
    assert isinstance(adapt(client), RedisPyClient)

    async def fail_over() -> None:
        await anyio.to_thread.run_sync(setup.kill_primary)
        await anyio.to_thread.run_sync(setup.wait_for_failover)

    try:
        run, left = await run_through_failover(client, name, fail_over)
    finally:
        await client.aclose()
        for node in sentinel.sentinels:
            await node.aclose()
    print(f"sentinel failover: {run.summary()}; {left}")
    assert setup.master_port() == setup.replica
    check(run)


@pytest.mark.anyio
@pytest.mark.backends("asyncio", "trio")
async def test_sentinel_url_primary_killed_mid_run(
    sentinel_setup: SentinelSetup, anyio_backend: str
) -> None:
    """The same failover through ``RedisLimiter.from_url("redis+sentinel://...")``: the
    limiter's own client is redis-py's on asyncio and coredis's on trio; both follow the
    promotion."""
    setup = sentinel_setup
    name = f"sentinel-url-{uuid.uuid4().hex[:8]}"
    url = f"redis+sentinel://127.0.0.1:{setup.sentinel}/mymaster/0"

    async def fail_over() -> None:
        await anyio.to_thread.run_sync(setup.kill_primary)
        await anyio.to_thread.run_sync(setup.wait_for_failover)

    run, left = await run_through_failover(url, name, fail_over)
    print(f"sentinel URL failover ({anyio_backend}): {run.summary()}; {left}")
    assert setup.master_port() == setup.replica
    check(run)

    # The command line takes the same URL and finds the promoted primary too.
    status = await anyio.run_process(
        [sys.executable, "-m", "aiometer_redis", "status", name, "--redis-url", url, "--json"]
    )
    state = json.loads(status.stdout)
    assert state["holders"] == []
    assert state["waiters"] == []
    assert state["issued"] >= TASKS
