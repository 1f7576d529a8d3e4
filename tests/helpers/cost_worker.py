"""One worker process of the cost tests, and the cost-aware window check that judges them.

Run as a script (not collected), a worker waits until a shared wall-clock start time, then for
``--duration`` seconds runs ``--pool`` local tasks that each acquire a RedisLimiter with a
random cost, hold the permit a moment, settle it to an "actual" cost drawn per ``--settle``
and release it. It writes one JSON object to ``--out``: a :class:`Task` per acquisition.

Imported, :func:`check_rate` judges the recorded tasks of the whole fleet against one Rate.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: Settle modes: the range of actual / estimate a task draws, None for no settle.
SETTLE = {
    "none": None,
    "down": (0.2, 0.9),
    "up": (1.0, 1.5),
    "mixed": (0.5, 1.5),
}


@dataclass(frozen=True)
class Task:
    """One acquisition, with wall-clock times from the worker's ``time.time()``.

    Attributes:
        ask: when acquire() was called (the reservation was made after it).
        start: when acquire() returned (never before the start the limiter decided).
        settled: when settle() returned (the charge was applied before it); None: no settle.
        estimate: the cost passed to acquire().
        actual: the cost settled (the estimate when not settled).
    """

    ask: float
    start: float
    settled: float | None
    estimate: float
    actual: float

    @property
    def overspend(self) -> float:
        return max(0.0, self.actual - self.estimate)


def load_tasks(path: str) -> list[Task]:
    with open(path) as source:
        return [Task(**record) for record in json.load(source)["tasks"]]


def check_rate(
    tasks: Sequence[Task], limit: float, per: float, counts: str, *, jitter: float
) -> list[str]:
    """Every window of *per* seconds where the tasks broke the Rate, as readable lines.

    A window holds the tasks whose recorded starts are less than ``per - jitter`` apart:
    recorded starts lag the decided ones by up to *jitter* (the wake-up after the limiter's
    sleep), so two starts the limiter placed exactly ``per`` apart may be recorded a little
    closer. A ``"calls"`` window may hold at most *limit* tasks. A ``"cost"`` window may hold
    at most *limit* in actual costs plus the documented settle bound: the overspend of tasks in
    the window that settled above their estimate after a later start in the window had been
    reserved (asked for before the settle returned). Costs travel to Redis as micro-units, so
    sums may differ from *limit* by a micro-unit per task.
    """
    ordered = sorted(tasks, key=lambda task: task.start)
    problems = []
    end = 0
    for first, head in enumerate(ordered):
        end = max(end, first)
        while end < len(ordered) and ordered[end].start - head.start < per - jitter:
            end += 1
        window = ordered[first:end]
        if counts == "calls":
            if len(window) > limit:
                problems.append(f"{len(window)} calls from {head.start:.3f} > {limit:g}")
            continue
        used = sum(task.actual for task in window)
        excused = 0.0
        for task in window:
            if task.overspend and task.settled is not None:
                # "Later" within the jitter: recorded order may swap two close starts.
                settled = task.settled
                if any(
                    other is not task and other.start > task.start - jitter and other.ask < settled
                    for other in window
                ):
                    excused += task.overspend
        slack = 1e-6 * len(window)
        if used > limit + excused + slack:
            problems.append(
                f"{used:.3f} cost from {head.start:.3f} over {len(window)} starts > "
                f"{limit:g} + overspend {excused:.3f}"
            )
    return problems


def max_started(tasks: Sequence[Task], per: float, what: str) -> float:
    """The most *what* ("estimate", "actual" or "calls") started in any window of *per*."""
    ordered = sorted(tasks, key=lambda task: task.start)
    best = total = 0.0
    first = 0
    for task in ordered:
        total += 1.0 if what == "calls" else getattr(task, what)
        while task.start - ordered[first].start >= per:
            total -= 1.0 if what == "calls" else getattr(ordered[first], what)
            first += 1
        best = max(best, total)
    return best


# -- the worker script ------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--client", default="redis", choices=["redis", "coredis"])
    parser.add_argument(
        "--rate", action="append", default=[], help="LIMIT,PER[,calls]: one Rate (repeatable)"
    )
    parser.add_argument("--min-cost", type=float, default=1.0)
    parser.add_argument("--max-cost", type=float, default=10.0)
    parser.add_argument("--settle", choices=sorted(SETTLE), default="mixed")
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--task-time", type=float, default=0.02)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--seed", default="0")
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def _rates(specs: Sequence[str]) -> list[Any]:
    from aiometer import Rate

    rates = []
    for spec in specs:
        limit, per, *counts = spec.split(",")
        if counts == ["calls"]:
            rates.append(Rate(float(limit), per=float(per), counts="calls"))
        else:
            rates.append(Rate(float(limit), per=float(per)))
    return rates


@functools.cache
def _coredis() -> Any:
    import coredis

    return coredis


async def _run(args: argparse.Namespace) -> list[Task]:
    from aiometer_redis import RedisLimiter

    options: dict[str, Any] = {"rates": _rates(args.rate)}
    if args.client == "coredis":
        async with (
            _coredis().Redis.from_url(args.url) as client,
            RedisLimiter(client, args.name, **options) as limiter,
        ):
            return await _work(limiter, args)
    async with RedisLimiter.from_url(args.url, args.name, **options) as limiter:
        return await _work(limiter, args)


async def _work(limiter: Any, args: argparse.Namespace) -> list[Task]:
    import anyio

    rng = random.Random(args.seed)
    factors = SETTLE[args.settle]
    delay = args.start_at - time.time()
    if delay > 0:
        await anyio.sleep(delay)
    deadline = time.time() + args.duration
    tasks: list[Task] = []

    async def one() -> None:
        while time.time() < deadline:
            estimate = round(rng.uniform(args.min_cost, args.max_cost), 3)
            ask = time.time()
            permit = await limiter.acquire(cost=estimate)
            start = time.time()
            try:
                await anyio.sleep(rng.uniform(0, 2 * args.task_time))
                actual, settled = estimate, None
                if factors is not None:
                    actual = round(estimate * rng.uniform(*factors), 3)
                    await permit.settle(actual)
                    settled = time.time()
            finally:
                await permit.release()
            tasks.append(Task(ask, start, settled, estimate, actual))

    async with anyio.create_task_group() as group:
        for _ in range(args.pool):
            group.start_soon(one)
    return tasks


def main(argv: list[str]) -> None:
    import anyio

    args = _parse(argv)
    tasks = anyio.run(_run, args, backend=args.backend)
    with open(args.out, "w") as out:
        json.dump({"tasks": [asdict(task) for task in tasks]}, out)


if __name__ == "__main__":
    main(sys.argv[1:])
