"""What ``RedisLimiter(..., metrics=...)`` costs: nothing measurable off, little on.

Run ``python bench/metrics.py`` (about 20 s) or ``python bench/metrics.py --quick`` (about 8 s).
The script starts its own ``redis-server`` on a free loopback port.

1. Acquire and release against Redis. One process, 16 coroutines on asyncio looping on
   ``permit = await limiter.acquire(); await permit.release()`` through one client, for a
   concurrency-only limiter (two script calls per cycle) and a rate-only one that never waits
   (one call). Each round runs the same cycles with metrics off and with metrics on (a fresh
   ``CollectorRegistry``), in alternating order; the verdict is the median over rounds of
   ``time on / time off``. Target: <= 1.10.
2. The bookkeeping alone, without Redis: what the metrics add to one acquisition and release
   (``LimiterMetrics.acquire`` around an acquire that returns at once, then ``released``),
   next to what metrics off add (the ``None`` check in ``acquire()`` and in ``release()``).
   Shown in nanoseconds per cycle, for information.

Every verdict is a ratio from this run; the exit status is 0 whatever the verdicts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiometer_redis import LimiterConfig, RedisLimiter, RedisPermit
from aiometer_redis._leases import LeaseTable
from aiometer_redis._metrics import LimiterMetrics
from aiometer_redis.testing import RedisServer

TARGET_RATIO = 1.10
COROUTINES = 16
LIMITS: dict[str, dict[str, Any]] = {
    "concurrency-only": {"max_at_once": 10_000},
    "rate-only": {"max_per_second": 1e9},
}


async def _cycles(url: str, limits: dict[str, Any], metrics: object, cycles: int) -> float:
    """Seconds for *cycles* acquire/release cycles over COROUTINES coroutines."""
    client = redis.asyncio.Redis.from_url(url, max_connections=COROUTINES + 4)
    try:
        async with RedisLimiter(client, "bench-metrics", metrics=metrics, **limits) as limiter:
            per_task = cycles // COROUTINES

            async def loop() -> None:
                for _ in range(per_task):
                    permit = await limiter.acquire()
                    await permit.release()

            async with anyio.create_task_group() as warm:
                for _ in range(COROUTINES):
                    warm.start_soon(loop)
            start = time.perf_counter()
            async with anyio.create_task_group() as group:
                for _ in range(COROUTINES):
                    group.start_soon(loop)
            return time.perf_counter() - start
    finally:
        await client.aclose()


def against_redis(url: str, rounds: int, cycles: int) -> list[dict[str, Any]]:
    from prometheus_client import CollectorRegistry

    rows = []
    for kind, limits in LIMITS.items():
        ratios = []
        off_times = []
        for round_index in range(rounds):
            order = ("off", "on") if round_index % 2 == 0 else ("on", "off")
            times = {}
            for mode in order:
                metrics: object = CollectorRegistry() if mode == "on" else False
                times[mode] = anyio.run(_cycles, url, limits, metrics, cycles)
            ratios.append(times["on"] / times["off"])
            off_times.append(times["off"])
        rows.append(
            {
                "limiter": kind,
                "off_us_per_cycle": statistics.median(off_times) / cycles * 1e6,
                "ratio_on_off": statistics.median(ratios),
            }
        )
    return rows


def bookkeeping(cycles: int) -> dict[str, float]:
    """Nanoseconds per cycle: the metrics' own work, and the None check of metrics off."""
    from prometheus_client import CollectorRegistry

    leases = LeaseTable("x", LimiterConfig(max_at_once=1), None)  # type: ignore[arg-type]
    metrics = LimiterMetrics("x", CollectorRegistry(), leases)
    permit = RedisPermit(leases, None, 0, None)

    async def acquire() -> RedisPermit:
        return permit

    async def on() -> float:
        start = time.perf_counter()
        for _ in range(cycles):
            got = await metrics.acquire(acquire)
            metrics.released(got)
        return time.perf_counter() - start

    async def bare() -> float:
        start = time.perf_counter()
        for _ in range(cycles):
            await acquire()
        return time.perf_counter() - start

    async def off() -> float:
        switched_off: LimiterMetrics | None = None
        start = time.perf_counter()
        for _ in range(cycles):
            if switched_off is not None:
                await switched_off.acquire(acquire)
            got = await acquire()
            if switched_off is not None:
                switched_off.released(got)
        return time.perf_counter() - start

    samples: dict[str, list[float]] = {"on": [], "off": [], "bare": []}
    for _ in range(5):
        for name, run in (("bare", bare), ("off", off), ("on", on)):
            samples[name].append(anyio.run(run))
    bare_s = statistics.median(samples["bare"])
    return {
        "on_ns": (statistics.median(samples["on"]) - bare_s) / cycles * 1e9,
        "off_ns": (statistics.median(samples["off"]) - bare_s) / cycles * 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and cycles")
    args = parser.parse_args(argv)
    rounds, cycles = (3, 1600) if args.quick else (7, 4000)
    with RedisServer() as server:
        rows = against_redis(server.url, rounds, cycles)
    print(f"1. acquire + release against Redis ({COROUTINES} coroutines, {rounds} rounds)")
    print(f"   {'limiter':<18} {'off µs/cycle':>13} {'on/off':>8}  verdict")
    for row in rows:
        verdict = "OK" if row["ratio_on_off"] <= TARGET_RATIO else "MISSED"
        print(
            f"   {row['limiter']:<18} {row['off_us_per_cycle']:>13.1f} "
            f"{row['ratio_on_off']:>8.3f}  {verdict} (target <= {TARGET_RATIO})"
        )
    cost = bookkeeping(20_000 if args.quick else 100_000)
    print("2. bookkeeping per acquire + release, without Redis")
    print(f"   metrics on : {cost['on_ns']:8.0f} ns")
    print(f"   metrics off: {cost['off_ns']:8.0f} ns (two None checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
