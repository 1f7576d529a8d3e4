"""Core benchmarks of aiometer: per-task overhead, rate accuracy and peak memory.

Run ``python bench/core.py`` (about three minutes on two idle cores) or ``python bench/core.py
--quick`` for a smoke run with ~10x smaller sizes (under twenty seconds; its numbers are noisy
and its verdicts mean little, since the floors are cheaper with fewer tasks alive).
``--json FILE`` also writes the JSON document printed at the very end.

Everything runs on asyncio and on trio in the same run, and every verdict is a ratio against a
reference measured side by side on the same backend, so verdicts carry over between machines even
though absolute times do not. The script always exits 0: it reports, it does not gate.
``--sections overhead,rate`` (any subset of overhead, rate, memory, waiting, costs) runs only
those.

1. Per-task overhead: 50,000 no-op tasks through run_on_each, run_all, amap (consuming every
   result) and run_any, in microseconds per task, in two modes.

   * capped, ``max_at_once=100``. The floor is what one writes by hand: a task group spawning
     every task, each doing ``async with limiter: await noop(x)`` on one
     ``anyio.CapacityLimiter(100)``. Target: ours / floor <= 0.35.
   * unbounded, no limit. The floor is a task group doing ``tg.start_soon(noop, x)`` for every
     item, the least any scheduler can do. Target: ours / floor <= 1.15.

   run_on_each and amap call ``noop(x)`` over ``range(n)``; run_all calls a list of ``n`` times
   the same zero-argument no-op. run_any returns at its first success, so over ``n`` succeeding
   functions it would run only about ``max_at_once`` of them. It is given instead ``n - 1``
   functions that raise a cheap exception and a last one that succeeds, which makes it run all
   ``n``. Capped, it shares the floor above (raising costs a few percent of that floor);
   unbounded, where the target is tight, it gets a "catching floor" that does the same work by
   hand in each spawned task (``try: await fn() except Exception as exc: errors[i] = exc``), so
   that its ratio measures scheduling, not raising.

   Each round times every case once; within a round each floor is timed first (even rounds) or
   last (odd rounds) next to the functions compared with it, whose order rotates, and the two
   backends alternate. gc.collect() runs before every measurement and the median over three
   rounds is reported (five would not fit in three minutes: a capped floor alone takes ~4 s), so
   slow drift of the machine hits the floor and ours alike. The "per-round" column is the range
   of the ratios within single rounds: a wide range means a noisy machine.

2. Rate accuracy at 50, 500 and 5000 starts/s, burst 1 and 50, over ``b + rate`` items (about
   one second), on two paths: "pool" is run_on_each with ``max_at_once=200`` and
   ``limiter=RateLimiter(rate, burst=b)``; "alone" is run_on_each with ``max_per_second=rate``
   and no ``max_at_once`` (one loop takes each start and spawns a task per item). Each task
   records ``anyio.current_time()`` when it starts. achieved = (n - b) / (last start - time of
   the call); "ratio" is achieved / rate. Target: >= 0.95 at 500/s burst 1 and 5000/s burst 1 on
   both paths and at 5000/s burst 50 on the pool. The window columns give the most starts seen
   in any closed window of 1/rate, 0.1 s and 1 s against the bound the limiter promises,
   ``b + rate * w + 1``, and above 1000/s (where up to 2 ms of timer lateness is caught up at
   once) ``b + rate * (w + 0.002)``.

3. Peak memory over 10**6 items pulled from a generator with ``max_at_once=100``: amap
   (consuming and dropping every result), run_on_each and run_all (keeping its result list),
   plus a baseline, the plain list a comprehension of the same values builds. Each is run in a
   fresh interpreter (this file with a hidden ``--memory-probe NAME BACKEND`` argument) that
   reports its peak RSS growth (``ru_maxrss`` after the run minus before it). Targets: amap and
   run_on_each grow by less than 10 MiB, run_all by at most 1.5x the plain list. The probes run
   before the other sections, while this process is still small, because a child's
   ``ru_maxrss`` starts at its parent's peak (see measure_memory); a probe that finds it did
   anyway is flagged "inherited peak!". Probes run one per CPU at a time (RSS does not depend on
   CPU contention), so their "seconds" column is only indicative.

4. Waiting paths: 50,000 items at ``max_at_once`` 10, 100 and 1000, cost per item (median of
   three interleaved rounds) of amap with a fast consumer and with a slow one (two checkpoints
   per result, so the bounded buffer fills), the same ordered, ``limiter=`` a function of the
   item over 4 ``ConcurrencyLimiter(1)`` (tasks ``await anyio.sleep(0)``), and a shared
   ``ConcurrencyLimiter(max_at_once // 2)`` and ``RateLimiter(10**6)``. Target for the slow
   consumers, the per-item limiter and the shared limiters: cost at 1000 within 1.5x of the
   cost at 10 (a wake-up of every waiter per freed place would grow with max_at_once). The fast
   consumers are printed for reference: at 1000 workers even a consumer that does nothing
   between results is outpaced and the buffer fills, so they are judged only as the baseline
   of the second target: a slow consumer may cost the workers at most 5 us per item more than
   a fast one, beyond the consumer's own two checkpoints (measured alone in the same round).

5. Costs and windows: microseconds per acquisition (that never waits) of a ``RateLimiter`` with
   a cost, with two windows, and with a settle, each against a plain ``acquire()`` measured in
   the same round (printed for reference, no target). Then a check: random costs 1-8 through
   ``run_on_each(cost=...)`` for about a second against ``Rate(40, per=0.25)``; the most units
   started in any window (5 ms shorter, for the loop's latency) must not exceed 40.

Reading the output: an overhead ratio below 1 means aiometer costs less per task than the
hand-written floor; a rate ratio of 1.00 means the limit was reached exactly. The summary lists
every target with PASS or FAIL, and the JSON document holds every number, including the
per-round samples.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

import aiometer

CAP = 100
"""``max_at_once`` of the capped overhead mode and of the memory probes."""
RATE_WORKERS = 200
"""``max_at_once`` of the rate runs: enough workers that the limiter alone sets the pace."""

CAPPED_TARGET = 0.35
UNBOUNDED_TARGET = 1.15
RATE_TARGET = 0.95
STREAMING_TARGET_MIB = 10.0
RUN_ALL_TARGET = 1.5

FUNCTIONS = ("run_on_each", "run_all", "amap", "run_any")
# (path, rate, burst): "pool" is run_on_each(max_at_once=200, limiter=RateLimiter(rate, burst)),
# "alone" is run_on_each(max_per_second=rate) with no max_at_once (one task spawned per start).
RATE_CASES = (
    ("pool", 50.0, 1),
    ("pool", 50.0, 50),
    ("pool", 500.0, 1),
    ("pool", 500.0, 50),
    ("pool", 5000.0, 1),
    ("pool", 5000.0, 50),
    ("alone", 500.0, 1),
    ("alone", 5000.0, 1),
)
RATE_TARGET_CASES = (
    ("pool", 500.0, 1),
    ("pool", 5000.0, 1),
    ("pool", 5000.0, 50),
    ("alone", 500.0, 1),
    ("alone", 5000.0, 1),
)
# Above 1000/s the limiter catches up to 2 ms of timer lateness at once (see RateLimiter).
FAST_RATE = 1000.0
FAST_CATCH_UP = 0.002

WAIT_SIZES = (10, 100, 1000)
"""The ``max_at_once`` values of the waiting-path section."""
WAIT_GROWTH_TARGET = 1.5
"""Cost per item at max_at_once=1000 over the cost at 10, for every waiting path."""
SLOW_CONSUMER_TARGET_US = 5.0
"""What a slow amap consumer may add to the cost per item over a fast one."""
PROBES = ("amap", "run_on_each", "run_all", "plain_list")

Runner = Callable[[], Awaitable[None]]
ZeroArg = Callable[[], Awaitable[None]]
Json = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    tasks: int
    rounds: int
    rate_seconds: float
    memory_items: int
    wait_items: int


FULL = Sizes(tasks=50_000, rounds=3, rate_seconds=1.0, memory_items=10**6, wait_items=50_000)
QUICK = Sizes(tasks=5_000, rounds=3, rate_seconds=0.1, memory_items=10**5, wait_items=5_000)


def progress(message: str) -> None:
    """Say what is running, on stderr so that stdout holds only the report."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- workloads


async def noop(x: int) -> None:
    """The task of the overhead runs: nothing at all."""


async def noop0() -> None:
    """The zero-argument no-op of run_all and the one winner of run_any."""


class Miss(Exception):
    """The cheap failure of the run_any functions that must not win."""


async def miss() -> None:
    raise Miss


async def identity(x: int) -> int:
    return x


def numbers(count: int) -> Iterator[int]:
    """The memory probes' items: a generator, so that nobody knows its length in advance."""
    yield from range(count)


def identity_calls(count: int) -> Iterator[Callable[[], Awaitable[int]]]:
    for x in range(count):
        yield functools.partial(identity, x)


# --------------------------------------------------------------------------- 1. overhead


async def ours_run_on_each(n: int, limit: int | None) -> None:
    await aiometer.run_on_each(noop, range(n), max_at_once=limit)


async def ours_run_all(fns: list[ZeroArg], limit: int | None) -> None:
    await aiometer.run_all(fns, max_at_once=limit)


async def ours_amap(n: int, limit: int | None) -> None:
    async with aiometer.amap(noop, range(n), max_at_once=limit) as results:
        async for _ in results:
            pass


async def ours_run_any(fns: list[ZeroArg], limit: int | None) -> None:
    await aiometer.run_any(fns, max_at_once=limit)


async def floor_capped(n: int) -> None:
    limiter = anyio.CapacityLimiter(CAP)

    async def task(x: int) -> None:
        async with limiter:
            await noop(x)

    async with anyio.create_task_group() as tg:
        for x in range(n):
            tg.start_soon(task, x)


async def floor_unbounded(n: int) -> None:
    async with anyio.create_task_group() as tg:
        for x in range(n):
            tg.start_soon(noop, x)


async def floor_catching(fns: list[ZeroArg]) -> None:
    """run_any's unbounded floor: spawn every call and keep each failure, as run_any must."""
    errors: dict[int, Exception] = {}

    async def call(index: int, fn: ZeroArg) -> None:
        try:
            await fn()
        except Exception as exc:
            errors[index] = exc

    async with anyio.create_task_group() as tg:
        for index, fn in enumerate(fns):
            tg.start_soon(call, index, fn)


def floor_of(mode: str, function: str) -> str:
    """The name of the floor *function* is compared with in *mode*."""
    return "catching floor" if mode == "unbounded" and function == "run_any" else "floor"


async def seconds_per_task(run: Runner, n: int) -> float:
    gc.collect()
    start = time.perf_counter()
    await run()
    return (time.perf_counter() - start) / n


async def overhead_round(n: int, round_index: int) -> dict[str, float]:
    """Time every case once on the running backend.

    Returns seconds per task keyed by ``"mode/case"``, *case* being a function name or the name
    of a floor. Each floor is timed next to the functions compared with it: first in even
    rounds, last in odd ones, the functions rotating from round to round.
    """
    all_succeed: list[ZeroArg] = [noop0] * n
    last_succeeds: list[ZeroArg] = [miss] * (n - 1)
    last_succeeds.append(noop0)
    seconds: dict[str, float] = {}
    for mode, limit in (("capped", CAP), ("unbounded", None)):
        runners: dict[str, Runner] = {
            "run_on_each": functools.partial(ours_run_on_each, n, limit),
            "run_all": functools.partial(ours_run_all, all_succeed, limit),
            "amap": functools.partial(ours_amap, n, limit),
            "run_any": functools.partial(ours_run_any, last_succeeds, limit),
            "floor": functools.partial(floor_unbounded if limit is None else floor_capped, n),
            "catching floor": functools.partial(floor_catching, last_succeeds),
        }
        groups: dict[str, list[str]] = defaultdict(list)
        for function in FUNCTIONS:
            groups[floor_of(mode, function)].append(function)
        for floor, functions in groups.items():
            turn = round_index % len(functions)
            plan = functions[turn:] + functions[:turn]
            if round_index % 2 == 0:
                plan.insert(0, floor)
            else:
                plan.append(floor)
            for case in plan:
                seconds[f"{mode}/{case}"] = await seconds_per_task(runners[case], n)
    return seconds


def sample_rounds(
    label: str,
    one_round: Callable[[int, int], Awaitable[dict[str, float]]],
    n: int,
    rounds: int,
    backends: Sequence[str],
) -> dict[tuple[str, str], list[float]]:
    """Run *one_round(n, round_index)* *rounds* times on every backend, alternating the order of
    the backends from round to round; return every sample by ``(backend, key)``."""
    samples: dict[tuple[str, str], list[float]] = defaultdict(list)
    for round_index in range(rounds):
        order = backends if round_index % 2 == 0 else list(reversed(backends))
        for backend in order:
            progress(f"{label} round {round_index + 1}/{rounds} on {backend}")
            got = anyio.run(one_round, n, round_index, backend=backend)
            for key, value in got.items():
                samples[backend, key].append(value)
    return samples


def measure_overhead(sizes: Sizes, backends: Sequence[str]) -> list[Json]:
    samples = sample_rounds("overhead", overhead_round, sizes.tasks, sizes.rounds, backends)

    rows: list[Json] = []
    for backend in backends:
        for mode, target in (("capped", CAPPED_TARGET), ("unbounded", UNBOUNDED_TARGET)):
            for function in FUNCTIONS:
                floor_case = floor_of(mode, function)
                ours = samples[backend, f"{mode}/{function}"]
                floor = samples[backend, f"{mode}/{floor_case}"]
                per_round = [o / f for o, f in zip(ours, floor, strict=True)]
                ratio = statistics.median(ours) / statistics.median(floor)
                rows.append(
                    {
                        "backend": backend,
                        "mode": mode,
                        "function": function,
                        "floor": floor_case,
                        "ours_us": statistics.median(ours) * 1e6,
                        "floor_us": statistics.median(floor) * 1e6,
                        "ratio": ratio,
                        "per_round_ratio_min": min(per_round),
                        "per_round_ratio_max": max(per_round),
                        "target": target,
                        "passed": ratio <= target,
                        "ours_us_samples": [s * 1e6 for s in ours],
                        "floor_us_samples": [s * 1e6 for s in floor],
                    }
                )
    return rows


# --------------------------------------------------------------------------- 2. rate


def max_in_window(times: Sequence[float], width: float) -> int:
    """The most *times* that fall in one closed window ``[t, t + width]``."""
    ordered = sorted(times)
    best = 0
    first = 0
    for last, end in enumerate(ordered):
        while end - ordered[first] > width:
            first += 1
        best = max(best, last - first + 1)
    return best


def rate_bound(rate: float, burst: int, width: float) -> int:
    """The documented most starts in a window of *width*: ``b + rate * w + 1``, and above
    1000/s ``b + rate * (w + 0.002)``. The small epsilon keeps ``rate * (1 / rate)`` from
    rounding down to just below 1."""
    extra = rate * FAST_CATCH_UP if rate > FAST_RATE else 1.0
    return math.floor(burst + rate * width + extra + 1e-9)


async def rate_case(path: str, rate: float, burst: int, seconds: float) -> Json:
    n = burst + max(1, round(rate * seconds))
    starts: list[float] = []

    async def record(_: int) -> None:
        starts.append(anyio.current_time())

    gc.collect()
    called = anyio.current_time()
    if path == "pool":
        limiter = aiometer.RateLimiter(rate, burst=burst)
        await aiometer.run_on_each(record, range(n), max_at_once=RATE_WORKERS, limiter=limiter)
    else:
        await aiometer.run_on_each(record, range(n), max_per_second=rate)
    achieved = (n - burst) / (max(starts) - called)
    windows: list[Json] = []
    for label, width in (("1/rate", 1.0 / rate), ("0.1 s", 0.1), ("1 s", 1.0)):
        seen = max_in_window(starts, width)
        bound = rate_bound(rate, burst, width)
        windows.append(
            {
                "window": label,
                "width_s": width,
                "max_seen": seen,
                "bound": bound,
                "ok": seen <= bound,
            }
        )
    return {
        "path": path,
        "rate": rate,
        "burst": burst,
        "n": n,
        "achieved": achieved,
        "ratio": achieved / rate,
        "windows": windows,
    }


async def rate_cases(seconds: float) -> list[Json]:
    return [await rate_case(path, rate, burst, seconds) for path, rate, burst in RATE_CASES]


def measure_rate(sizes: Sizes, backends: Sequence[str]) -> list[Json]:
    rows: list[Json] = []
    for backend in backends:
        progress(f"rate on {backend}")
        for row in anyio.run(rate_cases, sizes.rate_seconds, backend=backend):
            target = (row["path"], row["rate"], row["burst"]) in RATE_TARGET_CASES
            rows.append(
                {
                    "backend": backend,
                    **row,
                    "target": RATE_TARGET if target else None,
                    "passed": row["ratio"] >= RATE_TARGET if target else None,
                }
            )
    return rows


# --------------------------------------------------------------------------- 5. costs and windows

COST_WINDOW = aiometer.Rate(40, per=0.25)
"""The window of the cost check: random costs 1-8 through run_on_each must keep to it."""
COST_CHECK_SECONDS = 1.0
HUGE = 10**12
"""Limits that never make an acquisition wait: the cost rows measure bookkeeping only."""
COST_PATHS = (
    "RateLimiter(10**9): acquire() (reference)",
    "RateLimiter(10**9): acquire(cost=2.5)",
    "+ rates=[Rate(per=1, calls), Rate(per=60)]: acquire(cost=2.5)",
    "+ the same, then permit.settle(1.5)",
)


def cost_limiter(path: int) -> aiometer.RateLimiter:
    if path < 2:
        return aiometer.RateLimiter(10**9, burst=10**6)
    rates = [aiometer.Rate(HUGE, per=1, counts="calls"), aiometer.Rate(HUGE, per=60)]
    return aiometer.RateLimiter(10**9, burst=10**6, rates=rates)


async def seconds_per_acquisition(path: int, n: int) -> float:
    limiter = cost_limiter(path)
    cost = 1 if path == 0 else 2.5
    settle = path == 3
    gc.collect()
    began = time.perf_counter()
    for _ in range(n):
        permit = await limiter.acquire(cost)
        if settle:
            await permit.settle(1.5)
        await permit.release()
    return (time.perf_counter() - began) / n


async def costs_round(n: int, round_index: int) -> dict[str, float]:
    order = range(len(COST_PATHS)) if round_index % 2 == 0 else reversed(range(len(COST_PATHS)))
    return {COST_PATHS[path]: await seconds_per_acquisition(path, n) for path in order}


async def cost_window_check(seconds: float) -> Json:
    """Random costs through run_on_each(cost=...) against one window, checked from the recorded
    starts (which trail the reserved ones by the loop's latency: the window checked is 5 ms
    shorter)."""
    limiter = aiometer.RateLimiter(rates=[COST_WINDOW])
    costs = [1 + (i * 7919) % 8 for i in range(round(COST_WINDOW.limit / 4.5 * seconds / 0.25))]
    starts: list[tuple[float, int]] = []

    async def record(cost: int) -> None:
        starts.append((anyio.current_time(), cost))

    await aiometer.run_on_each(record, costs, max_at_once=50, limiter=limiter, cost=float)
    starts.sort()
    width = COST_WINDOW.per - 0.005
    most = 0
    for i, (start, _) in enumerate(starts):
        most = max(most, sum(c for t, c in starts[i:] if t <= start + width))
    return {"calls": len(starts), "units": sum(costs), "most_in_window": most}


def measure_costs(sizes: Sizes, backends: Sequence[str]) -> list[Json]:
    n = sizes.wait_items
    samples = sample_rounds("costs", costs_round, n, sizes.rounds, backends)
    rows: list[Json] = []
    for backend in backends:
        reference = statistics.median(samples[backend, COST_PATHS[0]])
        for path in COST_PATHS:
            us = statistics.median(samples[backend, path])
            rows.append({"backend": backend, "path": path, "us": us * 1e6, "ratio": us / reference})
        progress(f"costs window check on {backend}")
        check = anyio.run(cost_window_check, COST_CHECK_SECONDS, backend=backend)
        rows.append(
            {
                "backend": backend,
                "path": f"window check {COST_WINDOW!r}",
                **check,
                "limit": COST_WINDOW.limit,
                "passed": check["most_in_window"] <= COST_WINDOW.limit,
            }
        )
    return rows


def costs_table(rows: Sequence[Json]) -> str:
    cells = [
        [row["backend"], row["path"], f"{row['us']:.2f}", f"{row['ratio']:.2f}x"]
        for row in rows
        if "us" in row
    ]
    table = render_table(["backend", "acquisition", "us each", "vs reference"], cells, "llrr")
    checks = [
        f"   {row['backend']}: {row['calls']} calls, {row['units']} units, at most "
        f"{row['most_in_window']:g} units started in any {COST_WINDOW.per:g} s (limit "
        f"{row['limit']:g})"
        for row in rows
        if "most_in_window" in row
    ]
    return "\n".join([table, *checks])


# --------------------------------------------------------------------------- 4. waiting paths


async def sleep0(x: int) -> None:
    """A task that holds its slot across one checkpoint."""
    await anyio.lowlevel.checkpoint()


async def consume(results: Any, slow: bool) -> None:
    checkpoint = anyio.lowlevel.checkpoint
    if slow:
        async for _ in results:
            await checkpoint()
            await checkpoint()
    else:
        async for _ in results:
            pass


async def consumer_alone(n: int, k: int) -> None:
    """The slow consumer's own work, two checkpoints per item, with nothing else running."""
    checkpoint = anyio.lowlevel.checkpoint
    for _ in range(n):
        await checkpoint()
        await checkpoint()


async def path_amap(n: int, k: int, *, ordered: bool, slow: bool) -> None:
    async with aiometer.amap(noop, range(n), max_at_once=k, ordered=ordered) as results:
        await consume(results, slow)


async def path_per_item_limiter(n: int, k: int) -> None:
    sites = [aiometer.ConcurrencyLimiter(1) for _ in range(4)]

    def site_of(x: int) -> aiometer.ConcurrencyLimiter:
        return sites[x % 4]

    await aiometer.run_on_each(sleep0, range(n), max_at_once=k, limiter=site_of)


async def path_concurrency_limiter(n: int, k: int) -> None:
    limiter = aiometer.ConcurrencyLimiter(max(k // 2, 1))
    await aiometer.run_on_each(sleep0, range(n), max_at_once=k, limiter=limiter)


async def path_rate_limiter(n: int, k: int) -> None:
    limiter = aiometer.RateLimiter(10**6)
    await aiometer.run_on_each(sleep0, range(n), max_at_once=k, limiter=limiter)


WAIT_PATHS: dict[str, Callable[[int, int], Awaitable[None]]] = {
    "amap, fast consumer": functools.partial(path_amap, ordered=False, slow=False),
    "amap, slow consumer": functools.partial(path_amap, ordered=False, slow=True),
    "ordered amap, fast consumer": functools.partial(path_amap, ordered=True, slow=False),
    "ordered amap, slow consumer": functools.partial(path_amap, ordered=True, slow=True),
    "limiter=f(item), 4 x ConcurrencyLimiter(1)": path_per_item_limiter,
    "limiter=ConcurrencyLimiter(max_at_once // 2)": path_concurrency_limiter,
    "limiter=RateLimiter(10**6)": path_rate_limiter,
}
CONSUMER_ALONE = "slow consumer alone (2 checkpoints/item)"
"""A floor, not a path: what the slow consumer's own awaits cost."""
REFERENCE_PATHS = ("amap, fast consumer", "ordered amap, fast consumer")
"""Baselines of the slow-consumer target, not judged on growth (see the module docstring)."""
SLOW_VS_FAST = (
    ("amap, slow consumer", "amap, fast consumer"),
    ("ordered amap, slow consumer", "ordered amap, fast consumer"),
)


async def waiting_round(n: int, round_index: int) -> dict[str, float]:
    """Seconds per item of every waiting path at every max_at_once, on the running backend."""
    names = list(WAIT_PATHS)
    turn = round_index % len(names)
    seconds: dict[str, float] = {}
    for name in names[turn:] + names[:turn]:
        for k in WAIT_SIZES:
            run = functools.partial(WAIT_PATHS[name], n, k)
            seconds[f"{name}/{k}"] = await seconds_per_task(run, n)
    seconds[CONSUMER_ALONE] = await seconds_per_task(functools.partial(consumer_alone, n, 0), n)
    return seconds


def measure_waiting(sizes: Sizes, backends: Sequence[str]) -> list[Json]:
    samples = sample_rounds(
        "waiting paths", waiting_round, sizes.wait_items, sizes.rounds, backends
    )
    rows: list[Json] = []
    for backend in backends:
        consumer_us = statistics.median(samples[backend, CONSUMER_ALONE]) * 1e6
        for name in WAIT_PATHS:
            us = {k: statistics.median(samples[backend, f"{name}/{k}"]) * 1e6 for k in WAIT_SIZES}
            growth = us[WAIT_SIZES[-1]] / us[WAIT_SIZES[0]]
            judged = name not in REFERENCE_PATHS
            rows.append(
                {
                    "backend": backend,
                    "path": name,
                    "us_per_item": {str(k): value for k, value in us.items()},
                    "growth": growth,
                    "target": WAIT_GROWTH_TARGET if judged else None,
                    "passed": growth <= WAIT_GROWTH_TARGET if judged else None,
                    "consumer_alone_us": consumer_us,
                    "us_samples": {
                        str(k): [x * 1e6 for x in samples[backend, f"{name}/{k}"]]
                        for k in WAIT_SIZES
                    },
                }
            )
    return rows


def slow_consumer_rows(waiting: Sequence[Json]) -> list[Json]:
    by_path = {(row["backend"], row["path"]): row for row in waiting}
    rows: list[Json] = []
    for backend in dict.fromkeys(row["backend"] for row in waiting):
        for slow, fast in SLOW_VS_FAST:
            for k in WAIT_SIZES:
                slow_us = by_path[backend, slow]["us_per_item"][str(k)]
                fast_us = by_path[backend, fast]["us_per_item"][str(k)]
                consumer_us = by_path[backend, slow]["consumer_alone_us"]
                # What the workers pay for a slow consumer: the difference from a fast one,
                # less the consumer's own two checkpoints per item.
                extra = slow_us - fast_us - consumer_us
                rows.append(
                    {
                        "backend": backend,
                        "path": slow,
                        "max_at_once": k,
                        "slow_us": slow_us,
                        "fast_us": fast_us,
                        "consumer_alone_us": consumer_us,
                        "extra_us": extra,
                        "target": SLOW_CONSUMER_TARGET_US,
                        "passed": extra <= SLOW_CONSUMER_TARGET_US,
                    }
                )
    return rows


def waiting_table(rows: Sequence[Json]) -> str:
    body = [
        [
            row["backend"],
            row["path"],
            *(f"{row['us_per_item'][str(k)]:.2f}" for k in WAIT_SIZES),
            f"{row['growth']:.2f}x",
            "(reference)" if row["target"] is None else f"<= {row['target']:.1f}x",
            verdict(row["passed"]),
        ]
        for row in rows
    ]
    headers = [
        "backend",
        "path",
        *(f"us/item @{k}" for k in WAIT_SIZES),
        f"@{WAIT_SIZES[-1]} / @{WAIT_SIZES[0]}",
        "target",
        "",
    ]
    return render_table(headers, body, "llrrrrll")


def slow_consumer_table(rows: Sequence[Json]) -> str:
    body = [
        [
            row["backend"],
            row["path"],
            str(row["max_at_once"]),
            f"{row['slow_us']:.2f}",
            f"{row['fast_us']:.2f}",
            f"{row['consumer_alone_us']:.2f}",
            f"{row['extra_us']:+.2f}",
            f"<= {row['target']:.1f}",
            verdict(row["passed"]),
        ]
        for row in rows
    ]
    headers = [
        "backend",
        "path",
        "max_at_once",
        "slow us/item",
        "fast",
        "consumer alone",
        "workers' extra",
        "target",
        "",
    ]
    return render_table(headers, body, "llrrrrrll")


# --------------------------------------------------------------------------- 3. memory


def peak_rss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS


def image_peak_kib() -> int | None:
    """The peak RSS of this process image alone (Linux's VmHWM), or None where unknown.

    Unlike ``ru_maxrss`` it does not carry over the peak of the process that exec'd us.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


async def probe_amap(count: int) -> object:
    async with aiometer.amap(identity, numbers(count), max_at_once=CAP) as results:
        async for _ in results:
            pass
    return None


async def probe_run_on_each(count: int) -> object:
    await aiometer.run_on_each(identity, numbers(count), max_at_once=CAP)
    return None


async def probe_run_all(count: int) -> object:
    return await aiometer.run_all(identity_calls(count), max_at_once=CAP)


async def probe_plain_list(count: int) -> object:
    # The baseline is, literally, the list a comprehension over the same values builds.
    return [x for x in numbers(count)]  # noqa: C416


PROBE_FUNCTIONS: dict[str, Callable[[int], Awaitable[object]]] = {
    "amap": probe_amap,
    "run_on_each": probe_run_on_each,
    "run_all": probe_run_all,
    "plain_list": probe_plain_list,
}


def memory_probe(name: str, backend: str, count: int) -> Json:
    """Run one probe in this (fresh) process and measure its peak RSS growth."""

    async def probe() -> Json:
        image_before = image_peak_kib()
        before = peak_rss_kib()
        start = time.perf_counter()
        kept = await PROBE_FUNCTIONS[name](count)
        elapsed = time.perf_counter() - start
        after = peak_rss_kib()
        return {
            "before_kib": before,
            "after_kib": after,
            "growth_kib": after - before,
            "seconds": elapsed,
            "kept_result": kept is not None,
            # ru_maxrss before the run above this image's own peak means that it still holds
            # the parent's peak, which would hide part of the growth.
            "inherited_peak": image_before is not None and before > image_before,
        }

    return anyio.run(probe, backend=backend)


def run_probe(name: str, backend: str, items: int, quick: bool) -> Json:
    """Run one memory probe in a fresh interpreter and return its report."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, backend]
    if quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    row: Json = {"backend": backend, "probe": name, "items": items}
    if done.returncode == 0:
        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
        row["growth_mib"] = row["growth_kib"] / 1024
    else:
        row["error"] = done.stderr.strip().splitlines()[-1:] or ["no output"]
        row["growth_mib"] = None
    return row


def judge_memory(row: Json, plain_mib: float | None) -> None:
    """Add the comparison with the plain list and the verdict to a probe's *row*."""
    mib = row["growth_mib"]
    row["vs_plain_list"] = mib / plain_mib if mib is not None and plain_mib else None
    if row["probe"] in ("amap", "run_on_each"):
        row["target"] = f"< {STREAMING_TARGET_MIB:g} MiB"
        row["passed"] = mib is not None and mib < STREAMING_TARGET_MIB
    elif row["probe"] == "run_all":
        row["target"] = f"<= {RUN_ALL_TARGET:g}x plain list"
        ratio = row["vs_plain_list"]
        row["passed"] = ratio is not None and ratio <= RUN_ALL_TARGET
    else:
        row["target"] = None
        row["passed"] = None


def measure_memory(sizes: Sizes, quick: bool, backends: Sequence[str]) -> list[Json]:
    """Run every probe in a fresh interpreter; call this before anything else grows us.

    Linux keeps a process's ``ru_maxrss`` across execve and subprocess starts children with
    vfork, so a child starts out with *this* process's peak as its own: probes started after
    the overhead runs (which peak at well over 100 MiB) would report no growth at all.

    The probes run one per CPU at a time: RSS does not depend on how busy the CPUs are, and
    this halves the wall time of the section.
    """
    progress(f"memory probes ({len(backends) * len(PROBES)} processes)")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        running = [
            pool.submit(run_probe, name, backend, sizes.memory_items, quick)
            for backend in backends
            for name in PROBES
        ]
        rows = [probe.result() for probe in running]
    for backend in backends:
        plain = next(r for r in rows if r["backend"] == backend and r["probe"] == "plain_list")
        for row in rows:
            if row["backend"] == backend:
                judge_memory(row, plain["growth_mib"])
    return rows


# --------------------------------------------------------------------------- report


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """Plain-text table; *align* holds one ``l`` or ``r`` per column."""
    widths = [
        max([len(header)] + [len(row[i]) for row in rows]) for i, header in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.ljust(width) if side == "l" else cell.rjust(width)
            for cell, width, side in zip(cells, widths, align, strict=True)
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def wrapped(note: str) -> str:
    return textwrap.fill(note, width=100, initial_indent="   note: ", subsequent_indent=" " * 9)


def verdict(passed: bool | None) -> str:
    return "" if passed is None else ("PASS" if passed else "FAIL")


def overhead_table(rows: Sequence[Json]) -> str:
    body = [
        [
            row["backend"],
            row["mode"],
            row["function"],
            row["floor"],
            f"{row['ours_us']:.2f}",
            f"{row['floor_us']:.2f}",
            f"{row['ratio']:.3f}",
            f"{row['per_round_ratio_min']:.3f}-{row['per_round_ratio_max']:.3f}",
            f"<= {row['target']:.2f}",
            verdict(row["passed"]),
        ]
        for row in rows
    ]
    headers = [
        "backend",
        "mode",
        "function",
        "against",
        "ours us/task",
        "floor us/task",
        "ratio",
        "per-round",
        "target",
        "",
    ]
    return render_table(headers, body, "llllrrrrll")


def rate_table(rows: Sequence[Json]) -> str:
    body = []
    for row in rows:
        windows = [
            f"{w['max_seen']}/{w['bound']}" + ("" if w["ok"] else " OVER") for w in row["windows"]
        ]
        target = "" if row["target"] is None else f">= {row['target']:.2f}"
        body.append(
            [
                row["backend"],
                row["path"],
                f"{row['rate']:g}",
                str(row["burst"]),
                str(row["n"]),
                f"{row['achieved']:.1f}",
                f"{row['ratio']:.3f}",
                *windows,
                target,
                verdict(row["passed"]),
            ]
        )
    headers = [
        "backend",
        "path",
        "rate/s",
        "burst",
        "n",
        "achieved/s",
        "ratio",
        "w=1/rate",
        "w=0.1 s",
        "w=1 s",
        "target",
        "",
    ]
    return render_table(headers, body, "llrrrrrrrrll")


def memory_table(rows: Sequence[Json]) -> str:
    def number(row: Json, key: str, spec: str) -> str:
        if "error" in row:
            return "error"
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    body = [
        [
            row["backend"],
            row["probe"],
            str(row["items"]),
            number(row, "growth_mib", ".1f"),
            number(row, "vs_plain_list", ".2f"),
            number(row, "seconds", ".1f"),
            row["target"] or "(baseline)",
            verdict(row["passed"]) + (" (inherited peak!)" if row.get("inherited_peak") else ""),
        ]
        for row in rows
    ]
    headers = ["backend", "probe", "items", "peak growth MiB", "vs list", "seconds", "target", ""]
    return render_table(headers, body, "llrrrrll")


def collect_targets(
    overhead: Sequence[Json],
    rate: Sequence[Json],
    memory: Sequence[Json],
    waiting: Sequence[Json],
    slow: Sequence[Json],
) -> list[Json]:
    targets: list[Json] = []
    for row in waiting:
        if row["passed"] is None:
            continue
        targets.append(
            {
                "name": f"{row['backend']} waiting path {row['path']}",
                "value": f"{row['growth']:.2f}x (us/item @{WAIT_SIZES[-1]} / @{WAIT_SIZES[0]})",
                "limit": f"<= {row['target']:.1f}x",
                "passed": row["passed"],
            }
        )
    for row in slow:
        targets.append(
            {
                "name": f"{row['backend']} {row['path']} @{row['max_at_once']} vs fast consumer",
                "value": f"{row['extra_us']:+.2f} us/item beyond the consumer's own awaits",
                "limit": f"<= {row['target']:.1f} us",
                "passed": row["passed"],
            }
        )
    for row in overhead:
        targets.append(
            {
                "name": f"{row['backend']} overhead {row['mode']} {row['function']}",
                "value": f"{row['ratio']:.3f}x floor",
                "limit": f"<= {row['target']:.2f}x",
                "passed": row["passed"],
            }
        )
    for row in rate:
        if row["target"] is not None:
            targets.append(
                {
                    "name": (
                        f"{row['backend']} rate {row['path']} {row['rate']:g}/s "
                        f"burst {row['burst']}"
                    ),
                    "value": f"{row['ratio']:.3f}x limit",
                    "limit": f">= {row['target']:.2f}x",
                    "passed": row["passed"],
                }
            )
    for backend in dict.fromkeys(row["backend"] for row in rate):
        windows = [w for row in rate if row["backend"] == backend for w in row["windows"]]
        over = sum(not w["ok"] for w in windows)
        targets.append(
            {
                "name": f"{backend} rate windows (a check: RateLimiter's documented bound)",
                "value": f"{over} of {len(windows)} windows over",
                "limit": "0 over",
                "passed": over == 0,
            }
        )
    for row in memory:
        if row["passed"] is not None:
            value = row["growth_mib"]
            shown = "error" if value is None else f"{value:.1f} MiB"
            if row["probe"] == "run_all" and row["vs_plain_list"] is not None:
                shown += f" = {row['vs_plain_list']:.2f}x plain list"
            targets.append(
                {
                    "name": f"{row['backend']} memory {row['probe']}",
                    "value": shown,
                    "limit": row["target"],
                    "passed": row["passed"],
                }
            )
    return targets


def rounded(value: Any) -> Any:
    """*value* with every float cut to six significant digits, for a readable document."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item) for item in value]
    return value


def format_json(document: Json) -> str:
    """*document* as JSON with one top-level key per line, or one item per line for long lists."""
    lines = []
    for key, value in rounded(document).items():
        if isinstance(value, list) and len(json.dumps(value)) > 100:
            rows = ",\n".join(f"    {json.dumps(row)}" for row in value)
            lines.append(f"  {json.dumps(key)}: [\n{rows}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}"


def available_backends() -> list[str]:
    backends = ["asyncio"]
    if importlib.util.find_spec("trio") is not None:
        backends.append("trio")
    else:
        progress("trio is not installed: measuring asyncio only")
    return backends


def versions() -> Json:
    found: Json = {"python": platform.python_version(), "aiometer": aiometer.__version__}
    for package in ("anyio", "trio"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


NOTES = [
    "run_any stops at its first success, so it is given n - 1 functions raising a cheap "
    "exception and one last succeeding function, which makes it run all n. Capped, it shares "
    "the capped floor; unbounded, it is compared with a catching floor that does the same "
    "try/except/keep work in every spawned task.",
    "run_all gets a list of n times the same zero-argument no-op and shares the plain floor.",
    "Times are medians over interleaved rounds; ratio = median(ours) / median(floor).",
    "Memory probes run first, while the parent is small: a child's ru_maxrss starts at its "
    "parent's peak.",
    "No-op tasks (sleep(0) where a slot must stay held across a checkpoint). A slow consumer "
    "awaits two checkpoints per result, so the result buffer fills and backpressure binds. "
    "Where several tasks wait for one condition, a freed place must wake one of them: the cost "
    "per item must not grow with max_at_once.",
]


SECTIONS = ("overhead", "rate", "memory", "waiting", "costs")


def run_benchmarks(quick: bool, json_path: Path | None, sections: Sequence[str] = SECTIONS) -> None:
    sizes = QUICK if quick else FULL
    backends = available_backends()
    began = time.perf_counter()
    # Memory first: see its docstring.
    memory = measure_memory(sizes, quick, backends) if "memory" in sections else []
    overhead = measure_overhead(sizes, backends) if "overhead" in sections else []
    rate = measure_rate(sizes, backends) if "rate" in sections else []
    waiting = measure_waiting(sizes, backends) if "waiting" in sections else []
    costs = measure_costs(sizes, backends) if "costs" in sections else []
    slow = slow_consumer_rows(waiting)
    targets = collect_targets(overhead, rate, memory, waiting, slow)
    for row in costs:
        if "passed" in row:
            targets.append(
                {
                    "name": f"{row['backend']} costs {row['path']}",
                    "value": f"at most {row['most_in_window']:g} units in a window",
                    "limit": f"<= {row['limit']:g}",
                    "passed": row["passed"],
                }
            )
    total = time.perf_counter() - began

    print(f"aiometer core benchmarks ({'quick' if quick else 'full'} mode)")
    print(", ".join(f"{name} {version}" for name, version in versions().items()))
    print(f"{platform.platform()}, {os.cpu_count()} CPUs")
    print()
    print(f"1. Per-task overhead, {sizes.tasks} no-op tasks, median of {sizes.rounds} rounds")
    print(f"   capped: max_at_once={CAP} vs task group + one anyio.CapacityLimiter({CAP})")
    print("   unbounded: no limit vs task group + tg.start_soon(noop, x)")
    for note in NOTES[:3]:
        print(wrapped(note))
    print()
    print(overhead_table(overhead))
    print()
    print(f"2. Rate accuracy, ~{sizes.rate_seconds:g} s per case")
    print(
        f"   path pool: run_on_each(max_at_once={RATE_WORKERS}, limiter=RateLimiter(rate, burst))"
    )
    print("   path alone: run_on_each(max_per_second=rate), no max_at_once")
    print(
        "   ratio = achieved / rate; w=...: most starts in any window / bound b + rate*w + 1"
        " (above 1000/s: b + rate*(w + 2 ms))"
    )
    print()
    print(rate_table(rate))
    print()
    print(
        f"3. Peak RSS growth, {sizes.memory_items} generated items, max_at_once={CAP}, "
        f"one fresh process each"
    )
    print(wrapped(NOTES[3]))
    print()
    print(memory_table(memory))
    print()
    print(
        f"4. Waiting paths, {sizes.wait_items} items, cost per item at max_at_once "
        f"{', '.join(map(str, WAIT_SIZES))}, median of {sizes.rounds} rounds"
    )
    print(wrapped(NOTES[4]))
    print()
    print(waiting_table(waiting))
    print()
    print(slow_consumer_table(slow))
    print()
    print(
        f"5. Costs and windows: {sizes.wait_items} acquisitions (never waiting) per row, median "
        f"of {sizes.rounds} rounds; then random costs 1-8 through run_on_each(cost=...) for "
        f"~{COST_CHECK_SECONDS:g} s against {COST_WINDOW!r}"
    )
    print()
    print(costs_table(costs))
    print()
    print(f"Summary ({total:.0f} s)")
    for target in targets:
        print(
            f"  {verdict(target['passed'])}  {target['name']}: {target['value']} "
            f"(target {target['limit']})"
        )
    print()

    document: Json = {
        "mode": "quick" if quick else "full",
        "sizes": {
            "tasks": sizes.tasks,
            "rounds": sizes.rounds,
            "rate_seconds": sizes.rate_seconds,
            "memory_items": sizes.memory_items,
            "wait_items": sizes.wait_items,
        },
        "versions": versions(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "backends": backends,
        "seconds": total,
        "notes": NOTES,
        "overhead": overhead,
        "rate": rate,
        "memory": memory,
        "waiting": waiting,
        "slow_consumer": slow,
        "costs": costs,
        "targets": targets,
        "passed": all(target["passed"] for target in targets),
    }
    text = format_json(document)
    if json_path is not None:
        json_path.write_text(text + "\n")
    print(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="~10x smaller sizes (smoke run)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the JSON here")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--memory-probe", nargs=2, metavar=("NAME", "BACKEND"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.memory_probe is not None:
        name, backend = args.memory_probe
        print(json.dumps(memory_probe(name, backend, sizes.memory_items)))
        return 0
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown section {unknown[0]!r}; choose from {SECTIONS}")
    run_benchmarks(args.quick, args.json, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
