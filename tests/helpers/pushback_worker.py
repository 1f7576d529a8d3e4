"""One worker process of the push-back tests (run as a script, not collected).

It waits until a shared wall-clock start time, then runs tasks through a RedisLimiter for
--duration seconds and writes one JSON object to --out:

- ``starts``: the wall-clock start time of every task it ran;
- ``pause``: with --pause-at, the wall-clock times just before and after its ``pause()`` call
  and the seconds left that the call returned;
- ``cuts``: how many of its ``throttled()`` reports cut the adaptive rate (every task that
  starts between --throttle-from and --throttle-until reports one, as if the target had
  answered 429);
- ``rates``: with --sample, (time, statistics().effective_max_per_second) every 0.1 s;
- ``set``: with --set-at, the wall-clock time its ``set_limits()`` call returned (and
  ``clear`` its ``clear_limits()`` call's, with --clear-at).

Times given as options are seconds after --start-at.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

import aiometer
from aiometer_redis import RedisLimiter

# Run as a script: its own directory is on sys.path, the helpers package's parent is not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.fleet_worker import add_limit_options


@dataclass(frozen=True)
class Adaptive:
    """The adaptive options (what ``aiometer.Adaptive`` holds)."""

    factor: float
    cooldown: float
    floor: float | None
    recovery: float


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True)
    add_limit_options(parser)
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--task-time", type=float, default=0.0)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--adaptive", action="store_true")
    parser.add_argument("--factor", type=float, default=0.5)
    parser.add_argument("--cooldown", type=float, default=1.0)
    parser.add_argument("--recovery", type=float, default=30.0)
    parser.add_argument("--pause-at", type=float)
    parser.add_argument("--pause-for", type=float, default=1.0)
    parser.add_argument("--throttle-from", type=float)
    parser.add_argument("--throttle-until", type=float)
    parser.add_argument("--set-at", type=float)
    parser.add_argument("--set-rate", type=float)
    parser.add_argument("--clear-at", type=float)
    parser.add_argument("--sample", action="store_true")
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


@functools.cache
def _coredis() -> Any:
    import coredis

    return coredis


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "max_at_once": args.max_at_once,
        "max_per_second": args.max_per_second,
        "burst": args.burst,
    }
    if args.adaptive:
        options["adaptive"] = Adaptive(args.factor, args.cooldown, None, args.recovery)
    if args.client == "coredis":
        async with (
            _coredis().Redis.from_url(args.url) as client,
            RedisLimiter(client, args.name, **options) as limiter,
        ):
            return await _work(limiter, args)
    async with RedisLimiter.from_url(args.url, args.name, **options) as limiter:
        return await _work(limiter, args)


async def _at(start: float, offset: float | None) -> bool:
    """Sleep until *offset* seconds after *start*; False if there is no such offset."""
    if offset is None:
        return False
    delay = start + offset - time.time()
    if delay > 0:
        await anyio.sleep(delay)
    return True


async def _work(limiter: RedisLimiter, args: argparse.Namespace) -> dict[str, Any]:
    start = args.start_at
    out: dict[str, Any] = {"starts": [], "cuts": 0, "rates": []}
    deadline = start + args.duration
    await _at(start, 0.0)

    def items() -> Any:
        while time.time() < deadline:
            yield None

    async def task(_: None) -> None:
        now = time.time()
        out["starts"].append(now)
        throttling = args.throttle_from is not None and args.throttle_until is not None
        reported = throttling and start + args.throttle_from <= now < start + args.throttle_until
        if reported and await limiter.throttled():
            out["cuts"] += 1
        if args.task_time:
            await anyio.sleep(args.task_time)

    async def pause() -> None:
        if await _at(start, args.pause_at):
            before = time.time()
            left = await limiter.pause(args.pause_for)
            out["pause"] = [before, time.time(), left]

    async def operator() -> None:
        if await _at(start, args.set_at):
            await limiter.set_limits(max_per_second=args.set_rate)
            out["set"] = time.time()
        if await _at(start, args.clear_at):
            await limiter.clear_limits()
            out["clear"] = time.time()

    async def sample() -> None:
        while args.sample and time.time() < deadline:
            stats = await limiter.statistics()
            out["rates"].append([time.time(), stats.effective_max_per_second])
            await anyio.sleep(0.1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(pause)
        tg.start_soon(operator)
        tg.start_soon(sample)
        await aiometer.run_on_each(task, items(), max_at_once=args.pool, limiter=limiter)
    return out


def main(argv: list[str]) -> None:
    args = _parse(argv)
    result = anyio.run(_run, args, backend=args.backend)
    with open(args.out, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main(sys.argv[1:])
