"""RedisLimiter against raw Redis round trips, measured side by side in one run.

Run ``python bench/redis_limiter.py`` (about 3 minutes) or ``python bench/redis_limiter.py --quick``
(about 40 s); ``--json FILE`` also writes the final JSON document to FILE. The script starts its own
``redis-server`` on a free loopback port and re-invokes itself as a pool of worker processes
(hidden ``--worker`` argument) that start each measurement together at a shared wall-clock
time.
Every verdict is a ratio or a count from this run; absolute numbers are printed only to make
them readable, and move with whatever else the machine is doing.

1. Throughput. Each process runs 16 coroutines (asyncio, one ``redis.asyncio.Redis`` client
   per process) that loop on ``permit = await limiter.acquire(); await permit.release()`` for
   a fixed time; completions are counted. Limiters: *rate-only* (``max_per_second=1e9``, so
   nothing ever waits: the cost of one script call), *concurrency-only* (``max_at_once`` far
   above the number of coroutines: an acquire and a release script call per cycle) and
   *both*; starts reserved ahead (section 5) are switched off here. The same coroutines with
   the same client also loop on raw PING, and on a raw EVALSHA of ``acquire.lua`` with the
   rate-only limiter's keys and arguments (what one script call costs without the limiter's
   Python around it). The phases are interleaved in rounds
   and end with a PING phase, so a change in machine load hits all of them alike.
   ``ratio = acquisitions/s / PING/s``, with 1 and with 8 processes. The diagnostic columns
   give the client CPU per operation (process CPU time / completions) and, per process
   count, the redis-server time per PING and per EVALSHA from ``INFO commandstats``.
   Targets: rate-only >= 0.8, concurrency-only >= 0.4 (two round trips per cycle).
2. Redis commands per task under contention. 2 and 8 processes share one limiter with
   ``max_at_once=4``; each runs 8 workers doing 5 ms tasks inside ``limiter.slot()``, so most
   acquisitions queue and are woken through the mailbox. Each fleet size runs twice, side by
   side: *separate* is the scheme without swaps (``limiter._swap = False``: ``release()``
   awaits a release.lua call of its own) and *swap* the default one (a release rides with the
   same process's next acquire.lua call, and grants to the caller's own waiters come back in
   its reply instead of through the mailbox). ``INFO commandstats`` is read before and after
   each run with a separate client. *Round trips* are the client commands the limiter
   processes sent (EVALSHA, EVAL, BLPOP, anything else except the benchmark's own INFO, and
   the PINGs that go in front of swaps in the same write, so that Redis writes the grants
   they push before their replies: those share the round trip of their script call and are
   listed, per task, in the breakdown column);
   *in-script commands* are the ones the Lua scripts ran (the ``redis.call`` names found in
   ``lua/*.lua``); *server us* is the redis-server time of those round trips (the ``usec`` of
   commandstats, which for EVALSHA includes the commands its script ran). All per task. The
   split per script comes from counting calls in each worker's client adapter (``acquire+rel``:
   acquire calls that carried releases; ``releases only``: those of them with no acquisition).
   Targets: separate <= 4 round trips per task and never more than 3 at any fleet size (one
   acquire, one wake-up, one release); swap <= 1.5 round trips per task at both fleet sizes.
   Then the fleet of issue 16, each scheme in turn: 8 processes share ``max_at_once=10,
   max_per_second=200``, each running 16 workers on tasks of 10-50 ms (drawn uniformly), with
   the in-script commands per task by name for swap+push. Target: swap+push <= 12 in-script
   commands per task, with 8 processes here and in the fleet.
   Then, in one process, the engine path: ``aiometer.run_on_each`` with ``limiter=`` a
   ``max_at_once=4`` RedisLimiter, with a pool of 4 and 8 workers and without ``max_at_once``
   (a task spawned per item), 2 ms tasks: script calls per task for both schemes (does a
   finished task's release ride with the next task's acquisition?). Printed, not judged.
3. Handoff latency. Two processes ping-pong the only slot of a ``max_at_once=1`` limiter,
   holding it 3 ms so the other is always queued: the holder records ``time.time()`` just
   before ``release()``, the waiter right after ``acquire()`` returns. Measured for both
   schemes of section 2 (with swaps the holder's release rides with its next acquisition, and
   the freed slot is posted to the other's mailbox). The schemes take turns, 25 rounds at a
   time, each on a limiter of its own entered for the whole section, so that a drift of the
   machine's speed weighs on all of them alike. The floor next to it is the same ping-pong
   over raw RPUSH / BLPOP between the same two processes.
   Targets: p50 <= 2 ms, and the p50 of swap and of swap+push (the default) each at most 1.1x
   the separate one's (+0.05 ms).
4. Costs and windows next to plain acquisitions. One process loops ``acquire(cost=c)`` +
   ``release()`` next to a PING loop, interleaved in rounds, with 16 coroutines (concurrent
   acquisitions share script calls) and again with 1 (one script call per acquisition, so the
   server time per call is the server time of one acquisition). Rows: a plain rate-only
   limiter (cost 1); the same with cost 7.5; two windows as an LLM API states them (tokens and
   requests per minute: ``Rate`` counting cost and ``Rate`` counting calls); three windows (1 s
   and 10 s counting cost, 10 s counting calls); three windows with ``max_per_second``; a plain
   ``max_at_once`` limiter and the same with three windows (an acquire and a release call per
   task); and a window that is full all the time (``Rate(400, per=0.25)``, costs 1 to 8:
   every reservation walks its log; tasks wait, so its rate is not comparable). Starts are not
   reserved ahead here (see 5), so every row makes one call per acquisition. Limits are out
   of reach elsewhere: the scripts pay for the window logs but nobody waits. Per task: EVALSHA
   calls (round trips), the redis-server time of those calls per task and per call, and the
   commands the scripts ran (``redis.call``), all from ``INFO commandstats`` read before and
   after each phase with a separate client. Target (1 coroutine, where the count is exact):
   every cost or window row makes at most 1.1x the script calls per task of its plain row.

5. Rate reservations, the old scheme and the new side by side. 8 processes share one rate-only
   limiter of 20,000 starts/s; each takes starts the way a run function called without
   ``max_at_once`` does (one coroutine: ``acquire()``, hand the permit to a task, ``acquire()``
   again). *old*: one script call per start (reservations ahead switched off); *new*: a call
   also reserves the next starts of the fleet for the same process (about 20 ms of its recent
   rate), handed out locally at their times; *local*: the same loop with no Redis at all, each
   process alone with an in-process ``RateLimiter`` of its eighth of the rate (the ceiling of
   this machine for the loop, with nothing shared: no lateness to read back). Per start:
   script calls (round trips), the commands the scripts ran, and the redis-server time, from
   ``INFO commandstats`` around each phase; the fraction of the rate reached, the starts
   reserved ahead that went unused, and how late each start began against its time in the
   fleet's schedule (read back from Redis, whose clock is the workers' on one machine; none
   may begin early).
   Targets (new): <= 0.3 script calls per start, >= 0.95 of the rate.

The 8-process rows run more processes than a small machine has cores, next to redis-server
itself: read the ratio, not the absolute rate. Each worker process freezes what it holds
before a section (``gc.freeze()``, see bench/_common.py), so a full collection of its earlier
objects does not stall it mid-phase. The exit status is 0 whatever the verdicts.
"""

from __future__ import annotations

import functools
import itertools
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import redis.asyncio

import aiometer
from aiometer import Rate
from aiometer_redis import RedisLimiter
from aiometer_redis._client import ScriptArg
from aiometer_redis._reserve import LATE
from aiometer_redis._scripts import Script

# Run as a script, this file's directory (bench/) is on sys.path, the repository root is not.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench._common import (
    _BLPOP_TIMEOUT_SECONDS,
    _FAST_RATE,
    _PHASE_GAP_SECONDS,
    Result,
    Spec,
    Worker,
    _CommandStats,
    _count_completions,
    _CountingClient,
    _cycle,
    _open_connections,
    _percentile,
    _Pool,
    _raw_acquire_call,
    _run_stages,
    _script_command_names,
    _section,
    _Settings,
    _Snapshot,
    _stage_result,
    _stage_start,
    _table,
    _timed_phases,
    _Verdict,
    _verdict,
    run,
)

_COROUTINES_PER_PROCESS = 16
_THROUGHPUT_PROCESSES = (1, 8)
_HIGH_MAX_AT_ONCE = 10_000
_PING = "PING"
_RAW_SCRIPT = "EVALSHA acquire.lua"
_LIMITER_PHASES = ("rate-only", "concurrency-only", "both")
_ROUND = (_PING, _RAW_SCRIPT, *_LIMITER_PHASES)
_CONTENTION_PROCESSES = (2, 8)
_CONTENTION_MAX_AT_ONCE = 4
_CONTENTION_WORKERS = 8
_CONTENTION_TASK_SECONDS = 0.005
# The fleet of issue 16: 8 processes share RedisLimiter(max_at_once=10, max_per_second=200),
# each running 16 workers on 10-50 ms tasks.
_FLEET_PROCESSES = 8
_FLEET_MAX_AT_ONCE = 10
_FLEET_MAX_PER_SECOND = 200.0
_FLEET_WORKERS = 16
_FLEET_TASK_SECONDS = (0.010, 0.050)
_TARGET_SCRIPT_COMMANDS_PER_TASK = 12.0
_CONTENTION_HEADERS = (
    "processes",
    "scheme",
    "tasks",
    "tasks/s",
    "round trips/task",
    "result",
    "client commands by name",
    "in-script cmds/task",
    "server us/task",
)
_HANDOFF_HOLD_SECONDS = 0.003
_TARGET_RATIOS = {"rate-only": 0.8, "concurrency-only": 0.4}
_TARGET_COMMANDS_PER_TASK = 4.0
_TARGET_SWAP_ROUND_TRIPS_PER_TASK = 1.5
# Sections 2 and 3 run each scheme: (label, RedisLimiter._swap, RedisLimiter._push).
_SCHEMES = (("separate", False, False), ("swap", True, False), ("swap+push", True, True))
# "Not growing with the fleet": every task costs at most one acquire call, one wake-up (BLPOP)
# and one release call whatever the number of processes; batching merges some of them, more so
# when fewer processes share the slots, so the measured count may rise towards this bound as
# processes are added, never past it.
_COMMANDS_BOUND_PER_TASK = 3.0
_TARGET_HANDOFF_P50_MS = 2.0
# Section 3 runs the schemes in turn, this many handoff rounds at a time.
_HANDOFF_BLOCK_ROUNDS = 25
_RESERVE_PROCESSES = 8
_RESERVE_RATES = (3_000.0, 20_000.0)
_RESERVE_TARGET_RATE = 20_000.0
_RESERVE_SCHEMES = ("old", "new", "local")
_TARGET_RESERVE_CALLS = 0.3
_TARGET_RESERVE_SHARE = 0.95


async def _throughput_worker(client: redis.asyncio.Redis, spec: Spec) -> None:
    prefix: str = spec["prefix"]
    coroutines: int = spec["coroutines"]
    async with AsyncExitStack() as stack:
        limiters = {
            "rate-only": RedisLimiter(client, f"{prefix}:rate", max_per_second=_FAST_RATE),
            "concurrency-only": RedisLimiter(
                client, f"{prefix}:concurrency", max_at_once=_HIGH_MAX_AT_ONCE
            ),
            "both": RedisLimiter(
                client, f"{prefix}:both", max_at_once=_HIGH_MAX_AT_ONCE, max_per_second=_FAST_RATE
            ),
        }
        # One script call per acquisition, as the section says (section 5 measures the starts a
        # rate-only limiter reserves ahead).
        limiters["rate-only"]._reserving = False
        operations: dict[str, Callable[[], Awaitable[object]]] = {
            _PING: client.ping,
            _RAW_SCRIPT: _raw_acquire_call(client, limiters["rate-only"]),
        }
        for phase, limiter in limiters.items():
            await stack.enter_async_context(limiter)
            operations[phase] = functools.partial(_cycle, limiter)
        for operation in operations.values():
            await operation()
        await _open_connections(client, coroutines + 2)

        async def measure(phase: str, begin: float, end: float) -> tuple[int, float]:
            return await _count_completions(operations[phase], begin, end, coroutines)

        result = await _timed_phases(spec, measure)
    _stage_result(result)


class _SwapCountingClient(_CountingClient):
    """Also counts the acquire calls that carry release items ('-<lease id>', after the
    header, whose entries never start with '-'): "acquire+rel", and among them "releases
    only" (no waiter item after them)."""

    async def run_script(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[ScriptArg],
        *,
        wake_first: bool = False,
    ) -> Any:
        if script.name == "acquire":
            items = [str(a) for a in args]
            first = next((i for i, a in enumerate(items) if a.startswith("-")), None)
            if first is not None:
                self.calls["acquire+rel"] += 1
                if all(a.startswith("-") for a in items[first:]):
                    self.calls["releases only"] += 1
        return await super().run_script(script, keys, args, wake_first=wake_first)


async def _contention_worker(client: redis.asyncio.Redis, spec: Spec) -> None:
    adapter = _SwapCountingClient(client)
    task_seconds: float = spec["task_seconds"]
    # A task lasts task_seconds plus up to this much more (uniformly drawn).
    spread: float = spec.get("task_spread", 0.0)
    todo = iter(range(spec["tasks"]))
    limiter = RedisLimiter(
        adapter,
        spec["name"],
        max_at_once=spec["max_at_once"],
        max_per_second=spec.get("max_per_second"),
    )
    limiter._swap = spec["swap"]
    limiter._push = spec["push"]  # before entering: it picks the process id
    async with limiter:

        async def work() -> None:
            for _ in todo:
                async with limiter.slot():
                    await anyio.sleep(task_seconds + random.uniform(0.0, spread))

        await _open_connections(client, spec["workers"] + 2)
        adapter.calls.clear()
        start = await _stage_start()
        async with anyio.create_task_group() as task_group:
            for _ in range(spec["workers"]):
                task_group.start_soon(work)
        seconds = time.time() - start
        calls = dict(adapter.calls)
    _stage_result({"calls": calls, "seconds": seconds})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _reserve_worker(client: redis.asyncio.Redis, spec: Spec) -> None:
    """One coroutine taking starts of a shared rate-only limiter, per phase (scheme); the
    reader (process 0) also reads INFO commandstats around each phase. After the last phase,
    each start taken is compared with its time in the fleet's schedule (read back from the
    grants the scripts remember): how late it began."""
    seconds: float = spec["seconds"]
    start = await _stage_start()
    counts: list[int] = []
    dropped: list[int] = []
    stats: list[Result] = []
    taken: list[tuple[str, list[tuple[str, float]]]] = []
    for index, (rate, scheme) in enumerate(spec["phases"]):
        begin = start + index * (seconds + _PHASE_GAP_SECONDS)
        end = begin + seconds
        starts: list[tuple[str, float]] = []
        if scheme == "local":
            # The machine's ceiling for this loop: each process alone with its share of the
            # rate in an in-process limiter (no Redis, nothing shared, nothing to compare).
            local = aiometer.RateLimiter(max_per_second=rate / _RESERVE_PROCESSES)
            async with anyio.create_task_group() as task_group:
                await anyio.sleep(max(0.0, begin - time.time()))
                before = await _CommandStats.read(client) if spec["reader"] else None
                count = 0
                while time.time() < end:
                    local_permit = await local.acquire()
                    count += 1
                    task_group.start_soon(local_permit.release)
            counts.append(count)
            dropped.append(0)
            taken.append(("", starts))
            if before is not None:
                after = await _CommandStats.read(client) - before
                stats.append({"calls": dict(after.calls), "usec": dict(after.usec)})
            continue
        limiter = RedisLimiter(client, f"{spec['prefix']}:{index}", max_per_second=rate)
        if scheme == "old":
            limiter._reserving = False  # the switch that restores the old scheme
        taken.append((limiter.keys[5], starts))
        async with limiter, anyio.create_task_group() as task_group:
            await anyio.sleep(max(0.0, begin - time.time()))
            before = await _CommandStats.read(client) if spec["reader"] else None
            while time.time() < end:
                permit = await limiter.acquire()
                starts.append((permit._waiter_id, time.time()))
                task_group.start_soon(permit.release)
            counts.append(len(starts))
            dropped.append(limiter._pool.dropped)
            if before is not None:
                after = await _CommandStats.read(client) - before
                stats.append({"calls": dict(after.calls), "usec": dict(after.usec)})
    late: list[list[float]] = []
    for grants_key, starts in taken:
        # One sample in ten is enough for percentiles.
        sample = starts[::10]
        if not sample:
            late.append([])
            continue
        grants = await client.hmget(grants_key, [waiter_id for waiter_id, _ in sample])
        late.append(
            [
                at - int(_text(grant).split("|")[1]) / 1e6
                for (_, at), grant in zip(sample, grants, strict=True)
                if grant is not None
            ]
        )
    _stage_result({"counts": counts, "dropped": dropped, "stats": stats, "late": late})


async def _handoff_worker(client: redis.asyncio.Redis, spec: Spec) -> None:
    """Ping-pong through one limiter per scheme, the schemes taking turns: one stage per
    block of rounds and scheme (so a drift of the machine's speed during the section weighs
    on every scheme alike). Last stage: the same over raw RPUSH / BLPOP."""
    role: int = spec["role"]
    rounds: int = spec["rounds"]
    await _open_connections(client, 3)
    async with AsyncExitStack() as stack:
        limiters: dict[str, RedisLimiter] = {}
        for scheme, swap, push in spec["schemes"]:
            limiter = RedisLimiter(client, f"{spec['name']}:{scheme}", max_at_once=1)
            limiter._swap = swap
            limiter._push = push
            limiters[scheme] = await stack.enter_async_context(limiter)
        for block_rounds in spec["blocks"]:
            for scheme, _, _ in spec["schemes"]:
                limiter = limiters[scheme]
                holds: list[tuple[float, float]] = []
                await _stage_start()
                for _ in range(block_rounds):
                    permit = await limiter.acquire()
                    acquired = time.time()
                    await anyio.sleep(_HANDOFF_HOLD_SECONDS)
                    released = time.time()
                    await permit.release()
                    holds.append((acquired, released))
                _stage_result({"holds": holds})

    inbox, outbox = f"{spec['name']}:raw:{role}", f"{spec['name']}:raw:{1 - role}"
    latencies: list[float] = []
    await _stage_start()
    if role == 0:
        await anyio.sleep(_HANDOFF_HOLD_SECONDS)
        await client.rpush(outbox, repr(time.time()))
    for _ in range(rounds):
        reply = await client.blpop([inbox], timeout=_BLPOP_TIMEOUT_SECONDS)
        received = time.time()
        if reply is None:
            raise RuntimeError(f"raw handoff: nothing in {inbox} for {_BLPOP_TIMEOUT_SECONDS} s")
        latencies.append(received - float(reply[1]))
        await anyio.sleep(_HANDOFF_HOLD_SECONDS)
        await client.rpush(outbox, repr(time.time()))
    _stage_result({"latencies": latencies})


async def _throughput(
    pool: _Pool,
    url: str,
    stats_client: redis.asyncio.Redis,
    settings: _Settings,
    verdicts: list[_Verdict],
) -> list[Result]:
    phases = [*(_ROUND * settings.rounds), _PING]
    _section(
        "1. Acquisitions per second vs PING round trips per second\n"
        f"{_COROUTINES_PER_PROCESS} coroutines per process; {settings.rounds} interleaved "
        f"round(s) of {settings.phase_seconds:g} s per phase.\n"
        "ratio = ops/s / PING/s of the same processes; range = lowest-highest round;\n"
        "CPU = client process CPU time per completed operation."
    )
    measured: list[Result] = []
    for processes in _THROUGHPUT_PROCESSES:
        spec = {
            "kind": "throughput",
            "url": url,
            "prefix": f"throughput-{processes}",
            "coroutines": _COROUTINES_PER_PROCESS,
            "seconds": settings.phase_seconds,
            "phases": phases,
        }
        snapshot = _Snapshot(stats_client)
        (results,) = await _run_stages(pool, [spec] * processes, before_start=snapshot)
        server = await _CommandStats.read(stats_client) - snapshot.stats
        rates: dict[str, list[float]] = {}
        cpu: Counter[str] = Counter()
        completions: Counter[str] = Counter()
        for index, phase in enumerate(phases):
            done = sum(result["counts"][index] for result in results)
            rates.setdefault(phase, []).append(done / settings.phase_seconds)
            completions[phase] += done
            cpu[phase] += sum(result["cpu"][index] for result in results)
        ping = sum(rates[_PING]) / len(rates[_PING])
        rows: list[list[str]] = []
        workloads: list[Result] = []
        for phase in (_PING, _RAW_SCRIPT, *_LIMITER_PHASES):
            rate = sum(rates[phase]) / len(rates[phase])
            ratio = rate / ping
            cpu_us = cpu[phase] / completions[phase] * 1e6
            target = _TARGET_RATIOS.get(phase)
            rows.append(
                [
                    phase,
                    f"{rate:,.0f}",
                    f"{min(rates[phase]):,.0f}-{max(rates[phase]):,.0f}",
                    f"{ratio:.2f}x",
                    f"{cpu_us:.0f}",
                    f">= {target:.1f}x" if target is not None else "",
                    _verdict(ratio >= target) if target is not None else "",
                ]
            )
            if target is not None:
                verdicts.append(
                    _Verdict(
                        f"{phase} acquire+release, {processes} process(es): >= {target:.1f}x PING",
                        f"{ratio:.2f}x",
                        ratio >= target,
                    )
                )
            workloads.append(
                {
                    "workload": phase,
                    "ops_per_second": rate,
                    "ops_per_second_by_round": rates[phase],
                    "ratio_to_ping": ratio,
                    "client_cpu_us_per_op": cpu_us,
                    "target_ratio": target,
                }
            )
        print(f"{processes} process(es):")
        headers = ["workload", "ops/s", "range", "ratio", "CPU us/op", "target", "result"]
        print(_table(headers, rows))
        print(
            f"redis-server time per call: PING {server.usec_per_call('ping'):.1f} us, "
            f"EVALSHA {server.usec_per_call('evalsha'):.1f} us (all script phases)\n"
        )
        measured.append(
            {
                "processes": processes,
                "ping_per_second": ping,
                "workloads": workloads,
                "server_usec_per_ping": server.usec_per_call("ping"),
                "server_usec_per_evalsha": server.usec_per_call("evalsha"),
            }
        )
    return measured


async def _contention(
    pool: _Pool,
    url: str,
    stats_client: redis.asyncio.Redis,
    settings: _Settings,
    verdicts: list[_Verdict],
) -> list[Result]:
    _section(
        f"2. Redis round trips per task: max_at_once={_CONTENTION_MAX_AT_ONCE}, "
        f"{_CONTENTION_WORKERS} workers per process, {_CONTENTION_TASK_SECONDS * 1000:g} ms "
        f"tasks, {settings.contention_tasks} tasks in all per run\n"
        "separate: each release its own call (limiter._swap = False); swap: a release rides "
        "with the next acquisition, wake-ups by BLPOP (limiter._push = False); swap+push: the "
        "same, wake-ups pushed over pub/sub (the default)\n"
        f"targets: separate <= {_TARGET_COMMANDS_PER_TASK:g} round trips per task; swap and "
        f"swap+push <= {_TARGET_SWAP_ROUND_TRIPS_PER_TASK:g} (SUBSCRIBE counted)"
    )
    in_script = _script_command_names()
    measured: list[Result] = []
    rows: list[list[str]] = []
    split_rows: list[list[str]] = []
    script_columns = [
        "acquire",
        "acquire+rel",
        "releases only",
        "release",
        "cancel",
        "renew",
        "blpop (message)",
        "blpop (timed out)",
    ]
    for processes in _CONTENTION_PROCESSES:
        for scheme, swap, push in _SCHEMES:
            tasks_each = settings.contention_tasks // processes
            spec = {
                "kind": "contention",
                "url": url,
                "name": f"contention-{processes}-{scheme}",
                "max_at_once": _CONTENTION_MAX_AT_ONCE,
                "workers": _CONTENTION_WORKERS,
                "tasks": tasks_each,
                "task_seconds": _CONTENTION_TASK_SECONDS,
                "swap": swap,
                "push": push,
            }
            result = await _contention_run(pool, stats_client, spec, processes, in_script)
            result["scheme"] = scheme
            client_per_task = result["client_commands_per_task"]
            target = _TARGET_SWAP_ROUND_TRIPS_PER_TASK if swap else _TARGET_COMMANDS_PER_TASK
            passed = client_per_task <= target
            verdicts.append(
                _Verdict(
                    f"round trips per task, {scheme}, {processes} processes: <= {target:g}",
                    f"{client_per_task:.2f}",
                    passed,
                )
            )
            rows.append([str(processes), scheme, *_contention_columns(result, passed)])
            split_rows.append(
                [str(processes), scheme]
                + [
                    f"{result['adapter_calls'].get(name, 0) / result['tasks']:.2f}"
                    for name in script_columns
                ]
            )
            measured.append(result)
    print(_table(_CONTENTION_HEADERS, rows))
    print("\nCalls per task counted in the workers' client adapter:\n")
    print(_table(["processes", "scheme", *script_columns], split_rows))
    separate = [r for r in measured if r["scheme"] == "separate"]
    worst = max(result["client_commands_per_task"] for result in separate)
    passed = worst <= _COMMANDS_BOUND_PER_TASK + 0.05
    verdicts.append(
        _Verdict(
            f"round trips per task, separate, {separate[0]['processes']} to "
            f"{separate[-1]['processes']} processes: <= {_COMMANDS_BOUND_PER_TASK:g} (one "
            "acquire, one wake-up, one release) at every fleet size",
            f"{worst:.2f}",
            passed,
        )
    )
    for processes in _CONTENTION_PROCESSES:
        old, new = (
            next(r for r in measured if r["processes"] == processes and r["scheme"] == scheme)
            for scheme in ("separate", "swap")
        )
        pushed = next(
            r for r in measured if r["processes"] == processes and r["scheme"] == "swap+push"
        )
        print(
            f"\n{processes} processes, swap vs separate: round trips per task "
            f"{new['client_commands_per_task']:.2f} vs {old['client_commands_per_task']:.2f}, "
            f"in-script commands {new['in_script_commands_per_task']:.1f} vs "
            f"{old['in_script_commands_per_task']:.1f}, server us "
            f"{new['server_usec_per_task']:.0f} vs {old['server_usec_per_task']:.0f}"
        )
        print(
            f"{processes} processes, swap+push vs swap: round trips per task "
            f"{pushed['client_commands_per_task']:.2f} vs {new['client_commands_per_task']:.2f}, "
            f"in-script commands {pushed['in_script_commands_per_task']:.1f} vs "
            f"{new['in_script_commands_per_task']:.1f}, server us "
            f"{pushed['server_usec_per_task']:.0f} vs {new['server_usec_per_task']:.0f}"
        )
    print(
        f"The most for separate is {worst:.2f} round trips per task (bound "
        f"{_COMMANDS_BOUND_PER_TASK:g}) {_verdict(passed)}"
    )
    measured.extend(await _fleet(pool, url, stats_client, settings, in_script))
    for result in measured:
        if result["scheme"] == "swap+push" and result["processes"] == max(_CONTENTION_PROCESSES):
            _script_commands_verdict(verdicts, result)
    measured.extend(await _engine_path(url))
    return measured


def _script_commands_verdict(verdicts: list[_Verdict], result: Result) -> None:
    where = result.get("workload", f"max_at_once={_CONTENTION_MAX_AT_ONCE}")
    passed = result["in_script_commands_per_task"] <= _TARGET_SCRIPT_COMMANDS_PER_TASK
    verdicts.append(
        _Verdict(
            f"commands per task inside the scripts, swap+push, {result['processes']} "
            f"processes, {where}: <= {_TARGET_SCRIPT_COMMANDS_PER_TASK:g}",
            f"{result['in_script_commands_per_task']:.1f}",
            passed,
        )
    )


async def _fleet(
    pool: _Pool,
    url: str,
    stats_client: redis.asyncio.Redis,
    settings: _Settings,
    in_script: frozenset[str],
) -> list[Result]:
    """The fleet of issue 16, each scheme of section 2 in turn."""
    low, high = _FLEET_TASK_SECONDS
    workload = (
        f"max_at_once={_FLEET_MAX_AT_ONCE}, max_per_second={_FLEET_MAX_PER_SECOND:g}, "
        f"{_FLEET_WORKERS} workers per process, {low * 1000:g}-{high * 1000:g} ms tasks"
    )
    print(
        f"\nThe fleet of issue 16: {_FLEET_PROCESSES} processes, {workload}, "
        f"{settings.fleet_tasks} tasks in all per run (the rate limit paces them)\n"
    )
    measured: list[Result] = []
    rows: list[list[str]] = []
    for scheme, swap, push in _SCHEMES:
        spec = {
            "kind": "contention",
            "url": url,
            "name": f"fleet-{scheme}",
            "max_at_once": _FLEET_MAX_AT_ONCE,
            "max_per_second": _FLEET_MAX_PER_SECOND,
            "workers": _FLEET_WORKERS,
            "tasks": settings.fleet_tasks // _FLEET_PROCESSES,
            "task_seconds": low,
            "task_spread": high - low,
            "swap": swap,
            "push": push,
        }
        result = await _contention_run(pool, stats_client, spec, _FLEET_PROCESSES, in_script)
        result["scheme"] = scheme
        result["workload"] = workload
        target = _TARGET_SWAP_ROUND_TRIPS_PER_TASK if swap else _TARGET_COMMANDS_PER_TASK
        passed = result["client_commands_per_task"] <= target
        rows.append([str(_FLEET_PROCESSES), scheme, *_contention_columns(result, passed)])
        measured.append(result)
    print(_table(_CONTENTION_HEADERS, rows))
    pushed = measured[-1]
    print("\nswap+push, in-script commands per task by name:")
    print(
        ", ".join(
            f"{name} {count / pushed['tasks']:.2f}"
            for name, count in sorted(pushed["in_script_commands"].items(), key=lambda i: -i[1])
        )
    )
    return measured


async def _contention_run(
    pool: _Pool,
    stats_client: redis.asyncio.Redis,
    spec: Spec,
    processes: int,
    in_script: frozenset[str],
) -> Result:
    """Run *spec* in *processes* workers at once; what it cost in Redis, per task."""
    tasks = spec["tasks"] * processes
    snapshot = _Snapshot(stats_client)
    (results,) = await _run_stages(pool, [spec] * processes, before_start=snapshot)
    stats = await _CommandStats.read(stats_client) - snapshot.stats
    delta = stats.calls
    del delta["info"]  # the "before" snapshot itself
    client_commands = {n: c for n, c in delta.items() if n not in in_script}
    script_commands = {n: c for n, c in delta.items() if n in in_script}
    adapter_calls: Counter[str] = Counter()
    for result in results:
        adapter_calls.update(result["calls"])
    # The limiter sends no PING of its own but in front of script calls (wake_first).
    round_trips = sum(c for n, c in client_commands.items() if n != "ping")
    return {
        "processes": processes,
        "tasks": tasks,
        "seconds": max(result["seconds"] for result in results),
        "client_commands_per_task": round_trips / tasks,
        "in_script_commands_per_task": sum(script_commands.values()) / tasks,
        "server_usec_per_task": sum(stats.usec[n] for n in client_commands) / tasks,
        "client_commands": client_commands,
        "in_script_commands": script_commands,
        "adapter_calls": dict(adapter_calls),
    }


def _contention_columns(result: Result, passed: bool) -> list[str]:
    """The columns of a section 2 row after its processes and scheme."""
    tasks = result["tasks"]
    return [
        str(tasks),
        f"{tasks / result['seconds']:,.0f}",
        f"{result['client_commands_per_task']:.2f}",
        _verdict(passed),
        ", ".join(f"{n} {c / tasks:.2f}" for n, c in sorted(result["client_commands"].items())),
        f"{result['in_script_commands_per_task']:.1f}",
        f"{result['server_usec_per_task']:.0f}",
    ]


# The engine path: aiometer.run_on_each(task, items, max_at_once=..., limiter=RedisLimiter)
# in this process, with a pool of workers and without max_at_once (one task spawned per item).
_ENGINE_LIMITER_MAX_AT_ONCE = 4
_ENGINE_POOLS = (4, 8, None)
_ENGINE_ITEMS = 300
_ENGINE_TASK_SECONDS = 0.002


async def _engine_path(url: str) -> list[Result]:
    """Script calls per task when the engine takes a RedisLimiter: does a finished task's
    release ride with the next task's acquisition?"""
    print(
        f"\nThe engine path, one process: run_on_each over {_ENGINE_ITEMS} items of "
        f"{_ENGINE_TASK_SECONDS * 1000:g} ms with limiter=RedisLimiter(max_at_once="
        f"{_ENGINE_LIMITER_MAX_AT_ONCE}); script calls per task (releases only: calls that "
        "carried no acquisition)\n"
    )
    rows: list[list[str]] = []
    measured: list[Result] = []

    async def task(_: int) -> None:
        await anyio.sleep(_ENGINE_TASK_SECONDS)

    client = redis.asyncio.Redis.from_url(url)
    try:
        for pool in _ENGINE_POOLS:
            for scheme, swap, push in _SCHEMES:
                adapter = _SwapCountingClient(client)
                name = f"engine-{pool}-{scheme}"
                limiter = RedisLimiter(adapter, name, max_at_once=_ENGINE_LIMITER_MAX_AT_ONCE)
                limiter._swap = swap
                limiter._push = push
                async with limiter:
                    await aiometer.run_on_each(
                        task, range(_ENGINE_ITEMS), max_at_once=pool, limiter=limiter
                    )
                calls = adapter.calls
                swaps = calls["acquire+rel"]
                alone = calls["releases only"]
                per_task = {
                    "acquire": (calls["acquire"] - swaps) / _ENGINE_ITEMS,
                    "acquire+rel": (swaps - alone) / _ENGINE_ITEMS,
                    "releases only": alone / _ENGINE_ITEMS,
                    "release": calls["release"] / _ENGINE_ITEMS,
                }
                total = sum(per_task.values())
                rows.append(
                    [
                        "none (a task per item)" if pool is None else str(pool),
                        scheme,
                        *(f"{value:.2f}" for value in per_task.values()),
                        f"{total:.2f}",
                    ]
                )
                measured.append(
                    {"engine_max_at_once": pool, "scheme": f"engine, {scheme}", **per_task}
                )
    finally:
        await client.aclose()
    headers = [
        "engine max_at_once",
        "scheme",
        "acquire",
        "acquire+rel",
        "releases only",
        "release",
        "calls/task",
    ]
    print(_table(headers, rows))
    return measured


def _latency_summary(samples: Sequence[float]) -> Result:
    milliseconds = [sample * 1000 for sample in samples]
    return {
        "samples": len(milliseconds),
        "p50_ms": _percentile(milliseconds, 0.50),
        "p99_ms": _percentile(milliseconds, 0.99),
        "max_ms": max(milliseconds),
    }


async def _handoff(pool: _Pool, url: str, settings: _Settings, verdicts: list[_Verdict]) -> Result:
    _section(
        "3. Release-to-start handoff between two processes "
        f"(max_at_once=1, slot held {_HANDOFF_HOLD_SECONDS * 1000:g} ms), for each scheme,\n"
        f"the schemes taking turns {_HANDOFF_BLOCK_ROUNDS} rounds at a time"
    )
    rounds = settings.handoff_rounds
    # The schemes take turns, a block of rounds each, so that the machine's drift over the
    # section weighs on all of them alike.
    full, rest = divmod(rounds, _HANDOFF_BLOCK_ROUNDS)
    blocks = [_HANDOFF_BLOCK_ROUNDS] * full + ([rest] if rest else [])
    specs = [
        {
            "kind": "handoff",
            "url": url,
            "name": "handoff",
            "role": role,
            "rounds": rounds,
            "blocks": blocks,
            "schemes": _SCHEMES,
        }
        for role in (0, 1)
    ]
    *limiter_stages, raw_results = await _run_stages(
        pool, specs, stages=len(blocks) * len(_SCHEMES) + 1
    )
    by_scheme: dict[str, list[float]] = {scheme: [] for scheme, _, _ in _SCHEMES}
    for index, limiter_results in enumerate(limiter_stages):
        holds = sorted(
            (acquired, released, role)
            for role, result in enumerate(limiter_results)
            for acquired, released in result["holds"]
        )
        # A handoff is a hold that follows one of the other process; the last holds of the
        # process that finishes second follow its own and are not handoffs.
        by_scheme[_SCHEMES[index % len(_SCHEMES)][0]].extend(
            later[0] - earlier[1]
            for earlier, later in itertools.pairwise(holds)
            if earlier[2] != later[2]
        )
    summaries: dict[str, Result] = {}
    overlaps: dict[str, int] = {}
    for scheme, handoffs in by_scheme.items():
        overlaps[scheme] = sum(1 for latency in handoffs if latency < 0)
        summaries[scheme] = _latency_summary(handoffs)
    raw = [latency for result in raw_results for latency in result["latencies"]]
    raw_summary = _latency_summary(raw)
    rows = [
        [
            label,
            str(summary["samples"]),
            f"{summary['p50_ms']:.3f}",
            f"{summary['p99_ms']:.3f}",
            f"{summary['max_ms']:.3f}",
        ]
        for label, summary in (
            *(
                (f"RedisLimiter ({scheme}): release() -> acquire() returns", summaries[scheme])
                for scheme, _, _ in _SCHEMES
            ),
            ("floor: RPUSH -> BLPOP returns", raw_summary),
        )
    ]
    print(_table(["handoff", "samples", "p50 ms", "p99 ms", "max ms"], rows))
    old, new = summaries["separate"]["p50_ms"], summaries["swap"]["p50_ms"]
    pushed = summaries["swap+push"]["p50_ms"]
    passed = new <= _TARGET_HANDOFF_P50_MS
    not_worse = new <= old * 1.1 + 0.05
    pushed_passed = pushed <= _TARGET_HANDOFF_P50_MS
    # The default scheme against the one without swaps: "unchanged or better".
    pushed_not_worse = pushed <= old * 1.1 + 0.05
    print(
        f"\nswap p50 vs floor: {new / raw_summary['p50_ms']:.1f}x, vs separate: "
        f"{new / old:.2f}x {_verdict(not_worse)}; swap+push p50 vs separate: {pushed / old:.2f}x "
        f"{_verdict(pushed_not_worse)} (vs swap: {pushed / new:.2f}x); overlapping holds (must "
        f"be 0): {sum(overlaps.values())}; p50 target <= {_TARGET_HANDOFF_P50_MS:g} ms "
        f"{_verdict(passed and pushed_passed)}"
    )
    verdicts.append(
        _Verdict(f"handoff p50 (swap) <= {_TARGET_HANDOFF_P50_MS:g} ms", f"{new:.3f} ms", passed)
    )
    verdicts.append(
        _Verdict(
            "handoff p50, swap vs separate: <= 1.1x (+0.05 ms)",
            f"{new:.3f} vs {old:.3f} ms",
            not_worse,
        )
    )
    verdicts.append(
        _Verdict(
            f"handoff p50 (swap+push) <= {_TARGET_HANDOFF_P50_MS:g} ms",
            f"{pushed:.3f} ms",
            pushed_passed,
        )
    )
    verdicts.append(
        _Verdict(
            "handoff p50, swap+push (the default) vs separate: <= 1.1x (+0.05 ms)",
            f"{pushed:.3f} vs {old:.3f} ms",
            pushed_not_worse,
        )
    )
    return {
        "limiter": summaries["swap+push"],
        "limiter_by_scheme": summaries,
        "raw_floor": raw_summary,
        "p50_vs_floor": pushed / raw_summary["p50_ms"],
        "overlapping_holds": sum(overlaps.values()),
    }


# Section 4. Each row: (label, RedisLimiter options, the cost of each acquisition as a function
# of the acquisition's number, the plain row it is compared with or None). Limits nobody
# reaches (but the full window), so the scripts pay for the window logs and nobody waits.
_THREE_WINDOWS = [Rate(_FAST_RATE, per=1), Rate(_FAST_RATE, per=10), Rate(_FAST_RATE, 10, "calls")]
# What an LLM API states: tokens per minute and requests per minute.
_TWO_WINDOWS = [Rate(_FAST_RATE, per=60), Rate(_FAST_RATE, per=60, counts="calls")]
_PLAIN_RATE = "rate-only, cost 1"
_PLAIN_CONCURRENCY = "max_at_once, cost 1"


@dataclass(frozen=True)
class _CostRow:
    label: str
    options: dict[str, Any]
    cost_of: Callable[[int], float]
    plain: str | None


_COST_ROWS = [
    _CostRow(_PLAIN_RATE, {"max_per_second": _FAST_RATE}, lambda n: 1, None),
    _CostRow(
        "rate-only, cost 7.5",
        {"max_per_second": _FAST_RATE, "burst": 1000},
        lambda n: 7.5,
        _PLAIN_RATE,
    ),
    _CostRow(
        "2 windows (cost + calls), cost 7.5", {"rates": _TWO_WINDOWS}, lambda n: 7.5, _PLAIN_RATE
    ),
    _CostRow("3 windows, cost 7.5", {"rates": _THREE_WINDOWS}, lambda n: 7.5, _PLAIN_RATE),
    _CostRow(
        "3 windows + max_per_second, cost 7.5",
        {"rates": _THREE_WINDOWS, "max_per_second": _FAST_RATE, "burst": 1000},
        lambda n: 7.5,
        _PLAIN_RATE,
    ),
    _CostRow(_PLAIN_CONCURRENCY, {"max_at_once": _HIGH_MAX_AT_ONCE}, lambda n: 1, None),
    _CostRow(
        "3 windows + max_at_once, cost 7.5",
        {"rates": _THREE_WINDOWS, "max_at_once": _HIGH_MAX_AT_ONCE},
        lambda n: 7.5,
        _PLAIN_CONCURRENCY,
    ),
    _CostRow(
        "full window, costs 1-8 (waits)",
        {"rates": [Rate(400, per=0.25)]},
        lambda n: 1 + n % 8,
        None,
    ),
]
# Coroutines per phase: 16 (concurrent acquisitions share script calls) and 1 (every
# acquisition is its own call, so the server time per call is that of one acquisition).
_COST_COROUTINES = (_COROUTINES_PER_PROCESS, 1)
# "The same round trips as plain": at most this much more script calls per task than the plain row.
_ROUND_TRIP_TOLERANCE = 1.10


async def _cost_phase(
    url: str, stats_client: redis.asyncio.Redis, seconds: float, row: _CostRow, coroutines: int
) -> tuple[int, _CommandStats]:
    counter = itertools.count()
    async with (
        redis.asyncio.Redis.from_url(url) as client,
        RedisLimiter(client, f"costs:{time.time_ns()}", **row.options) as limiter,
    ):
        # One script call per acquisition, cost 1 or not (no starts reserved ahead), so that
        # the rows compare what one call costs.
        limiter._reserving = False

        async def cycle() -> None:
            permit = await limiter.acquire(cost=row.cost_of(next(counter)))
            await permit.release()

        await _open_connections(client, coroutines + 2)
        before = await _CommandStats.read(stats_client)
        begin = time.time()
        done, _ = await _count_completions(cycle, begin, begin + seconds, coroutines)
        after = await _CommandStats.read(stats_client)
    return done, after - before


def _cost_summary(total: Counter[str], seconds: float, ping_rate: float) -> Result:
    tasks = max(total["tasks"], 1)
    calls = max(total["calls"], 1)
    rate = total["tasks"] / seconds
    return {
        "tasks_per_second": rate,
        "ratio_to_ping": rate / ping_rate,
        "script_calls_per_task": total["calls"] / tasks,
        "server_us_per_task": total["usec"] / tasks,
        "server_us_per_call": total["usec"] / calls,
        "in_script_commands_per_task": total["in_script"] / tasks,
    }


async def _costs(
    url: str, stats_client: redis.asyncio.Redis, settings: _Settings, verdicts: list[_Verdict]
) -> Result:
    _section(
        "4. Costs and windows next to plain acquisitions: one process looping "
        "acquire(cost=c) + release()\n"
        f"with {_COST_COROUTINES[0]} coroutines (concurrent acquisitions share script calls) and "
        "with 1 (one call per acquisition);\n"
        f"{settings.rounds} interleaved round(s) of {settings.phase_seconds:g} s per phase; "
        "server time from INFO commandstats (EVALSHA usec) read around each phase."
    )
    in_script = _script_command_names()
    measured: Result = {}
    for coroutines in _COST_COROUTINES:
        totals = {row.label: Counter[str]() for row in _COST_ROWS}
        pings = 0
        for _ in range(settings.rounds):
            async with redis.asyncio.Redis.from_url(url) as client:
                await _open_connections(client, coroutines + 2)
                begin = time.time()
                done, _ = await _count_completions(
                    client.ping, begin, begin + settings.phase_seconds, coroutines
                )
                pings += done
            for row in _COST_ROWS:
                done, stats = await _cost_phase(
                    url, stats_client, settings.phase_seconds, row, coroutines
                )
                total = totals[row.label]
                total["tasks"] += done
                total["calls"] += stats.calls["evalsha"] + stats.calls["eval"]
                total["usec"] += stats.usec["evalsha"] + stats.usec["eval"]
                total["in_script"] += sum(stats.calls[name] for name in in_script)
        seconds = settings.rounds * settings.phase_seconds
        ping_rate = pings / seconds
        summaries = {
            label: _cost_summary(total, seconds, ping_rate) for label, total in totals.items()
        }
        rows = []
        for row in _COST_ROWS:
            summary = summaries[row.label]
            calls = summary["script_calls_per_task"]
            verdict = ""
            if row.plain is not None and coroutines == 1:
                # Unbatched, the round trips per task are exact: one call per acquisition
                # (and one per release with max_at_once), whatever the costs and windows.
                plain = summaries[row.plain]["script_calls_per_task"]
                passed = calls <= plain * _ROUND_TRIP_TOLERANCE
                summary["plain_script_calls_per_task"] = plain
                verdict = _verdict(passed)
                verdicts.append(
                    _Verdict(
                        f"script calls per task, {row.label}: <= {_ROUND_TRIP_TOLERANCE:.2f}x "
                        f"{row.plain} ({plain:.2f})",
                        f"{calls:.2f}",
                        passed,
                    )
                )
            rows.append(
                [
                    row.label,
                    f"{summary['tasks_per_second']:,.0f}",
                    f"{summary['ratio_to_ping']:.2f}",
                    f"{calls:.2f}",
                    f"{summary['server_us_per_task']:.1f}",
                    f"{summary['server_us_per_call']:.1f}",
                    f"{summary['in_script_commands_per_task']:.1f}",
                    verdict,
                ]
            )
        print(f"{coroutines} coroutine(s) (PING {ping_rate:,.0f}/s):")
        headers = [
            "limiter",
            "tasks/s",
            "vs PING",
            "calls/task",
            "server us/task",
            "server us/call",
            "cmds/task",
            "same calls as plain",
        ]
        print(_table(headers, rows) + "\n")
        measured[f"{coroutines}_coroutines"] = {"ping_per_second": ping_rate, "rows": summaries}
    print(
        "calls/task: script round trips (EVALSHA) per task; server us/task: redis-server time of "
        "those calls per task; server us/call: per call; cmds/task: redis.call commands the "
        "scripts ran. The full window's tasks wait for it: its rate is not comparable."
    )
    return measured


async def _reservations(
    pool: _Pool, url: str, settings: _Settings, verdicts: list[_Verdict]
) -> Result:
    phases: list[tuple[float, str]] = [
        (rate, scheme)
        for _ in range(settings.rounds)
        for rate in _RESERVE_RATES
        for scheme in _RESERVE_SCHEMES
    ]
    _section(
        f"5. Rate reservations: {_RESERVE_PROCESSES} processes share a rate-only limiter of "
        f"{' and '.join(f'{rate:,.0f}' for rate in _RESERVE_RATES)} starts/s,\none coroutine per "
        f"process taking starts (acquire, hand the permit to a task); {settings.rounds} "
        f"interleaved round(s) of {settings.phase_seconds:g} s per rate and scheme.\nold = one "
        "script call per start; new = starts reserved ahead in one call and handed out locally;\n"
        "local = no Redis, each process an in-process RateLimiter of its eighth of the rate (the "
        "machine's ceiling for this loop)."
    )
    # One prefix for every process: they share each phase's limiter.
    prefix = f"reserve-{time.time_ns()}"
    specs = [
        {
            "kind": "reserve",
            "url": url,
            "prefix": prefix,
            "seconds": settings.phase_seconds,
            "phases": phases,
            "reader": index == 0,
        }
        for index in range(_RESERVE_PROCESSES)
    ]
    (results,) = await _run_stages(pool, specs)
    in_script = _script_command_names()
    reader = next(result for result in results if result["stats"])
    totals: dict[tuple[float, str], Counter[str]] = {}
    lateness: dict[tuple[float, str], list[float]] = {}
    for index, (rate, scheme) in enumerate(phases):
        total = totals.setdefault((rate, scheme), Counter())
        total["starts"] += sum(result["counts"][index] for result in results)
        total["dropped"] += sum(result["dropped"][index] for result in results)
        late = lateness.setdefault((rate, scheme), [])
        late.extend(sample for result in results for sample in result["late"][index])
        calls = Counter(reader["stats"][index]["calls"])
        usec = Counter(reader["stats"][index]["usec"])
        total["script_calls"] += calls["evalsha"] + calls["eval"]
        total["usec"] += usec["evalsha"] + usec["eval"]
        total["in_script"] += sum(calls[name] for name in in_script)
    measured: Result = {}
    rows = []
    total_seconds = settings.rounds * settings.phase_seconds
    for rate in _RESERVE_RATES:
        for scheme in _RESERVE_SCHEMES:
            total, late = totals[rate, scheme], lateness[rate, scheme]
            starts = max(total["starts"], 1)
            share = total["starts"] / total_seconds / rate
            calls_per_start = total["script_calls"] / starts
            result = measured[f"{rate:.0f}/{scheme}"] = {
                "starts_per_second": total["starts"] / total_seconds,
                "share_of_rate": share,
                "script_calls_per_start": calls_per_start,
                "in_script_commands_per_start": total["in_script"] / starts,
                "server_us_per_start": total["usec"] / starts,
                "dropped_per_start": total["dropped"] / starts,
                "early_starts": sum(1 for sample in late if sample < 0),
            }
            if late:
                result["late_ms_p50"] = _percentile(late, 0.50) * 1000
                result["late_ms_p99"] = _percentile(late, 0.99) * 1000
            verdict = ""
            if scheme == "new" and rate == _RESERVE_TARGET_RATE:
                passed = calls_per_start <= _TARGET_RESERVE_CALLS and share >= _TARGET_RESERVE_SHARE
                verdict = _verdict(passed)
                verdicts.append(
                    _Verdict(
                        f"rate reservations, {_RESERVE_PROCESSES} processes at {rate:,.0f}/s: "
                        f"<= {_TARGET_RESERVE_CALLS} calls per start, >= "
                        f"{_TARGET_RESERVE_SHARE} of the rate",
                        f"{calls_per_start:.2f} calls, {share:.2f} of the rate",
                        passed,
                    )
                )
            rows.append(
                [
                    f"{rate:,.0f}/s",
                    scheme,
                    f"{total['starts'] / total_seconds:,.0f}",
                    f"{share:.2f}",
                    f"{calls_per_start:.2f}",
                    f"{total['in_script'] / starts:.1f}",
                    f"{total['usec'] / starts:.1f}",
                    f"{total['dropped'] / starts:.2f}",
                    f"{result['late_ms_p50']:.2f} / {result['late_ms_p99']:.2f}" if late else "-",
                    str(result["early_starts"]) if late else "-",
                    verdict,
                ]
            )
    headers = [
        "rate",
        "scheme",
        "starts/s",
        "of rate",
        "calls/start",
        "cmds/start",
        "server us/start",
        "dropped/start",
        "late ms p50 / p99",
        "early",
        "",
    ]
    print(_table(headers, rows))
    print(
        "calls/start: script round trips per start (EVALSHA); cmds/start: redis.call commands the "
        "scripts ran; server us/start: redis-server time of the script calls per start; "
        "dropped/start: starts reserved ahead that went unused (not begun within "
        f"{LATE * 1000:g} ms of the time the process learned for them); late: how long after "
        "its time in the fleet's schedule (Redis clock) a start began (time.time() when "
        "acquire() returned; one start in ten); early: starts that began before their time "
        "(must be 0)."
    )
    return measured


async def _sections(
    pool: _Pool,
    url: str,
    stats_client: redis.asyncio.Redis,
    settings: _Settings,
    verdicts: list[_Verdict],
) -> Result:
    return {
        "throughput": await _throughput(pool, url, stats_client, settings, verdicts),
        "commands_per_task": await _contention(pool, url, stats_client, settings, verdicts),
        "handoff": await _handoff(pool, url, settings, verdicts),
        "costs": await _costs(url, stats_client, settings, verdicts),
        "reservations": await _reservations(pool, url, settings, verdicts),
    }


_WORKERS: dict[str, Worker] = {
    "throughput": _throughput_worker,
    "contention": _contention_worker,
    "handoff": _handoff_worker,
    "reserve": _reserve_worker,
}


def main(argv: Sequence[str] | None = None) -> int:
    return run(
        argv,
        title="RedisLimiter vs raw Redis round trips",
        script=__file__,
        workers=_WORKERS,
        pool_size=max(*_THROUGHPUT_PROCESSES, *_CONTENTION_PROCESSES),
        sections=_sections,
    )


if __name__ == "__main__":
    sys.exit(main())
