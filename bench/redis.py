"""RedisLimiter against raw Redis round trips, measured side by side in one run.

Run ``python bench/redis.py`` (about a minute) or ``python bench/redis.py --quick`` (about
20 s); ``--json FILE`` also writes the final JSON document to FILE. The script starts its own
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
   *both*. The same coroutines with the same client also loop on raw PING, and on a raw
   EVALSHA of ``acquire.lua`` with the rate-only limiter's keys and arguments (what one script
   call costs without the limiter's Python around it). The phases are interleaved in rounds
   and end with a PING phase, so a change in machine load hits all of them alike.
   ``ratio = acquisitions/s / PING/s``, with 1 and with 8 processes. The diagnostic columns
   give the client CPU per operation (process CPU time / completions) and, per process
   count, the redis-server time per PING and per EVALSHA from ``INFO commandstats``.
   Targets: rate-only >= 0.8, concurrency-only >= 0.4 (two round trips per cycle).
2. Redis commands per task under contention. 2 and 8 processes share one limiter with
   ``max_at_once=4``; each runs 8 workers doing 5 ms tasks inside ``limiter.slot()``, so most
   acquisitions queue and are woken through the mailbox. ``INFO commandstats`` is read before
   and after with a separate client. *Client commands* are what the limiter processes sent
   (EVALSHA, EVAL, BLPOP, anything else except the benchmark's own INFO); *in-script commands*
   are the ones the Lua scripts ran (the ``redis.call`` names found in ``lua/*.lua``), shown
   for information. The split per script comes from counting calls in each worker's client
   adapter. Targets: <= 4 client commands per task, and at most 10 % more with 8 processes
   than with 2.
3. Handoff latency. Two processes ping-pong the only slot of a ``max_at_once=1`` limiter,
   holding it 3 ms so the other is always queued: the holder records ``time.time()`` just
   before ``release()``, the waiter right after ``acquire()`` returns. The floor next to it is
   the same ping-pong over raw RPUSH / BLPOP between the same two processes.
   Target: p50 <= 2 ms.

4. Cluster. 100 limiters (``site-0`` .. ``site-99``) on a single redis-server against the
   same 100 on a three-primary Redis Cluster (``tests/cluster.py``), in the same run, in two
   stages whose single and cluster phases alternate in interleaved rounds; each stage has a
   *concurrency-only* (``max_at_once=1000``, never waits: acquire + release) and a
   *rate-only* variant (one acquire call). ``INFO cpu`` on every server gives its busy cores.

   - *redis-py fleet*: 4 processes of 32 coroutines loop on acquire + release through
     ``RedisLimiter`` over ``redis.asyncio.Redis`` and ``redis.asyncio.RedisCluster``
     (``max_connections=512``), each coroutine taking the next limiter of its process's
     rotation. ``INFO commandstats`` on each primary gives each shard's share of the script
     calls. Target: every share within 30 % of an even third.
   - *pipelined*: 3 processes send the same limiters' script calls, byte for byte (the
     limiter's own keys and arguments, fresh ids), pipelined 128 deep over raw sockets by the
     lean client in ``bench/_resp.py``, so that the servers rather than Python are the limit.

   Target: cluster >= 1.0x single (no loss of aggregate throughput). Sharding can only add
   throughput where one server is the bottleneck, so a stage is judged only if its single
   server was busy for at least 0.8 of a core; a stage limited by its clients' CPU (as the
   redis-py fleet is on a small machine) is printed, with where the CPU went, but not judged.

The 8-process rows run more processes than a small machine has cores, next to redis-server
itself: read the ratio, not the absolute rate. The exit status is 0 whatever the verdicts.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# This file is named redis.py: run as a script, its directory comes first on sys.path and
# would shadow the redis package. Drop that entry before anything imports redis-py.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]

import anyio  # noqa: E402
import anyio.to_thread  # noqa: E402
import redis.asyncio  # noqa: E402
from redis.crc import key_slot  # noqa: E402

from aiometer_redis import RedisLimiter  # noqa: E402
from aiometer_redis._client import RedisPyClient, ScriptArg  # noqa: E402
from aiometer_redis._limiter import limiter_keys  # noqa: E402
from aiometer_redis._scripts import Script, all_scripts, script_dir  # noqa: E402
from aiometer_redis._server import RedisServer  # noqa: E402

# The throwaway three-shard cluster is the tests' helper (tests/cluster.py): put the tests
# directory on the path (last, so it shadows nothing) and import it rather than copy it.
sys.path.append(str(_HERE.parent / "tests"))
from cluster import RedisCluster3, find_redis_cli  # noqa: E402

# The lean pipelining client of the server-bound rows lives next to this file.
sys.path.append(str(_HERE.parent))
from bench._resp import Connection, LimiterCall, Shard, run_pipelined  # noqa: E402

_READY = "READY"
_START_LEAD_SECONDS = 0.3
_PHASE_GAP_SECONDS = 0.15
_WORKER_TIMEOUT_SECONDS = 120.0
_BLPOP_TIMEOUT_SECONDS = 5.0

_COROUTINES_PER_PROCESS = 16
_THROUGHPUT_PROCESSES = (1, 8)
_FAST_RATE = 1e9
_HIGH_MAX_AT_ONCE = 10_000
_PING = "PING"
_RAW_SCRIPT = "EVALSHA acquire.lua"
_LIMITER_PHASES = ("rate-only", "concurrency-only", "both")
_ROUND = (_PING, _RAW_SCRIPT, *_LIMITER_PHASES)

_CONTENTION_PROCESSES = (2, 8)
_CONTENTION_MAX_AT_ONCE = 4
_CONTENTION_WORKERS = 8
_CONTENTION_TASK_SECONDS = 0.005

_HANDOFF_HOLD_SECONDS = 0.003

_TARGET_RATIOS = {"rate-only": 0.8, "concurrency-only": 0.4}
_TARGET_COMMANDS_PER_TASK = 4.0
# "Not growing with the fleet": every task costs at most one acquire call, one wake-up (BLPOP)
# and one release call whatever the number of processes; batching merges some of them, more so
# when fewer processes share the slots, so the measured count may rise towards this bound as
# processes are added, never past it.
_COMMANDS_BOUND_PER_TASK = 3.0
_TARGET_HANDOFF_P50_MS = 2.0

_CLUSTER_PROCESSES = 4
_CLUSTER_COROUTINES_PER_PROCESS = 32
_CLUSTER_LIMITERS = tuple(f"site-{i}" for i in range(100))
_CLUSTER_MAX_AT_ONCE = 1000  # above the 128 coroutines in all: never waits
_CLUSTER_MAX_CONNECTIONS = 512  # per node, as in tests/test_cluster.py
_CLUSTER_VARIANTS = ("concurrency-only", "rate-only")
_SINGLE, _CLUSTER = "single", "cluster"
_SCRIPT_COMMANDS = ("evalsha", "eval")
_TARGET_CLUSTER_RATIO = 1.0
# The server-bound rows: the limiter's own script calls, pipelined by bench/_resp.py.
_CAPACITY_PROCESSES = 3
_CAPACITY_DEPTH = 128  # script calls per batch per server (x2 with the releases)
# A phase counts as server-bound when the single server was busy at least this much of it.
_SERVER_BOUND_CORES = 0.8
_TARGET_SHARE_TOLERANCE = 0.3  # every shard within 30 % of an even third

Spec = dict[str, Any]
Result = dict[str, Any]


@dataclass(frozen=True)
class _Settings:
    rounds: int
    phase_seconds: float
    contention_tasks: int  # in total, split evenly over the processes
    handoff_rounds: int  # per process
    cluster_rounds: int
    cluster_phase_seconds: float


_FULL = _Settings(
    rounds=4,
    phase_seconds=0.75,
    contention_tasks=1600,
    handoff_rounds=200,
    cluster_rounds=3,
    cluster_phase_seconds=1.0,
)
_QUICK = _Settings(
    rounds=1,
    phase_seconds=0.4,
    contention_tasks=400,
    handoff_rounds=50,
    cluster_rounds=1,
    cluster_phase_seconds=0.5,
)


@dataclass(frozen=True)
class _Verdict:
    target: str
    measured: str
    passed: bool


# -- worker side: every measurement is a stage (READY, wait for the start time, result) ------


async def _stage_start() -> float:
    print(_READY, flush=True)
    line = await anyio.to_thread.run_sync(sys.stdin.readline)
    if not line:
        raise RuntimeError("the coordinator closed stdin before the start time")
    start = float(line)
    await anyio.sleep(max(0.0, start - time.time()))
    return start


def _stage_result(result: Result) -> None:
    print(json.dumps(result), flush=True)


class _CountingClient(RedisPyClient):
    """The redis-py adapter, counting script calls by name and BLPOP replies by outcome."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        super().__init__(client)
        self.calls: Counter[str] = Counter()

    async def run_script(
        self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]
    ) -> Any:
        self.calls[script.name] += 1
        return await super().run_script(script, keys, args)

    async def blpop(self, key: str, timeout: float) -> str | None:
        message = await super().blpop(key, timeout)
        self.calls["blpop (message)" if message is not None else "blpop (timed out)"] += 1
        return message


async def _ping(client: redis.asyncio.Redis) -> None:
    await client.ping()


async def _open_connections(client: redis.asyncio.Redis, count: int) -> None:
    # Concurrent PINGs make the pool open its connections now, so that no connection
    # handshake falls inside a measured window.
    async with anyio.create_task_group() as task_group:
        for _ in range(count):
            task_group.start_soon(_ping, client)


async def _cycle(limiter: RedisLimiter) -> None:
    permit = await limiter.acquire()
    await permit.release()


async def _count_completions(
    operation: Callable[[], Awaitable[object]], begin: float, end: float, coroutines: int
) -> tuple[int, float]:
    """Loop *operation* in each coroutine from *begin*; return (completions by *end*, CPU s)."""
    await anyio.sleep(max(0.0, begin - time.time()))
    counts: list[int] = []

    async def loop() -> None:
        done = 0
        while True:
            await operation()
            if time.time() > end:
                break
            done += 1
        counts.append(done)

    cpu = time.process_time()
    async with anyio.create_task_group() as task_group:
        for _ in range(coroutines):
            task_group.start_soon(loop)
    return sum(counts), time.process_time() - cpu


Measure = Callable[[str, float, float], Awaitable[tuple[int, float]]]


async def _timed_phases(spec: Spec, measure: Measure) -> Result:
    """Start the stage, then run ``measure(phase, begin, end)`` for each of the spec's phases
    at its slot of the shared schedule; return the completions and CPU seconds per phase."""
    seconds: float = spec["seconds"]
    start = await _stage_start()
    counts: list[int] = []
    cpu: list[float] = []
    for index, phase in enumerate(spec["phases"]):
        begin = start + index * (seconds + _PHASE_GAP_SECONDS)
        done, used = await measure(phase, begin, begin + seconds)
        counts.append(done)
        cpu.append(used)
    return {"counts": counts, "cpu": cpu}


def _raw_acquire_call(
    client: redis.asyncio.Redis, limiter: RedisLimiter
) -> Callable[[], Awaitable[object]]:
    """EVALSHA of acquire.lua with *limiter*'s keys and arguments, straight through redis-py."""
    # The argument header is private to the limiter; reading it keeps this call byte-identical
    # to the limiter's own.
    call_bytes = LimiterCall.of(limiter, "acquire")
    keys, header = call_bytes.keys, call_bytes.header
    waiter_ids = (f"rawbench{os.getpid()}:{n}" for n in itertools.count())

    def call() -> Awaitable[object]:
        result: Awaitable[object] = client.evalsha(
            call_bytes.sha1, len(keys), *keys, *header, next(waiter_ids)
        )
        return result

    return call


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


async def _contention_worker(client: redis.asyncio.Redis, spec: Spec) -> None:
    adapter = _CountingClient(client)
    task_seconds: float = spec["task_seconds"]
    todo = iter(range(spec["tasks"]))
    async with RedisLimiter(adapter, spec["name"], max_at_once=spec["max_at_once"]) as limiter:

        async def work() -> None:
            for _ in todo:
                async with limiter.slot():
                    await anyio.sleep(task_seconds)

        await _open_connections(client, spec["workers"] + 2)
        adapter.calls.clear()
        start = await _stage_start()
        async with anyio.create_task_group() as task_group:
            for _ in range(spec["workers"]):
                task_group.start_soon(work)
        seconds = time.time() - start
        calls = dict(adapter.calls)
    _stage_result({"calls": calls, "seconds": seconds})


async def _handoff_worker(client: redis.asyncio.Redis, spec: Spec) -> None:
    """Stage 1: ping-pong through the limiter. Stage 2: the same over raw RPUSH / BLPOP."""
    role: int = spec["role"]
    rounds: int = spec["rounds"]
    await _open_connections(client, 3)
    holds: list[tuple[float, float]] = []
    async with RedisLimiter(client, spec["name"], max_at_once=1) as limiter:
        await _stage_start()
        for _ in range(rounds):
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


async def _next_cycle(rotation: Iterator[RedisLimiter]) -> None:
    await _cycle(next(rotation))


async def _warm_up(operation: Callable[[], Awaitable[object]], coroutines: int, calls: int) -> None:
    """*calls* operations spread over *coroutines* concurrent loops (opens the connections)."""

    async def loop(count: int) -> None:
        for _ in range(count):
            await operation()

    async with anyio.create_task_group() as task_group:
        for _ in range(coroutines):
            task_group.start_soon(loop, math.ceil(calls / coroutines))


async def _cluster_worker(client: redis.asyncio.Redis, spec: Spec) -> None:
    """The acquire+release loop over many limiters, on the single server and on the cluster."""
    names: list[str] = spec["names"]
    offset: int = spec["offset"]
    coroutines: int = spec["coroutines"]
    cluster = redis.asyncio.RedisCluster.from_url(
        spec["cluster_url"], max_connections=_CLUSTER_MAX_CONNECTIONS
    )
    clients: dict[str, redis.asyncio.Redis | redis.asyncio.RedisCluster] = {
        _SINGLE: client,
        _CLUSTER: cluster,
    }
    async with AsyncExitStack() as stack:
        # Registered first, so it runs last: after every limiter has closed.
        stack.push_async_callback(cluster.aclose)
        operations: dict[str, Callable[[], Awaitable[object]]] = {}
        for backend, backend_client in clients.items():
            for variant in _CLUSTER_VARIANTS:
                options = _variant_options(variant)
                # One prefix per variant: the keys differ, the hash tag (the name) and so
                # the slot do not.
                limiters = [
                    await stack.enter_async_context(
                        RedisLimiter(
                            backend_client, name, prefix=f"{spec['prefix']}-{variant}", **options
                        )
                    )
                    for name in names
                ]
                # Each process starts its rotation elsewhere, so that the processes' requests
                # spread over the limiters rather than moving through them in step.
                rotation = itertools.cycle(limiters[offset:] + limiters[:offset])
                operations[f"{backend}/{variant}"] = functools.partial(_next_cycle, rotation)
        for operation in operations.values():
            await _warm_up(operation, coroutines, 2 * len(names))

        async def measure(phase: str, begin: float, end: float) -> tuple[int, float]:
            return await _count_completions(operations[phase], begin, end, coroutines)

        result = await _timed_phases(spec, measure)
    _stage_result(result)


def _variant_options(variant: str) -> dict[str, Any]:
    if variant == "concurrency-only":
        return {"max_at_once": _CLUSTER_MAX_AT_ONCE}
    return {"max_per_second": _FAST_RATE}


def _capacity_shards(
    client: redis.asyncio.Redis, spec: Spec, connections: dict[tuple[str, int], Connection]
) -> dict[str, list[Shard]]:
    """The lean client's shards for every phase ("single/rate-only", ...) of *spec*."""
    shards: dict[str, list[Shard]] = {}
    for backend, owners in spec["owners"].items():
        for variant in _CLUSTER_VARIANTS:
            by_address: dict[tuple[str, int], Shard] = {}
            for name in spec["names"]:
                host, port = owners[name]
                address = (host, int(port))
                if address not in connections:
                    connections[address] = Connection(*address)
                shard = by_address.setdefault(address, Shard(connections[address], [], []))
                limiter = RedisLimiter(
                    client, name, prefix=f"{spec['prefix']}-{variant}", **_variant_options(variant)
                )
                shard.acquire.append(LimiterCall.of(limiter, "acquire").prefix())
                if variant == "concurrency-only":
                    shard.release.append(LimiterCall.of(limiter, "release").prefix())
            shards[f"{backend}/{variant}"] = list(by_address.values())
    return shards


async def _capacity_worker(client: redis.asyncio.Redis, spec: Spec) -> None:
    """The limiters' own script calls, pipelined over raw sockets: the servers are the limit."""
    connections: dict[tuple[str, int], Connection] = {}
    try:
        shards = _capacity_shards(client, spec, connections)
        for phase_shards in shards.values():  # warm up: connect, create the keys
            await anyio.to_thread.run_sync(run_pipelined, phase_shards, 4, 0.0)

        async def measure(phase: str, begin: float, end: float) -> tuple[int, float]:
            await anyio.sleep(max(0.0, begin - time.time()))
            used = time.process_time()
            done = await anyio.to_thread.run_sync(run_pipelined, shards[phase], spec["depth"], end)
            return done, time.process_time() - used

        result = await _timed_phases(spec, measure)
    finally:
        for connection in connections.values():
            connection.close()
    _stage_result(result)


_WORKERS: dict[str, Callable[[redis.asyncio.Redis, Spec], Awaitable[None]]] = {
    "throughput": _throughput_worker,
    "contention": _contention_worker,
    "handoff": _handoff_worker,
    "cluster": _cluster_worker,
    "capacity": _capacity_worker,
}


async def _serve() -> None:
    """Worker process: run one spec per line of stdin, until stdin closes."""
    print(_READY, flush=True)
    while line := await anyio.to_thread.run_sync(sys.stdin.readline):
        spec: Spec = json.loads(line)
        client = redis.asyncio.Redis.from_url(spec["url"])
        try:
            await _WORKERS[spec["kind"]](client, spec)
        finally:
            await client.aclose()


# -- coordinator side --------------------------------------------------------------------------


class _Pool:
    """Worker processes running this file, reused by every measurement (blocking calls).

    Starting the processes once keeps interpreter start-up out of the run time and keeps
    processes that are still importing off the CPU while another measurement runs.
    """

    def __init__(self, size: int) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        self._processes = [
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(size)
        ]
        self._active = self._processes

    def _send(self, process: subprocess.Popen[str], line: str) -> None:
        assert process.stdin is not None
        process.stdin.write(line + "\n")
        process.stdin.flush()

    def _receive(self, process: subprocess.Popen[str]) -> str:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"a worker exited with {process.wait()} (its traceback is above)")
        return line

    def wait_ready(self) -> None:
        """Wait until every active worker has set up and printed READY."""
        for process in self._active:
            line = self._receive(process).strip()
            if line != _READY:
                raise RuntimeError(f"a worker printed {line!r} instead of {_READY}")

    def assign(self, specs: Sequence[Spec]) -> None:
        """Hand one spec to each of the first ``len(specs)`` workers."""
        if len(specs) > len(self._processes):
            raise ValueError(f"{len(specs)} specs for {len(self._processes)} workers")
        self._active = self._processes[: len(specs)]
        for process, spec in zip(self._active, specs, strict=True):
            self._send(process, json.dumps(spec))

    def run_stage(self) -> list[Result]:
        """Send one shared start time; return every active worker's result for the stage."""
        start = time.time() + _START_LEAD_SECONDS
        for process in self._active:
            self._send(process, repr(start))
        return [json.loads(self._receive(process)) for process in self._active]

    def close(self) -> None:
        """Let the workers exit (end of input); kill any that do not within the time-out."""
        for process in self._processes:
            if process.stdin is not None and not process.stdin.closed:
                process.stdin.close()
        deadline = time.monotonic() + _WORKER_TIMEOUT_SECONDS
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _blocking(function: Callable[[], Any]) -> Any:
    # Abandoned on time-out; closing the pool then kills the workers, which ends the read.
    with anyio.fail_after(_WORKER_TIMEOUT_SECONDS):
        return await anyio.to_thread.run_sync(function, abandon_on_cancel=True)


async def _run_stages(
    pool: _Pool,
    specs: Sequence[Spec],
    stages: int = 1,
    before_start: Callable[[], Awaitable[None]] | None = None,
) -> list[list[Result]]:
    """Run one spec per worker through *stages* stages; return the results stage by stage."""
    await _blocking(functools.partial(pool.assign, specs))
    results: list[list[Result]] = []
    for _ in range(stages):
        await _blocking(pool.wait_ready)
        if before_start is not None:
            await before_start()
        results.append(await _blocking(pool.run_stage))
    return results


def _percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in (headers, *rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [cells[0].ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _script_command_names() -> frozenset[str]:
    """Lower-case names of every command the Lua scripts run through ``redis.call``."""
    pattern = re.compile(r"redis\.call\(\s*'(\w+)'")
    names: set[str] = set()
    for path in sorted(script_dir().glob("*.lua")):
        names.update(name.lower() for name in pattern.findall(path.read_text()))
    return frozenset(names)


@dataclass
class _CommandStats:
    """``INFO commandstats`` totals by command name (lower case, e.g. ``client|setinfo``)."""

    calls: Counter[str]
    usec: Counter[str]

    @classmethod
    async def read(cls, client: redis.asyncio.Redis) -> _CommandStats:
        stats: dict[str, dict[str, Any]] = await client.info("commandstats")
        calls: Counter[str] = Counter()
        usec: Counter[str] = Counter()
        for key, values in stats.items():
            name = key.removeprefix("cmdstat_")
            calls[name] = int(values["calls"])
            usec[name] = int(values["usec"])
        return cls(calls, usec)

    def __sub__(self, earlier: _CommandStats) -> _CommandStats:
        return _CommandStats(self.calls - earlier.calls, self.usec - earlier.usec)

    def usec_per_call(self, name: str) -> float:
        return self.usec[name] / max(self.calls[name], 1)


class _Snapshot:
    """Reads ``INFO commandstats`` when awaited (the "before" of a measurement)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self.stats = _CommandStats(Counter(), Counter())

    async def __call__(self) -> None:
        self.stats = await _CommandStats.read(self._client)


def _section(title: str) -> None:
    print(f"\n{title}\n")


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
        f"2. Redis commands per task: max_at_once={_CONTENTION_MAX_AT_ONCE}, "
        f"{_CONTENTION_WORKERS} workers per process, {_CONTENTION_TASK_SECONDS * 1000:g} ms "
        f"tasks, {settings.contention_tasks} tasks in all\n"
        f"target: <= {_TARGET_COMMANDS_PER_TASK:g} client commands per task"
    )
    in_script = _script_command_names()
    measured: list[Result] = []
    rows: list[list[str]] = []
    split_rows: list[list[str]] = []
    script_columns = [
        "acquire",
        "release",
        "cancel",
        "renew",
        "blpop (message)",
        "blpop (timed out)",
    ]
    for processes in _CONTENTION_PROCESSES:
        tasks_each = settings.contention_tasks // processes
        tasks = tasks_each * processes
        spec = {
            "kind": "contention",
            "url": url,
            "name": f"contention-{processes}",
            "max_at_once": _CONTENTION_MAX_AT_ONCE,
            "workers": _CONTENTION_WORKERS,
            "tasks": tasks_each,
            "task_seconds": _CONTENTION_TASK_SECONDS,
        }
        snapshot = _Snapshot(stats_client)
        (results,) = await _run_stages(pool, [spec] * processes, before_start=snapshot)
        delta = (await _CommandStats.read(stats_client) - snapshot.stats).calls
        del delta["info"]  # the "before" snapshot itself
        client_commands = {n: c for n, c in delta.items() if n not in in_script}
        script_commands = {n: c for n, c in delta.items() if n in in_script}
        client_per_task = sum(client_commands.values()) / tasks
        script_per_task = sum(script_commands.values()) / tasks
        seconds = max(result["seconds"] for result in results)
        adapter_calls: Counter[str] = Counter()
        for result in results:
            adapter_calls.update(result["calls"])
        passed = client_per_task <= _TARGET_COMMANDS_PER_TASK
        verdicts.append(
            _Verdict(
                f"client commands per task, {processes} processes: "
                f"<= {_TARGET_COMMANDS_PER_TASK:g}",
                f"{client_per_task:.2f}",
                passed,
            )
        )
        rows.append(
            [
                str(processes),
                str(tasks),
                f"{tasks / seconds:,.0f}",
                f"{client_per_task:.2f}",
                _verdict(passed),
                ", ".join(f"{n} {c / tasks:.2f}" for n, c in sorted(client_commands.items())),
                f"{script_per_task:.1f}",
            ]
        )
        split_rows.append(
            [str(processes)] + [f"{adapter_calls[name] / tasks:.2f}" for name in script_columns]
        )
        measured.append(
            {
                "processes": processes,
                "tasks": tasks,
                "seconds": seconds,
                "client_commands_per_task": client_per_task,
                "in_script_commands_per_task": script_per_task,
                "client_commands": client_commands,
                "in_script_commands": script_commands,
                "adapter_calls": dict(adapter_calls),
            }
        )
    headers = [
        "processes",
        "tasks",
        "tasks/s",
        "client cmds/task",
        "result",
        "client commands by name",
        "in-script cmds/task",
    ]
    print(_table(headers, rows))
    print("\nCalls per task counted in the workers' client adapter:\n")
    print(_table(["processes", *script_columns], split_rows))
    first, last = measured[0], measured[-1]
    growth = last["client_commands_per_task"] / first["client_commands_per_task"]
    worst = max(result["client_commands_per_task"] for result in measured)
    passed = worst <= _COMMANDS_BOUND_PER_TASK + 0.05
    verdicts.append(
        _Verdict(
            f"client commands per task, {first['processes']} to {last['processes']} processes: "
            f"<= {_COMMANDS_BOUND_PER_TASK:g} (one acquire, one wake-up, one release) at every "
            f"fleet size",
            f"{worst:.2f}",
            passed,
        )
    )
    print(
        f"\nFrom {first['processes']} to {last['processes']} processes: {growth:.2f}x; the most "
        f"is {worst:.2f} commands per task (bound {_COMMANDS_BOUND_PER_TASK:g}: batching saves "
        f"less when fewer slots per process are free at once) {_verdict(passed)}"
    )
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
        f"(max_at_once=1, slot held {_HANDOFF_HOLD_SECONDS * 1000:g} ms)"
    )
    rounds = settings.handoff_rounds
    specs = [
        {"kind": "handoff", "url": url, "name": "handoff", "role": role, "rounds": rounds}
        for role in (0, 1)
    ]
    limiter_results, raw_results = await _run_stages(pool, specs, stages=2)
    holds = sorted(
        (acquired, released, role)
        for role, result in enumerate(limiter_results)
        for acquired, released in result["holds"]
    )
    # A handoff is a hold that follows one of the other process; the last holds of the
    # process that finishes second follow its own and are not handoffs.
    handoffs = [
        later[0] - earlier[1]
        for earlier, later in itertools.pairwise(holds)
        if earlier[2] != later[2]
    ]
    overlaps = sum(1 for latency in handoffs if latency < 0)
    raw = [latency for result in raw_results for latency in result["latencies"]]
    limiter_summary = _latency_summary(handoffs)
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
            ("RedisLimiter: release() -> acquire() returns", limiter_summary),
            ("floor: RPUSH -> BLPOP returns", raw_summary),
        )
    ]
    print(_table(["handoff", "samples", "p50 ms", "p99 ms", "max ms"], rows))
    ratio = limiter_summary["p50_ms"] / raw_summary["p50_ms"]
    passed = limiter_summary["p50_ms"] <= _TARGET_HANDOFF_P50_MS
    print(
        f"\np50 vs floor: {ratio:.1f}x; overlapping holds (must be 0): {overlaps}; "
        f"p50 target <= {_TARGET_HANDOFF_P50_MS:g} ms {_verdict(passed)}"
    )
    verdicts.append(
        _Verdict(
            f"handoff p50 <= {_TARGET_HANDOFF_P50_MS:g} ms",
            f"{limiter_summary['p50_ms']:.3f} ms",
            passed,
        )
    )
    return {
        "limiter": limiter_summary,
        "raw_floor": raw_summary,
        "p50_vs_floor": ratio,
        "overlapping_holds": overlaps,
    }


async def _cpu_seconds(client: redis.asyncio.Redis) -> float:
    """The server's own CPU time so far (user + system, all its threads)."""
    info: dict[str, Any] = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, idle) CPU seconds of the whole machine, all processes, from /proc/stat (Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    ticks = [int(value) for value in fields[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    # guest time is already counted in user time
    busy = sum(ticks[:8]) - idle
    hertz = os.sysconf("SC_CLK_TCK")
    return busy / hertz, idle / hertz


def _script_calls(stats: _CommandStats) -> int:
    return sum(stats.calls[name] for name in _SCRIPT_COMMANDS)


class _ClusterSnapshot:
    """Command counts and CPU time of the single server and of each primary, when awaited."""

    def __init__(self, single: redis.asyncio.Redis, nodes: Sequence[redis.asyncio.Redis]) -> None:
        self._clients = [single, *nodes]
        self.stats: list[_CommandStats] = []
        self.cpu: list[float] = []
        self.load_average = 0.0
        self.machine: tuple[float, float] | None = None
        self.time = 0.0

    async def __call__(self) -> None:
        self.stats = [await _CommandStats.read(client) for client in self._clients]
        self.cpu = [await _cpu_seconds(client) for client in self._clients]
        self.load_average = os.getloadavg()[0]
        self.machine = _machine_cpu_seconds()
        self.time = time.monotonic()


async def _owners(node: redis.asyncio.Redis, names: Sequence[str]) -> dict[str, int]:
    """The port of the primary that owns each limiter's slot (the hash tag is the name)."""
    untyped: Any = node  # redis-py leaves execute_command untyped
    ranges = [
        (int(first), int(last), int(primary[1]))
        for first, last, primary, *_ in await untyped.execute_command("CLUSTER", "SLOTS")
    ]
    owners: dict[str, int] = {}
    for name in names:
        slot = key_slot(limiter_keys(name)[0].encode())
        owners[name] = next(port for first, last, port in ranges if first <= slot <= last)
    return owners


def _cluster_phases(rounds: int) -> list[str]:
    # Interleaved: every round runs each variant on both backends, back to back, and the
    # backend that goes first alternates from round to round.
    phases: list[str] = []
    for index in range(rounds):
        backends = (_SINGLE, _CLUSTER) if index % 2 == 0 else (_CLUSTER, _SINGLE)
        phases += [f"{backend}/{variant}" for variant in _CLUSTER_VARIANTS for backend in backends]
    return phases


@dataclass
class _Stage:
    """One interleaved single/cluster stage of section 4: the workers' counts and CPU per
    phase, and the servers' counters before and after."""

    label: str
    processes: int
    phases: list[str]
    seconds: float
    results: list[Result]
    before: _ClusterSnapshot
    after: _ClusterSnapshot

    def rates(self) -> dict[str, list[float]]:
        """Acquisitions per second of every phase, round by round."""
        rates: dict[str, list[float]] = {}
        for index, phase in enumerate(self.phases):
            done = sum(result["counts"][index] for result in self.results)
            rates.setdefault(phase, []).append(done / self.seconds)
        return rates

    def _indices(self, backend: str) -> list[int]:
        return [i for i, phase in enumerate(self.phases) if phase.startswith(backend + "/")]

    def wall(self, backend: str) -> float:
        return self.seconds * len(self._indices(backend))

    def done(self, backend: str) -> int:
        return sum(int(r["counts"][i]) for r in self.results for i in self._indices(backend))

    def client_cpu(self, backend: str) -> float:
        return sum(float(r["cpu"][i]) for r in self.results for i in self._indices(backend))

    def server_cpu(self, backend: str) -> float:
        # The single server is index 0 of the snapshots, the primaries follow.
        pairs = zip(self.after.cpu, self.before.cpu, strict=True)
        deltas = [later - earlier for later, earlier in pairs]
        return deltas[0] if backend == _SINGLE else sum(deltas[1:])

    def script_calls(self) -> list[int]:
        """Script calls on the single server, then on each primary, over the stage."""
        pairs = zip(self.after.stats, self.before.stats, strict=True)
        return [_script_calls(later - earlier) for later, earlier in pairs]

    def server_cores(self, backend: str) -> float:
        return self.server_cpu(backend) / self.wall(backend)


async def _interleaved_stage(
    pool: _Pool,
    label: str,
    specs: list[Spec],
    single: redis.asyncio.Redis,
    nodes: Sequence[redis.asyncio.Redis],
) -> _Stage:
    before = _ClusterSnapshot(single, nodes)
    after = _ClusterSnapshot(single, nodes)
    (results,) = await _run_stages(pool, specs, before_start=before)
    await after()
    spec = specs[0]
    return _Stage(label, len(specs), spec["phases"], spec["seconds"], results, before, after)


def _ratio_rows(stage: _Stage, verdicts: list[_Verdict]) -> list[Result]:
    """Print cluster vs single per variant; judge the no-loss target where it applies.

    Sharding adds throughput only where one server is the bottleneck. A stage whose single
    server stayed below ``_SERVER_BOUND_CORES`` busy was limited by its clients: its ratio is
    printed and kept in the JSON, but not judged.
    """
    rates = stage.rates()
    single_cores = stage.server_cores(_SINGLE)
    server_bound = single_cores >= _SERVER_BOUND_CORES
    rows: list[list[str]] = []
    workloads: list[Result] = []
    for variant in _CLUSTER_VARIANTS:
        single_rates = rates[f"{_SINGLE}/{variant}"]
        cluster_rates = rates[f"{_CLUSTER}/{variant}"]
        ratio = statistics.fmean(cluster_rates) / statistics.fmean(single_rates)
        by_round = [c / s for s, c in zip(single_rates, cluster_rates, strict=True)]
        passed = ratio >= _TARGET_CLUSTER_RATIO if server_bound else None
        rows.append(
            [
                variant,
                f"{statistics.fmean(single_rates):,.0f}",
                f"{statistics.fmean(cluster_rates):,.0f}",
                f"{ratio:.2f}x",
                f"{min(by_round):.2f}-{max(by_round):.2f}",
                f"{single_cores:.2f}",
                f">= {_TARGET_CLUSTER_RATIO:.1f}x",
                "client-bound" if passed is None else _verdict(passed),
            ]
        )
        if passed is not None:
            verdicts.append(
                _Verdict(
                    f"cluster {variant}, {len(_CLUSTER_LIMITERS)} limiters, {stage.label}: "
                    f">= {_TARGET_CLUSTER_RATIO:.1f}x single",
                    f"{ratio:.2f}x",
                    passed,
                )
            )
        workloads.append(
            {
                "workload": variant,
                "single_ops_per_second": statistics.fmean(single_rates),
                "cluster_ops_per_second": statistics.fmean(cluster_rates),
                "single_ops_per_second_by_round": single_rates,
                "cluster_ops_per_second_by_round": cluster_rates,
                "ratio": ratio,
                "ratio_by_round": by_round,
                "single_server_cores": single_cores,
                "server_bound": server_bound,
                "target_ratio": _TARGET_CLUSTER_RATIO,
                "passed": passed,
            }
        )
    headers = [
        "workload",
        "single ops/s",
        "cluster ops/s",
        "ratio",
        "range",
        "single server cores",
        "target",
        "result",
    ]
    print(_table(headers, rows))
    return workloads


def _cpu_rows(stage: _Stage) -> dict[str, Result]:
    """Print and return where the CPU went, per backend, over one stage."""
    calls = stage.script_calls()
    script_calls = {_SINGLE: calls[0], _CLUSTER: sum(calls[1:])}
    report: dict[str, Result] = {}
    rows: list[list[str]] = []
    for backend in (_SINGLE, _CLUSTER):
        wall, done = stage.wall(backend), max(stage.done(backend), 1)
        entry = {
            "client_cpu_cores": stage.client_cpu(backend) / wall,
            "server_cpu_cores": stage.server_cpu(backend) / wall,
            "client_cpu_us_per_op": stage.client_cpu(backend) / done * 1e6,
            "server_cpu_us_per_op": stage.server_cpu(backend) / done * 1e6,
            "script_calls_per_op": script_calls[backend] / done,
        }
        report[backend] = entry
        rows.append(
            [
                backend,
                f"{entry['client_cpu_cores']:.2f}",
                f"{entry['server_cpu_cores']:.2f}",
                f"{entry['client_cpu_us_per_op']:.0f}",
                f"{entry['server_cpu_us_per_op']:.1f}",
                f"{entry['script_calls_per_op']:.2f}",
            ]
        )
    headers = [
        "backend",
        "client cores",
        "server cores",
        "client CPU us/op",
        "server CPU us/op",
        "script calls/op",
    ]
    print(_table(headers, rows))
    return report


def _machine_report(stage: _Stage) -> Result | None:
    """The whole machine over a stage (phases, gaps and the workers' wind-down): whatever is
    busy beyond this benchmark's own processes is someone else's load."""
    before, after = stage.before, stage.after
    if before.machine is None or after.machine is None:
        return None
    window = after.time - before.time
    busy = after.machine[0] - before.machine[0]
    idle = after.machine[1] - before.machine[1]
    ours = sum(stage.client_cpu(b) + stage.server_cpu(b) for b in (_SINGLE, _CLUSTER))
    machine = {
        "window_seconds": window,
        "busy_cores": busy / window,
        "idle_cores": idle / window,
        "benchmark_cores": ours / window,
        "other_cores": max(0.0, busy - ours) / window,
        "load_average_before": before.load_average,
        "load_average_after": after.load_average,
    }
    print(
        f"\nWhole machine over the {window:.1f} s stage (/proc/stat): "
        f"{machine['busy_cores']:.2f} cores busy, {machine['idle_cores']:.2f} idle; "
        f"this benchmark's clients + servers {machine['benchmark_cores']:.2f}, "
        f"other processes ~{machine['other_cores']:.2f}; load average (1 min) "
        f"{before.load_average:.2f} before, {after.load_average:.2f} after"
    )
    return machine


def _share_rows(
    stage: _Stage, owners: dict[str, int], ports: Sequence[int], verdicts: list[_Verdict]
) -> Result:
    """Print and judge each primary's share of the limiters' script calls."""
    node_calls = stage.script_calls()[1:]
    total = sum(node_calls)
    shares = [calls / total if total else 0.0 for calls in node_calls]
    even = 1 / len(ports)
    low, high = even * (1 - _TARGET_SHARE_TOLERANCE), even * (1 + _TARGET_SHARE_TOLERANCE)
    passed = bool(shares) and all(low <= share <= high for share in shares)
    limiters_per_node = Counter(owners.values())
    rows = [
        [
            f"127.0.0.1:{port}",
            str(limiters_per_node[port]),
            f"{calls:,}",
            f"{share:.3f}",
            _verdict(low <= share <= high),
        ]
        for port, calls, share in zip(ports, node_calls, shares, strict=True)
    ]
    print(
        f"Script calls (EVALSHA + EVAL) per primary, {stage.label}; target: each share in "
        f"[{low:.3f}, {high:.3f}]\n"
    )
    print(_table(["primary", "limiters", "script calls", "share", "result"], rows))
    verdicts.append(
        _Verdict(
            f"cluster: every shard's share of script calls in [{low:.3f}, {high:.3f}]",
            ", ".join(f"{share:.3f}" for share in shares),
            passed,
        )
    )
    return {
        "shards": [
            {"port": port, "limiters": limiters_per_node[port], "script_calls": calls, "share": x}
            for port, calls, x in zip(ports, node_calls, shares, strict=True)
        ],
        "share_bounds": [low, high],
        "shares_passed": passed,
    }


async def _cluster(
    pool: _Pool,
    single_url: str,
    single: redis.asyncio.Redis,
    settings: _Settings,
    verdicts: list[_Verdict],
) -> Result:
    processes, coroutines = _CLUSTER_PROCESSES, _CLUSTER_COROUTINES_PER_PROCESS
    seconds = settings.cluster_phase_seconds
    _section(
        "4. Cluster: one redis-server vs a 3-primary Redis Cluster, same run\n"
        f"{len(_CLUSTER_LIMITERS)} limiters ({_CLUSTER_LIMITERS[0]}..{_CLUSTER_LIMITERS[-1]}); "
        f"concurrency-only: max_at_once={_CLUSTER_MAX_AT_ONCE}; "
        f"rate-only: max_per_second={_FAST_RATE:g};\n"
        f"{settings.cluster_rounds} interleaved round(s) of {seconds:g} s per phase. "
        f"A stage is judged only if its single server was the bottleneck\n"
        f"(>= {_SERVER_BOUND_CORES} cores busy); otherwise its clients were, and sharding "
        f"has nothing to add."
    )
    if find_redis_cli() is None:
        print("skipped: redis-cli (for redis-cli --cluster create) is not installed")
        return {"skipped": "redis-cli not found"}
    cluster = RedisCluster3()
    await anyio.to_thread.run_sync(cluster.start)
    ports = list(cluster.ports)  # stop() clears them
    nodes = [redis.asyncio.Redis(host=host, port=port) for host, port in cluster.startup_nodes]
    parsed = urllib.parse.urlsplit(single_url)
    single_address = [parsed.hostname, parsed.port]
    try:
        owners = await _owners(nodes[0], _CLUSTER_LIMITERS)
        for node in nodes:
            for script in all_scripts().values():
                await node.script_load(script.source)
        phases = _cluster_phases(settings.cluster_rounds)
        common = {"url": single_url, "names": list(_CLUSTER_LIMITERS), "phases": phases}
        fleet = await _interleaved_stage(
            pool,
            f"redis-py fleet ({processes} processes x {coroutines} coroutines)",
            [
                {
                    **common,
                    "kind": "cluster",
                    "cluster_url": cluster.url,
                    "prefix": "clusterbench",
                    "offset": index * len(_CLUSTER_LIMITERS) // processes,
                    "coroutines": coroutines,
                    "seconds": seconds,
                }
                for index in range(processes)
            ],
            single,
            nodes,
        )
        capacity_owners = {
            _SINGLE: dict.fromkeys(_CLUSTER_LIMITERS, single_address),
            _CLUSTER: {name: ["127.0.0.1", port] for name, port in owners.items()},
        }
        capacity = await _interleaved_stage(
            pool,
            f"pipelined ({_CAPACITY_PROCESSES} processes, bench/_resp.py)",
            [
                {
                    **common,
                    "kind": "capacity",
                    "prefix": "capacitybench",
                    "owners": capacity_owners,
                    "depth": _CAPACITY_DEPTH,
                    "seconds": seconds,
                }
                for _ in range(_CAPACITY_PROCESSES)
            ],
            single,
            nodes,
        )
    finally:
        for node in nodes:
            await node.aclose()
        await anyio.to_thread.run_sync(cluster.stop)

    stages: dict[str, Result] = {}
    for key, stage, how in [
        (
            "fleet",
            fleet,
            "acquire + release through RedisLimiter over redis.asyncio.Redis / RedisCluster "
            f"(max_connections={_CLUSTER_MAX_CONNECTIONS}); each coroutine takes the next "
            "limiter of its process's rotation",
        ),
        (
            "pipelined",
            capacity,
            "the same limiters' acquire.lua (+ release.lua) calls, byte for byte, pipelined "
            f"{_CAPACITY_DEPTH} deep over raw sockets by a lean client, so that the servers "
            "rather than Python are the limit",
        ),
    ]:
        print(f"\n{stage.label}: {how}.\n")
        workloads = _ratio_rows(stage, verdicts)
        print()
        cpu = _cpu_rows(stage)
        machine = _machine_report(stage)
        print()
        shares = _share_rows(stage, owners, ports, verdicts) if key == "fleet" else {}
        stages[key] = {
            "processes": stage.processes,
            "workloads": workloads,
            "cpu": cpu,
            "machine": machine,
            **shares,
        }
    return {
        "limiters": len(_CLUSTER_LIMITERS),
        "rounds": settings.cluster_rounds,
        "phase_seconds": seconds,
        "cpus": os.cpu_count(),
        **stages,
    }


async def _bench(quick: bool) -> Result:
    settings = _QUICK if quick else _FULL
    started = time.monotonic()
    verdicts: list[_Verdict] = []
    with RedisServer() as server:
        pool = _Pool(max(*_THROUGHPUT_PROCESSES, *_CONTENTION_PROCESSES))
        stats_client = redis.asyncio.Redis.from_url(server.url)
        try:
            await _blocking(pool.wait_ready)
            server_info: dict[str, Any] = await stats_client.info("server")
            for script in all_scripts().values():
                await stats_client.script_load(script.source)
            environment = {
                "mode": "quick" if quick else "full",
                "redis_server": server_info["redis_version"],
                "python": platform.python_version(),
                "redis_py": importlib.metadata.version("redis"),
                "cpus": os.cpu_count(),
                "load_average_at_start": os.getloadavg()[0],
            }
            print(
                f"RedisLimiter benchmark ({environment['mode']}): "
                f"redis-server {environment['redis_server']}, Python {environment['python']}, "
                f"redis-py {environment['redis_py']}, {environment['cpus']} CPUs, "
                f"load average {environment['load_average_at_start']:.2f}"
            )
            throughput = await _throughput(pool, server.url, stats_client, settings, verdicts)
            contention = await _contention(pool, server.url, stats_client, settings, verdicts)
            handoff = await _handoff(pool, server.url, settings, verdicts)
            cluster = await _cluster(pool, server.url, stats_client, settings, verdicts)
        finally:
            await stats_client.aclose()
            await anyio.to_thread.run_sync(pool.close)
    elapsed = time.monotonic() - started
    _section("Summary")
    print(
        _table(
            ["target", "measured", "result"],
            [[v.target, v.measured, _verdict(v.passed)] for v in verdicts],
        )
    )
    print(
        f"\n{sum(v.passed for v in verdicts)} of {len(verdicts)} targets met in {elapsed:.0f} s\n"
    )
    return {
        "environment": environment,
        "throughput": throughput,
        "commands_per_task": contention,
        "handoff": handoff,
        "cluster": cluster,
        "targets": [
            {"target": v.target, "measured": v.measured, "passed": v.passed} for v in verdicts
        ],
        "seconds": elapsed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="RedisLimiter vs raw Redis round trips.")
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run")
    parser.add_argument("--json", metavar="FILE", type=Path, help="also write the JSON to FILE")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        anyio.run(_serve, backend="asyncio")
        return 0
    document = anyio.run(_bench, args.quick, backend="asyncio")
    text = json.dumps(document, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
