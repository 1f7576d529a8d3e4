"""One process of the rate reservation tests (run as a script, not collected).

It waits until a shared wall-clock start time, then takes starts of a rate-only RedisLimiter
from --coroutines coroutines, each looping ``acquire()`` for --duration seconds, and writes one
JSON object to --out: ``{"starts": [[token, wall-clock time acquire returned], ...]}``.
--one-at-a-time switches reservations ahead off (one script call per start). With --hold N it
takes N starts, prints "HOLDING" (its reservations ahead are then in its pool) and sleeps until
killed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import anyio

from aiometer_redis import RedisLimiter


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--client", default="redis", choices=["redis", "coredis"])
    parser.add_argument("--max-per-second", type=float, required=True)
    parser.add_argument("--burst", type=int, default=1)
    parser.add_argument("--coroutines", type=int, default=1)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--one-at-a-time", action="store_true")
    parser.add_argument("--hold", type=int, default=0)
    parser.add_argument("--out")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> list[tuple[int, float]]:
    options: dict[str, Any] = {"max_per_second": args.max_per_second, "burst": args.burst}
    if args.client == "coredis":
        import coredis

        async with (
            coredis.Redis.from_url(args.url) as client,
            RedisLimiter(client, args.name, **options) as limiter,
        ):
            return await _work(limiter, args)
    async with RedisLimiter.from_url(args.url, args.name, **options) as limiter:
        return await _work(limiter, args)


async def _work(limiter: RedisLimiter, args: argparse.Namespace) -> list[tuple[int, float]]:
    if args.one_at_a_time:
        limiter._reserving = False
    if args.hold:
        for _ in range(args.hold):
            await limiter.acquire()
        print("HOLDING", flush=True)
        await anyio.sleep_forever()
    await anyio.sleep(max(0.0, args.start_at - time.time()))
    deadline = time.time() + args.duration
    starts: list[tuple[int, float]] = []

    async def loop() -> None:
        while time.time() < deadline:
            permit = await limiter.acquire()
            starts.append((permit.token, time.time()))
            await permit.release()

    async with anyio.create_task_group() as task_group:
        for _ in range(args.coroutines):
            task_group.start_soon(loop)
    return starts


def main(argv: list[str]) -> None:
    args = _parse(argv)
    starts = anyio.run(_run, args, backend=args.backend)
    with open(args.out, "w") as out:
        json.dump({"starts": starts}, out)


if __name__ == "__main__":
    main(sys.argv[1:])
