"""RedisLimiter on one redis-server against a three-shard Redis Cluster, in the same run.

Run ``python bench/redis_cluster.py`` (about 30 s) or ``python bench/redis_cluster.py --quick``;
``--json FILE`` also writes the final JSON document to FILE. The script starts its own
``redis-server`` and cluster (:class:`aiometer_redis.testing.RedisCluster3`) on loopback.

100 limiters (``site-0`` .. ``site-99``) on a single redis-server against the same 100 on a
three-primary Redis Cluster, in two stages whose single and cluster phases alternate in
interleaved rounds; each stage has a *concurrency-only* (``max_at_once=1000``, never waits:
acquire + release) and a *rate-only* variant (one acquire call). ``INFO cpu`` on every server
gives its busy cores.

- *redis-py fleet*: 4 processes of 32 coroutines loop on acquire + release through
  ``RedisLimiter`` over ``redis.asyncio.Redis`` and ``redis.asyncio.RedisCluster``
  (``max_connections=512``), each coroutine taking the next limiter of its process's rotation.
  ``INFO commandstats`` on each primary gives each shard's share of the script calls.
  Target: every share within 30 % of an even third.
- *pipelined*: 3 processes send the same limiters' script calls, byte for byte (the limiter's
  own keys and arguments, fresh ids), pipelined 128 deep over raw sockets by the lean client in
  ``bench/_resp.py``, so that the servers rather than Python are the limit.

Target: cluster >= 1.0x single (no loss of aggregate throughput). Sharding can only add
throughput where one server is the bottleneck, so a stage is judged only if its single server
was busy for at least 0.8 of a core; a stage limited by its clients' CPU (as the redis-py fleet
is on a small machine) is printed, with where the CPU went, but not judged.

The exit status is 0 whatever the verdicts.
"""

from __future__ import annotations

import functools
import itertools
import os
import statistics
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import redis.asyncio
from redis.crc import key_slot

from aiometer_redis import RedisLimiter
from aiometer_redis._keys import limiter_keys
from aiometer_redis._scripts import all_scripts
from aiometer_redis.testing import RedisCluster3, find_redis_cli

# Run as a script, this file's directory (bench/) is on sys.path, the repository root is not.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench._common import (
    _FAST_RATE,
    Result,
    Spec,
    Worker,
    _CommandStats,
    _count_completions,
    _cpu_seconds,
    _cycle,
    _machine_cpu_seconds,
    _Pool,
    _run_stages,
    _section,
    _Settings,
    _stage_result,
    _table,
    _timed_phases,
    _Verdict,
    _verdict,
    _warm_up,
    run,
)
from bench._resp import Connection, LimiterCall, Shard, run_pipelined

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


async def _next_cycle(rotation: Iterator[RedisLimiter]) -> None:
    await _cycle(next(rotation))


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


async def _sections(
    pool: _Pool,
    url: str,
    stats_client: redis.asyncio.Redis,
    settings: _Settings,
    verdicts: list[_Verdict],
) -> Result:
    return {"cluster": await _cluster(pool, url, stats_client, settings, verdicts)}


_WORKERS: dict[str, Worker] = {
    "cluster": _cluster_worker,
    "capacity": _capacity_worker,
}


def main(argv: Sequence[str] | None = None) -> int:
    return run(
        argv,
        title="RedisLimiter on one server vs a three-shard cluster",
        script=__file__,
        workers=_WORKERS,
        pool_size=max(_CLUSTER_PROCESSES, _CAPACITY_PROCESSES),
        sections=_sections,
    )


if __name__ == "__main__":
    sys.exit(main())
