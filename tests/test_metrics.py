"""In-process metrics (``RedisLimiter(..., metrics=...)``): off by default and never imported
then; on, they count exactly what happened (acquisitions, waits, errors, lost leases, fallbacks)
against a real redis-server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from helpers.tcp_proxy import TcpProxy, script_rule
from prometheus_client import CollectorRegistry, generate_latest

import aiometer
from aiometer_redis import AcquireTimeoutError, LimiterConfig, RedisLimiter, RedisLimiterGroup
from aiometer_redis._scripts import load_script
from aiometer_redis.testing import RedisServer

pytestmark = pytest.mark.redis


def value(registry: CollectorRegistry, metric: str, limiter: str, **labels: str) -> float:
    """The sample *metric* of *limiter* (0.0 if the series does not exist)."""
    found = registry.get_sample_value(metric, {"limiter": limiter, **labels})
    return 0.0 if found is None else found


async def wait_until(check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    with anyio.move_on_after(timeout) as scope:
        while not check():
            await anyio.sleep(0.005)
    assert not scope.cancelled_caught, f"{what or 'the condition'} within {timeout:g} s"


# -- off, and the argument ---------------------------------------------------------------------


def test_importing_the_package_does_not_import_prometheus_client() -> None:
    code = (
        "import sys, aiometer_redis\n"
        "from aiometer_redis import RedisLimiter\n"
        "RedisLimiter.from_url('redis://127.0.0.1:1/0', 'x', max_at_once=1)\n"
        "print('prometheus_client' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("metrics", ["yes", 1, object()])
def test_metrics_of_the_wrong_type_are_refused(metrics: object) -> None:
    with pytest.raises(TypeError, match="metrics must be True, False or a prometheus_client"):
        RedisLimiter.from_url("redis://127.0.0.1:1/0", "x", max_at_once=1, metrics=metrics)
    with pytest.raises(TypeError, match="metrics must be"):
        LimiterConfig(max_at_once=1, metrics=metrics)


@pytest.mark.anyio
async def test_metrics_off_registers_nothing(server: RedisServer, name: str) -> None:
    registry = CollectorRegistry()
    before = generate_latest(registry)
    async with (
        RedisLimiter.from_url(server.url, name, max_at_once=1) as limiter,
        limiter.slot(),
    ):
        pass
    assert generate_latest(registry) == before
    assert name.encode() not in generate_latest()


@pytest.mark.anyio
async def test_metrics_true_reports_to_the_default_registry(server: RedisServer, name: str) -> None:
    from prometheus_client import REGISTRY

    async with (
        RedisLimiter.from_url(server.url, name, max_at_once=1, metrics=True) as limiter,
        limiter.slot(),
    ):
        pass
    assert value(REGISTRY, "aiometer_acquisitions_total", name, source="redis") == 1


# -- counting ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_acquisitions_waits_held_and_waiting_are_exact(
    server: RedisServer, name: str
) -> None:
    registry = CollectorRegistry()
    async with RedisLimiter.from_url(
        server.url, name, max_at_once=2, lease_ttl=5, metrics=registry
    ) as limiter:
        first = await limiter.acquire()
        second = await limiter.acquire()
        assert value(registry, "aiometer_held", name) == 2
        assert value(registry, "aiometer_waiting", name) == 0
        async with anyio.create_task_group() as group:
            taken: list[Any] = []

            async def third() -> None:
                taken.append(await limiter.acquire())

            group.start_soon(third)
            await wait_until(lambda: value(registry, "aiometer_waiting", name) == 1, what="waiting")
            await anyio.sleep(0.2)
            await first.release()
        assert value(registry, "aiometer_waiting", name) == 0
        assert value(registry, "aiometer_held", name) == 2
        await first.release()  # idempotent: counted once
        await second.release()
        await taken[0].release()
        assert value(registry, "aiometer_held", name) == 0

        async def task(_: int) -> None:
            await anyio.sleep(0.01)

        await aiometer.run_on_each(task, range(20), limiter=limiter)
    assert value(registry, "aiometer_acquisitions_total", name, source="redis") == 23
    assert value(registry, "aiometer_acquisitions_total", name, source="fallback") == 0
    assert value(registry, "aiometer_wait_seconds_count", name) == 23
    # The third waited at least the 0.2 s before the first was released.
    assert value(registry, "aiometer_wait_seconds_bucket", name, le="0.1") <= 22
    assert value(registry, "aiometer_wait_seconds_sum", name) >= 0.2
    assert value(registry, "aiometer_held", name) == 0
    calls = value(registry, "aiometer_redis_call_seconds_count", name, script="acquire")
    assert calls >= 1
    assert value(registry, "aiometer_redis_errors_total", name, error="unavailable") == 0


@pytest.mark.anyio
async def test_timeouts_count_as_errors_not_acquisitions(server: RedisServer, name: str) -> None:
    registry = CollectorRegistry()
    async with (
        RedisLimiter.from_url(
            server.url, name, max_at_once=1, acquire_timeout=0.2, metrics=registry
        ) as limiter,
        limiter.slot(),
    ):
        for _ in range(3):
            with pytest.raises(AcquireTimeoutError):
                await limiter.acquire()
    errors = value(registry, "aiometer_acquire_errors_total", name, error="AcquireTimeoutError")
    assert errors == 3
    assert value(registry, "aiometer_acquisitions_total", name, source="redis") == 1
    assert value(registry, "aiometer_wait_seconds_count", name) == 1
    assert value(registry, "aiometer_waiting", name) == 0
    assert value(registry, "aiometer_held", name) == 0


@pytest.mark.anyio
async def test_cancelled_acquisitions_leave_the_gauges_at_zero(
    server: RedisServer, name: str
) -> None:
    registry = CollectorRegistry()
    async with RedisLimiter.from_url(
        server.url, name, max_at_once=1, max_per_second=20, metrics=registry
    ) as limiter:
        for delay in (0.0, 0.001, 0.01, 0.03, 0.06):
            with anyio.move_on_after(delay):
                async with limiter.slot():
                    await anyio.sleep(0.02)
        await wait_until(limiter.is_idle, what="idle")
    assert value(registry, "aiometer_held", name) == 0
    assert value(registry, "aiometer_waiting", name) == 0
    acquired = value(registry, "aiometer_acquisitions_total", name, source="redis")
    assert acquired == value(registry, "aiometer_wait_seconds_count", name)


@pytest.mark.anyio
async def test_objects_of_one_name_add_up_and_names_stay_apart(
    server: RedisServer, name: str
) -> None:
    registry = CollectorRegistry()
    other = name + "-other"
    async with (
        RedisLimiter.from_url(server.url, name, max_at_once=5, metrics=registry) as a,
        RedisLimiter.from_url(server.url, name, max_at_once=5, metrics=registry) as b,
        RedisLimiter.from_url(server.url, other, max_per_second=100, metrics=registry) as c,
    ):
        permits = [await a.acquire(), await a.acquire(), await b.acquire(), await c.acquire()]
        assert value(registry, "aiometer_held", name) == 3
        assert value(registry, "aiometer_held", other) == 1
        for permit in permits:
            await permit.release()
    assert value(registry, "aiometer_acquisitions_total", name, source="redis") == 3
    assert value(registry, "aiometer_acquisitions_total", other, source="redis") == 1
    assert value(registry, "aiometer_held", name) == 0


@pytest.mark.anyio
async def test_group_limiters_report_per_key(raw: Any, name: str) -> None:
    registry = CollectorRegistry()
    async with RedisLimiterGroup(raw, max_at_once=2, prefix=name, metrics=registry) as group:
        for key in ("a", "b", "b"):
            async with group[key].slot():
                pass
    found = {
        sample.labels["limiter"]: sample.value
        for family in registry.collect()
        if family.name == "aiometer_acquisitions"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["source"] == "redis"
    }
    assert sorted(found.values()) == [1, 2], found


@pytest.mark.anyio
async def test_lost_leases_are_counted(server: RedisServer, name: str, raw: Any) -> None:
    """Every lease deleted under the holders is counted once, by the first renewal that
    finds it gone (as ``statistics().leases_lost`` counts it)."""
    registry = CollectorRegistry()
    lease_ttl = 0.6
    async with RedisLimiter.from_url(
        server.url, name, max_at_once=3, lease_ttl=lease_ttl, metrics=registry
    ) as limiter:
        permits = [await limiter.acquire() for _ in range(3)]
        await raw.delete([limiter.keys[0]] if _is_coredis(raw) else limiter.keys[0])
        await wait_until(
            lambda: value(registry, "aiometer_leases_lost_total", name) == 3,
            timeout=lease_ttl * 3,
            what="3 leases lost",
        )
        # Two more renewals: still exactly three.
        await anyio.sleep(2 * lease_ttl / 3 + 0.1)
        assert value(registry, "aiometer_leases_lost_total", name) == 3
        assert (await limiter.statistics()).leases_lost == 3
        for permit in permits:
            assert permit.lost
            await permit.release()
    assert value(registry, "aiometer_held", name) == 0


def _is_coredis(client: Any) -> bool:
    return type(client).__module__.startswith("coredis")


@pytest.mark.anyio
async def test_fallbacks_are_counted_while_redis_is_frozen(name: str) -> None:
    """The scenario of test_faults' local fallback: Redis frozen, permits from the
    in-process fallback, Redis back. Counted: one fallback, the fallback permits, the
    unanswered calls, the gauge on and then off."""
    registry = CollectorRegistry()
    retry_window = 0.3
    with RedisServer() as server:
        async with RedisLimiter.from_url(
            server.url,
            name,
            max_at_once=2,
            retry_window=retry_window,
            lease_ttl=5,
            on_unavailable="local",
            metrics=registry,
        ) as limiter:
            async with limiter.slot() as permit:
                assert not permit.fallback
            assert value(registry, "aiometer_fallback_active", name) == 0
            server.pause()
            try:
                with anyio.fail_after(retry_window + 3):
                    first = await limiter.acquire()
                with anyio.fail_after(0.5):
                    second = await limiter.acquire()
                assert first.fallback
                assert second.fallback
                assert value(registry, "aiometer_fallback_active", name) == 1
                assert value(registry, "aiometer_fallbacks_total", name) == 1
                assert value(registry, "aiometer_held", name) == 2
                await first.release()
                await second.release()
                assert value(registry, "aiometer_held", name) == 0
            finally:
                server.resume()
            with anyio.fail_after(5):
                while True:
                    permit = await limiter.acquire()
                    await permit.release()
                    if not permit.fallback:
                        break
                    await anyio.sleep(0.02)
            assert value(registry, "aiometer_fallback_active", name) == 0
            fallback = value(registry, "aiometer_acquisitions_total", name, source="fallback")
            from_redis = value(registry, "aiometer_acquisitions_total", name, source="redis")
            assert fallback >= 2
            assert from_redis == 2
            assert value(registry, "aiometer_fallbacks_total", name) == 1
            assert value(registry, "aiometer_redis_errors_total", name, error="no_reply") >= 1
            assert value(registry, "aiometer_wait_seconds_count", name) == fallback + from_redis


# -- Redis calls -------------------------------------------------------------------------------


async def _acquire_release_rounds(limiter: RedisLimiter, rounds: int) -> None:
    for _ in range(rounds):
        permit = await limiter.acquire()
        await permit.release()


@pytest.mark.anyio
async def test_metrics_make_no_redis_calls_of_their_own(server: RedisServer, name: str) -> None:
    """Metrics observe; they make no Redis call of their own (the call histogram counts
    exactly one acquire call per uncontended round, which carries the previous round's
    release, and one more for the last release; without swaps, one acquire and one release
    call per round)."""
    for swap, acquires, releases in ((True, 11, 0), (False, 10, 10)):
        registry = CollectorRegistry()
        async with RedisLimiter.from_url(
            server.url, name, max_at_once=1, metrics=registry
        ) as limiter:
            limiter._swap = swap
            await _acquire_release_rounds(limiter, 10)
        calls = "aiometer_redis_call_seconds_count"
        assert value(registry, calls, name, script="acquire") == acquires
        assert value(registry, calls, name, script="release") == releases


@pytest.mark.anyio
async def test_lost_replies_count_once_each(
    server: RedisServer, name: str, raw: Any, anyio_backend: str
) -> None:
    """The scenario of test_faults' lost replies: a proxy cuts the connection after every 3rd
    acquire script has run, before its reply. The acquisitions are counted once each. With
    redis-py (asyncio) each dropped reply is one failed call (``unavailable``) and one more
    call; coredis (trio) sends the request again on a new connection by itself, so the limiter
    sees neither."""
    count = 15
    acquire = load_script("acquire")
    await raw.script_load(acquire.source)
    registry = CollectorRegistry()
    with anyio.fail_after(20):
        async with (
            TcpProxy(server.port, drop=script_rule([acquire.sha1], every=3)) as proxy,
            RedisLimiter.from_url(
                proxy.url, name, max_per_second=1000.0, metrics=registry
            ) as limiter,
        ):
            # One script call per acquisition: no starts reserved ahead for the next ones.
            limiter._reserving = False
            for _ in range(count):
                await limiter.acquire()
    dropped = len(proxy.dropped)
    assert dropped >= count // 3
    assert value(registry, "aiometer_acquisitions_total", name, source="redis") == count
    failed = value(registry, "aiometer_redis_errors_total", name, error="unavailable")
    assert failed == (dropped if anyio_backend == "asyncio" else 0)
    calls = value(registry, "aiometer_redis_call_seconds_count", name, script="acquire")
    assert calls == count + failed
