"""One worker process of the multi-process Redis Cluster test (run as a script, not collected).

It opens one cluster client and one RedisLimiter per name on it, prints "READY", and reads the
shared wall-clock start time from its standard input. From then on it feeds every limiter
tasks for --duration seconds and finally writes ``{name: [[start, end], ...]}`` to --out: the
wall-clock times of every task it ran, per limiter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio

import aiometer
from aiometer_redis import RedisLimiter

# Run as a script: its own directory is on sys.path, the helpers package's parent is not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.fleet_worker import add_limit_options

Intervals = dict[str, list[tuple[float, float]]]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="any node of the cluster")
    parser.add_argument("--names", required=True, help="comma-separated limiter names")
    parser.add_argument("--prefix", required=True)
    add_limit_options(parser)
    parser.add_argument("--pool", type=int, default=4, help="local workers per limiter")
    parser.add_argument("--task-time", type=float, default=0.0)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


async def _cluster_client(stack: AsyncExitStack, args: argparse.Namespace) -> Any:
    # As in test_cluster.py: enough connections for one parked BLPOP per limiter.
    if args.client == "coredis":
        import coredis

        return await stack.enter_async_context(
            coredis.RedisCluster(args.host, args.port, max_connections=512)
        )
    import redis.asyncio

    client = redis.asyncio.RedisCluster(host=args.host, port=args.port, max_connections=512)
    stack.push_async_callback(client.aclose)
    return client


async def _run(args: argparse.Namespace) -> Intervals:
    names: list[str] = args.names.split(",")
    intervals: Intervals = {name: [] for name in names}
    async with AsyncExitStack() as stack:
        client = await _cluster_client(stack, args)
        limiters = [
            await stack.enter_async_context(
                RedisLimiter(
                    client,
                    name,
                    prefix=args.prefix,
                    max_at_once=args.max_at_once,
                    max_per_second=args.max_per_second,
                    burst=args.burst,
                    lease_ttl=10,
                )
            )
            for name in names
        ]
        print("READY", flush=True)
        start_at = float(await anyio.to_thread.run_sync(sys.stdin.readline))
        await anyio.sleep(max(0.0, start_at - time.time()))
        deadline = start_at + args.duration

        def items() -> Any:
            while time.time() < deadline:
                yield None

        async def feed(name: str, limiter: RedisLimiter) -> None:
            record = intervals[name]

            async def task(_: None) -> None:
                start = time.time()
                await anyio.sleep(args.task_time)
                record.append((start, time.time()))

            await aiometer.run_on_each(task, items(), max_at_once=args.pool, limiter=limiter)

        async with anyio.create_task_group() as tg:
            for name, limiter in zip(names, limiters, strict=True):
                tg.start_soon(feed, name, limiter)
    return intervals


def main(argv: list[str]) -> None:
    args = _parse(argv)
    intervals = anyio.run(_run, args, backend=args.backend)
    with open(args.out, "w") as out:
        json.dump(intervals, out)


if __name__ == "__main__":
    main(sys.argv[1:])
