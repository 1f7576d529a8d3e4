"""Rate reservations of a rate-only RedisLimiter: a script call reserves the next starts of the
fleet for the same process, handed out locally at their times; unused ones are given back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
import redis

from aiometer_redis import RedisLimiter
from aiometer_redis.testing import RedisServer, window_violations

pytestmark = pytest.mark.redis

WORKER = Path(__file__).parent / "helpers" / "fleet_worker.py"
CLIENTS = [
    pytest.param(["--backend", "asyncio", "--client", "redis"], id="asyncio-redis"),
    pytest.param(["--backend", "trio", "--client", "coredis"], id="trio-coredis"),
]


async def _tat_us(server: RedisServer, limiter: RedisLimiter) -> float:
    # A blocking client (any backend): one short GET.
    with redis.Redis.from_url(server.url) as raw:
        return float(raw.get(limiter.keys[3]))


@pytest.mark.anyio
async def test_one_call_serves_the_next_acquisition(server: RedisServer, name: str) -> None:
    async with RedisLimiter.from_url(server.url, name, max_per_second=50) as limiter:
        first = await limiter.acquire()
        # Reserved by the first call: the next start is served locally, with the next token.
        second = await limiter.acquire()
        assert second.token == first.token + 1


@pytest.mark.anyio
async def test_reservations_are_given_back_on_exit(server: RedisServer, name: str) -> None:
    interval_us = 1e6 / 40
    async with RedisLimiter.from_url(server.url, name, max_per_second=40) as limiter:
        first = await limiter.acquire()
        ahead = len(limiter._pool)
        assert ahead >= 1
        reserved_tat = await _tat_us(server, limiter)
    # Every start reserved ahead (still to come) went back to the fleet: the rate state is as
    # if only the first start had been taken.
    assert await _tat_us(server, limiter) == pytest.approx(
        reserved_tat - ahead * interval_us, abs=2
    )
    async with RedisLimiter.from_url(server.url, name, max_per_second=40) as other:
        permit = await other.acquire()
        assert permit.token > first.token + ahead


@pytest.mark.anyio
async def test_a_cancelled_caller_hands_its_reservation_on(server: RedisServer, name: str) -> None:
    async with RedisLimiter.from_url(server.url, name, max_per_second=40) as limiter:
        first = await limiter.acquire()
        assert limiter._pool
        with anyio.move_on_after(0.002) as scope:
            await limiter.acquire()  # sleeps towards the reserved start (25 ms away)
        assert scope.cancelled_caught
        # The start it left is the next acquisition's: the same token, no new call needed.
        again = await limiter.acquire()
        assert again.token == first.token + 1


def _run_fleet(
    server: RedisServer, name: str, tmp_path: Path, per_process: Sequence[Sequence[str]]
) -> list[float]:
    duration = 2.0
    start_at = time.time() + 1.5
    outs = [tmp_path / f"worker{i}.json" for i in range(len(per_process))]
    common = [sys.executable, str(WORKER), "--url", server.url, "--name", name]
    timing = ["--start-at", repr(start_at), "--duration", repr(duration)]
    procs = [
        subprocess.Popen([*common, *timing, "--out", str(out), *options])
        for out, options in zip(outs, per_process, strict=True)
    ]
    for proc in procs:
        assert proc.wait(timeout=duration + 60) == 0
    starts: list[float] = []
    for out in outs:
        starts.extend(float(a) for a, _ in json.loads(out.read_text())["intervals"])
    return sorted(starts)


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("pool", [1, 8])
def test_fleet_window_bound_with_reservations(
    server: RedisServer, name: str, tmp_path: Path, client: list[str], pool: int
) -> None:
    # 100/s: each call may reserve up to 5 starts ahead; pool 1 acquires one at a time.
    rate = 100.0
    options = ["--max-per-second", str(rate), "--pool", str(pool), *client]
    starts = _run_fleet(server, name, tmp_path, [options] * 3)
    widths = [1 / rate, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]
    assert window_violations(starts, rate, 1, widths) == []
    achieved = (len(starts) - 1) / (starts[-1] - starts[0])
    assert achieved >= 0.9 * rate


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_killed_holder_of_reservations(
    server: RedisServer, name: str, tmp_path: Path, client: list[str]
) -> None:
    rate = 100.0
    limits = ["--max-per-second", str(rate), *client]
    holder = subprocess.Popen(
        [sys.executable, str(WORKER), "--url", server.url, "--name", name, "--hold", "3", *limits],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "HOLDING"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    # The killed process's reserved starts are lost (at most those): the fleet's windows hold
    # and its rate is reached.
    starts = _run_fleet(server, name, tmp_path, [[*limits, "--pool", "4"]] * 3)
    widths = [1 / rate, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]
    assert window_violations(starts, rate, 1, widths) == []
    achieved = (len(starts) - 1) / (starts[-1] - starts[0])
    assert achieved >= 0.9 * rate
