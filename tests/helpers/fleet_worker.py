"""One worker process of the multi-process Redis tests (run as a script, not collected).

It waits until a shared wall-clock start time, then runs tasks through a RedisLimiter and
writes one JSON object to --out: the (start, end) wall-clock times of every task it ran.
With --hold it takes --hold slots, prints "HOLDING" and sleeps until killed. With
--report-lost as well, it prints "LOST" (from the limiter's on_lease_lost callback) each time a
renewal finds one of its leases expired, and keeps sleeping: it never re-acquires.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from typing import Any

import anyio

import aiometer
from aiometer_redis import RedisLimiter


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """The options every worker script shares: event loop, client library and limits."""
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--client", default="redis", choices=["redis", "coredis"])
    parser.add_argument("--max-at-once", type=int)
    parser.add_argument("--max-per-second", type=float)
    parser.add_argument("--burst", type=int, default=1)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True)
    add_limit_options(parser)
    parser.add_argument("--lease-ttl", type=float, default=30.0)
    parser.add_argument("--pool", type=int, default=16, help="local workers (local demand)")
    parser.add_argument("--task-time", type=float, default=0.0)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--hold", type=int, default=0)
    parser.add_argument(
        "--report-lost", action="store_true", help='print "LOST" when a lease is found lost'
    )
    parser.add_argument("--out")
    return parser.parse_args(argv)


@functools.cache
def _coredis() -> Any:
    import coredis

    return coredis


async def _run(args: argparse.Namespace) -> list[tuple[float, float]]:
    options: dict[str, Any] = {
        "max_at_once": args.max_at_once,
        "max_per_second": args.max_per_second,
        "burst": args.burst,
        "lease_ttl": args.lease_ttl,
    }
    if args.report_lost:
        options["on_lease_lost"] = _print_lost
    if args.client == "coredis":
        async with (
            _coredis().Redis.from_url(args.url) as client,
            RedisLimiter(client, args.name, **options) as limiter,
        ):
            return await _work(limiter, args)
    async with RedisLimiter.from_url(args.url, args.name, **options) as limiter:
        return await _work(limiter, args)


def _print_lost(error: Exception) -> None:
    print("LOST", flush=True)


async def _work(limiter: RedisLimiter, args: argparse.Namespace) -> list[tuple[float, float]]:
    if args.hold:
        for _ in range(args.hold):
            await limiter.acquire()
        print("HOLDING", flush=True)
        await anyio.sleep_forever()
    delay = args.start_at - time.time()
    if delay > 0:
        await anyio.sleep(delay)
    intervals: list[tuple[float, float]] = []
    deadline = time.time() + args.duration

    def items() -> Any:
        while time.time() < deadline:
            yield None

    async def task(_: None) -> None:
        start = time.time()
        if args.task_time:
            await anyio.sleep(args.task_time)
        intervals.append((start, time.time()))

    await aiometer.run_on_each(task, items(), max_at_once=args.pool, limiter=limiter)
    return intervals


def main(argv: list[str]) -> None:
    args = _parse(argv)
    intervals = anyio.run(_run, args, backend=args.backend)
    with open(args.out, "w") as out:
        json.dump({"intervals": intervals}, out)


if __name__ == "__main__":
    main(sys.argv[1:])
