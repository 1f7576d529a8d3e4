"""What the Redis benchmarks share: worker processes, stages, tables, verdicts and the run.

``bench/redis_limiter.py`` (one server) and ``bench/redis_cluster.py`` (one server against a
three-shard cluster) each re-invoke themselves as a pool of worker processes (hidden
``--worker`` argument) that start each measurement together at a shared wall-clock time; the
coordinator and the workers talk over the workers' stdin and stdout, one JSON line at a time.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import redis.asyncio

from aiometer_redis import RedisLimiter
from aiometer_redis._client import RedisPyClient, ScriptArg
from aiometer_redis._scripts import Script, all_scripts, script_dir
from aiometer_redis.testing import RedisServer
from bench._resp import LimiterCall

# Above every rate the benchmarks reach: a rate-only limiter that never waits.
_FAST_RATE = 1e9
_READY = "READY"
_START_LEAD_SECONDS = 0.3
_PHASE_GAP_SECONDS = 0.15
_WORKER_TIMEOUT_SECONDS = 120.0
_BLPOP_TIMEOUT_SECONDS = 5.0
Spec = dict[str, Any]
Result = dict[str, Any]


@dataclass(frozen=True)
class _Settings:
    rounds: int
    phase_seconds: float
    contention_tasks: int  # in total, split evenly over the processes
    fleet_tasks: int  # section 2's issue fleet: in total, split evenly over the processes
    handoff_rounds: int  # per process
    cluster_rounds: int
    cluster_phase_seconds: float


_FULL = _Settings(
    rounds=4,
    phase_seconds=0.75,
    contention_tasks=1600,
    fleet_tasks=1200,
    handoff_rounds=200,
    cluster_rounds=3,
    cluster_phase_seconds=1.0,
)
_QUICK = _Settings(
    rounds=1,
    phase_seconds=0.4,
    contention_tasks=400,
    fleet_tasks=320,
    handoff_rounds=50,
    cluster_rounds=1,
    cluster_phase_seconds=0.5,
)


@dataclass(frozen=True)
class _Verdict:
    target: str
    measured: str
    passed: bool


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
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[ScriptArg],
        *,
        wake_first: bool = False,
    ) -> Any:
        self.calls[script.name] += 1
        if wake_first:
            self.calls["ping (in front of a script call)"] += 1
        return await super().run_script(script, keys, args, wake_first=wake_first)

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


async def _warm_up(operation: Callable[[], Awaitable[object]], coroutines: int, calls: int) -> None:
    """*calls* operations spread over *coroutines* concurrent loops (opens the connections)."""

    async def loop(count: int) -> None:
        for _ in range(count):
            await operation()

    async with anyio.create_task_group() as task_group:
        for _ in range(coroutines):
            task_group.start_soon(loop, math.ceil(calls / coroutines))


class _Pool:
    """Worker processes running *script* (with ``--worker``), reused by every measurement
    (blocking calls).

    Starting the processes once keeps interpreter start-up out of the run time and keeps
    processes that are still importing off the CPU while another measurement runs.
    """

    def __init__(self, size: int, script: Path) -> None:
        command = [sys.executable, str(script), "--worker"]
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
    """Lower-case names of every command the Lua scripts run through ``redis.call`` or
    ``redis.pcall``."""
    pattern = re.compile(r"redis\.p?call\(\s*'(\w+)'")
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


Worker = Callable[[redis.asyncio.Redis, Spec], Awaitable[None]]
Sections = Callable[[_Pool, str, redis.asyncio.Redis, _Settings, list[_Verdict]], Awaitable[Result]]


async def _serve(workers: dict[str, Worker]) -> None:
    """Worker process: run one spec per line of stdin, until stdin closes."""
    print(_READY, flush=True)
    while line := await anyio.to_thread.run_sync(sys.stdin.readline):
        spec: Spec = json.loads(line)
        # What the worker holds before a spec (its imports, the leftovers of the sections
        # before) is moved out of the cyclic collector's reach, as pre-fork servers do after
        # start-up: a full collection would otherwise scan it all and stall the worker for
        # several ms mid-measurement (tens of ms of wall time with 8 workers on 2 cores).
        gc.collect()
        gc.freeze()
        client = redis.asyncio.Redis.from_url(spec["url"])
        try:
            await workers[spec["kind"]](client, spec)
        finally:
            await client.aclose()


async def _bench(
    title: str, script: Path, pool_size: int, sections: Sections, quick: bool
) -> Result:
    settings = _QUICK if quick else _FULL
    started = time.monotonic()
    verdicts: list[_Verdict] = []
    with RedisServer() as server:
        pool = _Pool(pool_size, script)
        stats_client = redis.asyncio.Redis.from_url(server.url)
        try:
            await _blocking(pool.wait_ready)
            server_info: dict[str, Any] = await stats_client.info("server")
            for loaded in all_scripts().values():
                await stats_client.script_load(loaded.source)
            environment = {
                "mode": "quick" if quick else "full",
                "redis_server": server_info["redis_version"],
                "python": platform.python_version(),
                "redis_py": importlib.metadata.version("redis"),
                "cpus": os.cpu_count(),
                "load_average_at_start": os.getloadavg()[0],
            }
            print(
                f"{title} ({environment['mode']}): "
                f"redis-server {environment['redis_server']}, Python {environment['python']}, "
                f"redis-py {environment['redis_py']}, {environment['cpus']} CPUs, "
                f"load average {environment['load_average_at_start']:.2f}"
            )
            measured = await sections(pool, server.url, stats_client, settings, verdicts)
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
        **measured,
        "targets": [
            {"target": v.target, "measured": v.measured, "passed": v.passed} for v in verdicts
        ],
        "seconds": elapsed,
    }


def run(
    argv: Sequence[str] | None,
    *,
    title: str,
    script: str,
    workers: dict[str, Worker],
    pool_size: int,
    sections: Sections,
) -> int:
    """The command line of one benchmark script (``--quick``, ``--json FILE``)."""
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--quick", action="store_true", help="a shorter smoke run")
    parser.add_argument("--json", metavar="FILE", type=Path, help="also write the JSON to FILE")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        anyio.run(_serve, workers, backend="asyncio")
        return 0
    path = Path(script).resolve()
    document = anyio.run(_bench, title, path, pool_size, sections, args.quick, backend="asyncio")
    text = json.dumps(document, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0
