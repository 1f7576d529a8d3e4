"""What ``RedisLimiter(..., metrics=...)`` costs: nothing measurable off, little on.

Run ``python bench/metrics.py`` (about 20 s) or ``python bench/metrics.py --quick`` (about 8 s).
The script starts its own ``redis-server`` on a free loopback port.

1. Acquire and release against Redis. One process, 16 coroutines on asyncio looping on
   ``permit = await limiter.acquire(); await permit.release()`` through one client, for a
   concurrency-only limiter (two script calls per cycle) and a rate-only one that never waits
   (one call). Each round runs the same cycles with metrics off and with metrics on (a fresh
   ``CollectorRegistry``), in alternating order; shown is the median over rounds of
   ``time on / time off``. On a busy machine the rounds move by more than the metrics cost, so
   this ratio is for information; the verdict is section 2's.
2. The bookkeeping alone, without Redis: what the metrics add to one acquisition and release
   (``LimiterMetrics.acquire`` around an acquire that makes one script call through the timed
   client to a client that answers at once, then ``released``), next to what metrics off add
   (the ``None`` check in ``acquire()`` and in ``release()``), in nanoseconds per cycle; and
   that cost as a share of section 1's cycle with metrics off. Target: <= 10 % on, and off
   below 1 % of the same cycle.

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
from aiometer_redis._scripts import Script, load_script
from aiometer_redis.testing import RedisServer

TARGET_ON = 0.10
TARGET_OFF = 0.01
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
    script = load_script("acquire")

    class Instant:
        async def run_script(
            self, script: Script, keys: Any, args: Any, *, wake_first: bool = False
        ) -> None:
            return None

    plain: Any = Instant()
    timed = metrics.timed(plain)

    # One script call per acquisition, as a rate-only limiter makes: through the timed client
    # with metrics on, straight to the client otherwise.
    async def acquire_timed() -> RedisPermit:
        await timed.run_script(script, (), ())
        return permit

    async def acquire() -> RedisPermit:
        await plain.run_script(script, (), ())
        return permit

    async def on() -> float:
        start = time.perf_counter()
        for _ in range(cycles):
            got = await metrics.acquire(acquire_timed)
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

    # The fastest of several runs: what the code costs, without the machine's other load.
    samples: dict[str, list[float]] = {"on": [], "off": [], "bare": []}
    for _ in range(7):
        for name, run in (("bare", bare), ("off", off), ("on", on)):
            samples[name].append(anyio.run(run))
    bare_s = min(samples["bare"])
    return {
        "on_ns": max(0.0, min(samples["on"]) - bare_s) / cycles * 1e9,
        "off_ns": max(0.0, min(samples["off"]) - bare_s) / cycles * 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and cycles")
    args = parser.parse_args(argv)
    rounds, cycles = (5, 1600) if args.quick else (11, 4000)
    with RedisServer() as server:
        rows = against_redis(server.url, rounds, cycles)
    print(f"1. acquire + release against Redis ({COROUTINES} coroutines, {rounds} rounds)")
    print(f"   {'limiter':<18} {'off µs/cycle':>13} {'on/off':>8}")
    for row in rows:
        print(
            f"   {row['limiter']:<18} {row['off_us_per_cycle']:>13.1f} {row['ratio_on_off']:>8.3f}"
        )
    cost = bookkeeping(20_000 if args.quick else 100_000)
    print("2. bookkeeping per acquire + release (one script call), without Redis")
    print(f"   metrics on : {cost['on_ns']:8.0f} ns")
    print(f"   metrics off: {cost['off_ns']:8.0f} ns (two None checks)")
    for row in rows:
        cycle_ns = row["off_us_per_cycle"] * 1e3
        on, off = cost["on_ns"] / cycle_ns, cost["off_ns"] / cycle_ns
        verdict = "OK" if on <= TARGET_ON and off <= TARGET_OFF else "MISSED"
        print(
            f"   share of a {row['limiter']} cycle: on {on:.1%}, off {off:.2%}  {verdict} "
            f"(targets <= {TARGET_ON:.0%} and <= {TARGET_OFF:.0%})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
