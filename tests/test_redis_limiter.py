"""RedisLimiter against a real redis-server: in one process on both backends, and as a fleet
of OS processes."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis as sync_redis
import redis.asyncio
from helpers.fleet import run_workers

import aiometer
import aiometer_redis
from aiometer_redis import (
    AcquireTimeoutError,
    ConfigurationError,
    LeaseLostError,
    RedisLimiter,
    RedisUnavailableError,
)
from aiometer_redis._keys import KEY_SUFFIXES, limiter_keys
from aiometer_redis.testing import RedisServer, max_overlap, window_violations

pytestmark = pytest.mark.redis

WORKER = Path(__file__).parent / "helpers" / "fleet_worker.py"


def test_public_names() -> None:
    # Subpackages (testing, demo) are public modules, not names to re-export.
    public = {
        n
        for n in dir(aiometer_redis)
        if not n.startswith("_") and not isinstance(getattr(aiometer_redis, n), types.ModuleType)
    }
    assert set(aiometer_redis.__all__) == public
    assert aiometer_redis.__all__ == sorted(aiometer_redis.__all__)


# -- one process, both backends ---------------------------------------------------------------


@pytest.mark.anyio
async def test_slot_statistics_and_reset(server: RedisServer, name: str) -> None:
    async with RedisLimiter.from_url(server.url, name, max_at_once=2, lease_ttl=5) as limiter:
        async with limiter.slot() as permit:
            stats = await limiter.statistics()
            assert [h.lease_id for h in stats.holders] == [permit.lease_id]
            assert 4 < stats.holders[0].expires_in <= 5
            assert stats.local_held == 1
            assert permit.token >= 1
        stats = await limiter.statistics()
        assert stats.holders == ()
        assert stats.local_held == 0
        await limiter.acquire()
        await limiter.reset()
        assert (await limiter.statistics()).holders == ()


@pytest.mark.anyio
@pytest.mark.parametrize("options", [{"max_at_once": 2}, {"max_per_second": 1000}])
async def test_fencing_tokens_keep_increasing_across_reset_and_expiry(
    server: RedisServer, name: str, options: dict[str, int]
) -> None:
    tokens: list[int] = []
    # A blocking client for the keys (redis.asyncio does not run on trio).
    with redis.Redis.from_url(server.url) as plain:
        async with RedisLimiter.from_url(server.url, name, **options) as limiter:
            await _three_rounds(limiter, plain, name, tokens)
    assert len(tokens) == 9
    assert all(a < b for a, b in itertools.pairwise(tokens)), tokens


async def _three_rounds(
    limiter: RedisLimiter, plain: redis.Redis, name: str, tokens: list[int]
) -> None:
    """Three slots per round; all of the limiter's keys deleted after the first round, and
    expired after the second."""
    for round_ in range(3):
        for _ in range(3):
            async with limiter.slot() as permit:
                tokens.append(permit.token)
        if round_ == 0:
            # Every key deleted: the counter behind the tokens starts again.
            await limiter.reset()
        elif round_ == 1:
            # Every key expires, as after key_ttl unused. (The limiter's renewal task may
            # refresh or write some again meanwhile, so until seq, the counter behind the tokens,
            # is gone.)
            with anyio.fail_after(5):
                while plain.exists(limiter.keys[4]):
                    for key in plain.keys(f"*{name}*"):
                        plain.pexpire(key, 1)
                    await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_max_at_once_in_one_process(server: RedisServer, name: str) -> None:
    running = peak = 0

    async def task(_: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.005)
        running -= 1

    async with RedisLimiter.from_url(server.url, name, max_at_once=3) as limiter:
        await aiometer.run_on_each(task, range(60), limiter=limiter)
        assert peak == 3
        stats = await limiter.statistics()
        assert stats.holders == ()
        assert stats.waiters == ()


@pytest.mark.anyio
async def test_rate_in_one_process(server: RedisServer, name: str) -> None:
    starts: list[float] = []

    async def task(_: int) -> None:
        starts.append(time.time())

    async with RedisLimiter.from_url(server.url, name, max_per_second=100, burst=3) as limiter:
        await aiometer.run_on_each(task, range(50), limiter=limiter, max_at_once=20)
    assert window_violations(starts, 100, 3, [0.01, 0.05, 0.1, 0.3]) == []
    assert (50 - 3) / (max(starts) - min(starts)) >= 0.8 * 100


@pytest.mark.anyio
async def test_cancelled_waiter_leaves_nothing_behind(server: RedisServer, name: str) -> None:
    async with RedisLimiter.from_url(server.url, name, max_at_once=1) as limiter:
        held = await limiter.acquire()
        with anyio.move_on_after(0.1):
            await limiter.acquire()
        stats = await limiter.statistics()
        assert stats.waiters == ()
        assert stats.local_waiting == 0
        await held.release()
        with anyio.fail_after(1):
            async with limiter.slot():
                pass
        assert (await limiter.statistics()).holders == ()


@pytest.mark.anyio
async def test_the_client_closes_after_the_background_tasks_cleaned_up(
    server: RedisServer, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A background task cancelled on exit may still use the client in shielded cleanup (a
    # subscription closed, the last releases sent): a client made from a URL is closed only
    # after every such task ended.
    outcome: list[str] = []
    start_background = RedisLimiter._start_background

    async def clean_up_late(limiter: RedisLimiter) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.05)
                assert limiter._client is not None
                try:
                    await limiter._client.ping()
                except Exception as exc:
                    outcome.append(f"failed: {exc!r}")
                else:
                    outcome.append("answered")

    def with_late_cleanup(limiter: RedisLimiter, task_group: Any) -> None:
        start_background(limiter, task_group)
        task_group.start_soon(clean_up_late, limiter)

    monkeypatch.setattr(RedisLimiter, "_start_background", with_late_cleanup)
    async with RedisLimiter.from_url(server.url, name, max_at_once=1) as limiter:
        await (await limiter.acquire()).release()
    assert outcome == ["answered"]


@pytest.mark.anyio
async def test_acquire_timeout(server: RedisServer, name: str) -> None:
    async with RedisLimiter.from_url(
        server.url, name, max_at_once=1, acquire_timeout=0.1
    ) as limiter:
        held = await limiter.acquire()
        start = anyio.current_time()
        with pytest.raises(AcquireTimeoutError, match=r"no slot within 0\.1s"):
            await limiter.acquire()
        assert anyio.current_time() - start < 1
        assert (await limiter.statistics()).waiters == ()
        await held.release()


@pytest.mark.anyio
async def test_lost_lease_is_reported(server: RedisServer, name: str) -> None:
    async with RedisLimiter.from_url(server.url, name, max_at_once=1, lease_ttl=0.3) as limiter:
        with pytest.raises(LeaseLostError, match="expired while the block ran"):
            async with limiter.slot():
                await limiter.reset()  # as if the lease had expired during a long pause
                await anyio.sleep(0.25)
        assert (await limiter.statistics()).leases_lost == 1


@pytest.mark.anyio
async def test_script_flush_mid_run(server: RedisServer, name: str, raw: Any) -> None:
    async def task(x: int) -> None:
        if x == 20:
            await raw.script_flush()
        await anyio.sleep(0.001)

    async with RedisLimiter.from_url(
        server.url, name, max_at_once=2, max_per_second=1000
    ) as limiter:
        await aiometer.run_on_each(task, range(40), limiter=limiter)
        assert (await limiter.statistics()).holders == ()


async def _script_calls(raw: Any) -> int:
    stats = await raw.info("commandstats")
    return sum(
        int(value["calls"])
        for key, value in stats.items()
        if key in ("cmdstat_evalsha", "cmdstat_eval")
    )


@pytest.mark.anyio
async def test_concurrent_calls_of_a_process_share_script_calls(
    server: RedisServer, name: str, raw: Any
) -> None:
    async def task(_: int) -> None:
        await anyio.lowlevel.checkpoint()

    # 50 workers asking at once: their acquisitions and releases travel together.
    async with RedisLimiter.from_url(server.url, name, max_at_once=1000) as limiter:
        before = await _script_calls(raw)
        await aiometer.run_on_each(task, range(300), limiter=limiter, max_at_once=50)
        calls = await _script_calls(raw) - before
        assert (await limiter.statistics()).holders == ()
    # Unmerged, 300 tasks would cost 600 calls (an acquire and a release each).
    assert calls < 0.8 * 600, calls

    async with RedisLimiter.from_url(server.url, name + "-rate", max_per_second=100_000) as rate:
        before = await _script_calls(raw)
        await aiometer.run_on_each(task, range(300), limiter=rate, max_at_once=50)
        calls = await _script_calls(raw) - before
    assert calls < 0.5 * 300, calls


@pytest.mark.anyio
async def test_keys_share_one_hash_tag_whatever_the_name(server: RedisServer) -> None:
    odd = "a}b{c:d %7B ünï"
    async with RedisLimiter.from_url(server.url, odd, max_at_once=1) as limiter:
        tags = {key[key.index("{") + 1 : key.index("}")] for key in limiter.keys}
        assert len(tags) == 1
        assert "{" not in tags.pop()
        async with limiter.slot():
            assert len((await limiter.statistics()).holders) == 1


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="give max_at_once, max_per_second or both"):
        RedisLimiter(None, "x")
    with pytest.raises(ConfigurationError, match="max_at_once must be >= 1, got 0"):
        RedisLimiter(None, "x", max_at_once=0)
    with pytest.raises(ConfigurationError, match="max_per_second must be a finite number"):
        RedisLimiter(None, "x", max_per_second=float("nan"))
    with pytest.raises(ConfigurationError, match=r"lease_ttl must be a finite number > 0\.1"):
        RedisLimiter(None, "x", max_at_once=1, lease_ttl=0)
    with pytest.raises(ConfigurationError, match="name must not be empty"):
        RedisLimiter(None, "", max_at_once=1)
    with pytest.raises(ConfigurationError, match="prefix must be non-empty and without braces"):
        RedisLimiter(None, "x", max_at_once=1, prefix="a{b}")
    with pytest.raises(ConfigurationError, match="lease_ttl must be at most 86400 s"):
        RedisLimiter(None, "x", max_at_once=1, lease_ttl=10**6)
    with pytest.raises(ConfigurationError, match="burst / max_per_second must be at most 86400"):
        RedisLimiter(None, "x", max_per_second=0.001, burst=100)
    with pytest.raises(ConfigurationError, match="on_unavailable must be 'fail' or 'local'"):
        RedisLimiter(None, "x", max_at_once=1, on_unavailable="ignore")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_lease_lost must be callable"):
        RedisLimiter(None, "x", max_at_once=1, on_lease_lost=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_at_once must be an int"):
        RedisLimiter(None, "x", max_at_once=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected a redis\.asyncio\.Redis"):
        RedisLimiter(object(), "x", max_at_once=1)
    assert issubclass(ConfigurationError, ValueError)


@pytest.mark.anyio
async def test_unreachable_redis_fails_closed_after_the_retry_window() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on that port any more: every connection is refused.
    async with RedisLimiter.from_url(
        f"redis://127.0.0.1:{port}/0", "down", max_at_once=1, retry_window=0.3
    ) as limiter:
        start = anyio.current_time()
        with pytest.raises(RedisUnavailableError, match=r"did not answer acquire within 0\.3s"):
            await limiter.acquire()
        assert 0.3 <= anyio.current_time() - start < 2


@pytest.mark.anyio
async def test_not_entered() -> None:
    limiter = RedisLimiter.from_url("redis://127.0.0.1:1", "x", max_at_once=1)
    with pytest.raises(RuntimeError, match="enter the limiter first"):
        await limiter.acquire()


# -- a fleet of OS processes ------------------------------------------------------------------


def _jain(counts: list[int]) -> float:
    return sum(counts) ** 2 / (len(counts) * sum(c * c for c in counts))


def _run_fleet(
    server: RedisServer,
    name: str,
    tmp_path: Path,
    per_process: Sequence[Sequence[str]],
    duration: float = 2.0,
) -> tuple[list[list[tuple[float, float]]], float, float]:
    """Run one worker per entry of *per_process* (its extra options), all starting together;
    return each one's task intervals and the demand window."""
    common = ["--url", server.url, "--name", name]
    outs, start_at = run_workers(WORKER, common, per_process, tmp_path, duration=duration)
    results = []
    for out in outs:
        intervals = json.loads(out.read_text())["intervals"]
        results.append([(float(a), float(b)) for a, b in intervals])
    return results, start_at, start_at + duration


CLIENTS = [
    pytest.param(["--backend", "asyncio", "--client", "redis"], id="asyncio-redis"),
    pytest.param(["--backend", "trio", "--client", "coredis"], id="trio-coredis"),
]


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_fleet_max_at_once(
    server: RedisServer, name: str, tmp_path: Path, client: list[str]
) -> None:
    limit = 6
    options = ["--max-at-once", str(limit), "--task-time", "0.05", "--pool", "8", *client]
    per_process, _, end = _run_fleet(server, name, tmp_path, [options] * 4)
    everything = [interval for intervals in per_process for interval in intervals]
    assert max_overlap(everything) <= limit
    # Busy share of the slots while demand exceeded them (32 local workers for 6 slots).
    first = min(start for start, _ in everything)
    busy = sum(max(0.0, min(b, end) - max(a, first)) for a, b in everything)
    assert busy / (limit * (end - first)) >= 0.9
    starts = [len(intervals) for intervals in per_process]
    assert _jain(starts) >= 0.9, starts


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("burst", [1, 5])
def test_fleet_max_per_second(
    server: RedisServer, name: str, tmp_path: Path, client: list[str], burst: int
) -> None:
    rate = 100.0
    options = ["--max-per-second", str(rate), "--burst", str(burst), "--pool", "8", *client]
    per_process, _, _ = _run_fleet(server, name, tmp_path, [options] * 4)
    starts = sorted(a for intervals in per_process for a, _ in intervals)
    widths = [1 / rate, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]
    # The schedule the server gave the fleet, exactly: each start's memory in grants,
    # "<token>|<start_at_us>", kept for lease_ttl (starts given back on exit are deleted).
    grants_key = limiter_keys(name)[KEY_SUFFIXES.index("grants")]
    with sync_redis.Redis.from_url(server.url) as raw:
        entries = raw.hvals(grants_key)
    scheduled = sorted(int(entry.split(b"|")[1]) / 1e6 for entry in entries)
    assert len(scheduled) >= len(starts)
    assert window_violations(scheduled, rate, burst, widths) == []
    # What the workers saw: a start begins a reply's latency after the server scheduled it,
    # so the starts of processes whose replies took different times can bunch by the
    # difference (more than 10 ms once on a loaded CI machine): one start more per window.
    assert window_violations(starts, rate, burst + 1, widths[3:]) == []
    achieved = (len(starts) - burst) / (starts[-1] - starts[0])
    assert achieved >= 0.95 * rate
    counts = [len(intervals) for intervals in per_process]
    assert _jain(counts) >= 0.9, counts


@pytest.mark.slow
def test_fleet_processes_that_disagree(server: RedisServer, name: str, tmp_path: Path) -> None:
    # Limits travel with each call: a process configured with 2 never takes a slot while 2
    # or more are held; one configured with 4 may fill up to 4. Together: at most 4.
    per_process, _, _ = _run_fleet(
        server,
        name,
        tmp_path,
        [
            ["--max-at-once", str(limit), "--task-time", "0.03", "--pool", "4"]
            for limit in (2, 2, 4)
        ],
        duration=1.5,
    )
    everything = [interval for intervals in per_process for interval in intervals]
    assert everything
    assert max_overlap(everything) <= 4


@pytest.mark.slow
@pytest.mark.anyio
async def test_sigkill_holder_gives_slots_back(
    server: RedisServer, name: str, anyio_backend: str
) -> None:
    lease_ttl = 2.0
    client = "redis" if anyio_backend == "asyncio" else "coredis"
    proc = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [
            sys.executable,
            str(WORKER),
            "--url",
            server.url,
            "--name",
            name,
            "--max-at-once",
            "3",
            "--lease-ttl",
            str(lease_ttl),
            "--hold",
            "3",
            "--backend",
            anyio_backend,
            "--client",
            client,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "HOLDING"
        async with RedisLimiter.from_url(
            server.url, name, max_at_once=3, lease_ttl=lease_ttl
        ) as limiter:
            assert len((await limiter.statistics()).holders) == 3
            os.kill(proc.pid, signal.SIGKILL)
            killed = anyio.current_time()
            proc.wait()
            with anyio.fail_after(lease_ttl + 5):
                permits = [await limiter.acquire() for _ in range(3)]
            assert anyio.current_time() - killed <= lease_ttl + 1
            holders = (await limiter.statistics()).holders
            assert sorted(h.lease_id for h in holders) == sorted(p.lease_id for p in permits)
            for permit in permits:
                await permit.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# -- a limiter per key ------------------------------------------------------------------------


class Sites:
    """Fake site fetches that record, per site, the peak concurrency and the finish times."""

    def __init__(self, sites: list[str], slow: float, fast: float) -> None:
        self.slow_site = sites[0]
        self._times = {site: slow if site == self.slow_site else fast for site in sites}
        self._running = dict.fromkeys(sites, 0)
        self.peak = dict.fromkeys(sites, 0)
        self.finished: dict[str, list[float]] = {site: [] for site in sites}

    async def fetch(self, site: str) -> None:
        self._running[site] += 1
        self.peak[site] = max(self.peak[site], self._running[site])
        await anyio.sleep(self._times[site])
        self._running[site] -= 1
        self.finished[site].append(anyio.current_time())

    def last_fast_finish(self) -> float:
        return max(
            t for site, times in self.finished.items() if site != self.slow_site for t in times
        )


@pytest.mark.anyio
async def test_limiter_group_per_site(server: RedisServer, name: str, anyio_backend: str) -> None:
    """Scraper-shaped, on Redis: one limiter per site from a group, items interleaved, one
    site slow; every site stays within its limit and the fast sites are not held up."""
    sites = [f"{name}-slow", f"{name}-a", f"{name}-b"]
    load = Sites(sites, slow=0.1, fast=0.02)
    if anyio_backend == "asyncio":
        client: Any = redis.asyncio.Redis.from_url(server.url)
    else:
        import coredis

        client = await coredis.Redis.from_url(server.url).__aenter__()
    try:
        async with aiometer_redis.RedisLimiterGroup(
            client, max_at_once=2, max_idle=1, idle_after=0.3
        ) as group:
            start = anyio.current_time()
            items = [site for _ in range(8) for site in sites]
            await aiometer.run_on_each(
                load.fetch, items, max_at_once=12, limiter=lambda site: group[site]
            )
            assert group[sites[1]] is group.for_key(sites[1])
            for site in sites:
                stats = await group[site].statistics()
                assert stats.holders == ()
                assert stats.max_at_once == 2
            # Idle limiters beyond max_idle are dropped as new keys come.
            await anyio.sleep(0.35)
            old = group[sites[0]]
            group[f"{name}-new"]
            # Kept: the two just used, and max_idle=1 of the two idle ones.
            assert len(group) == 3
            assert old is group[sites[0]]
    finally:
        if anyio_backend == "asyncio":
            await client.aclose()
        else:
            await client.__aexit__(None, None, None)
    assert load.peak == dict.fromkeys(sites, 2)
    # 8 slow items two at a time need 0.4 s; the fast sites finish well before.
    assert max(load.finished[sites[0]]) - start >= 0.35
    assert load.last_fast_finish() - start < 0.3


def test_limiter_group_checks_its_options() -> None:
    with pytest.raises(ConfigurationError, match="give max_at_once, max_per_second or both"):
        aiometer_redis.RedisLimiterGroup(redis.asyncio.Redis())
    with pytest.raises(ConfigurationError, match="max_idle must be >= 0"):
        aiometer_redis.RedisLimiterGroup(redis.asyncio.Redis(), max_idle=-1, max_at_once=1)


@pytest.mark.anyio
async def test_different_limits_per_site(server: RedisServer, name: str) -> None:
    """Three sites with their own RedisLimiter and their own limits (1, 2 and 3), items
    interleaved, the 1-slot site slow: each site holds its limit, the others keep flowing."""
    limits = {f"{name}-slow": 1, f"{name}-a": 2, f"{name}-b": 3}
    load = Sites(list(limits), slow=0.1, fast=0.03)

    async with (
        RedisLimiter.from_url(server.url, f"{name}-slow", max_at_once=1) as slow,
        RedisLimiter.from_url(server.url, f"{name}-a", max_at_once=2) as a,
        RedisLimiter.from_url(server.url, f"{name}-b", max_at_once=3) as b,
    ):
        by_site = {slow.name: slow, a.name: a, b.name: b}
        start = anyio.current_time()
        items = [site for _ in range(8) for site in limits]
        await aiometer.run_on_each(load.fetch, items, max_at_once=12, limiter=by_site.__getitem__)
        for limiter in by_site.values():
            assert (await limiter.statistics()).holders == ()
    assert load.peak == limits
    assert max(load.finished[load.slow_site]) - start >= 0.75
    assert load.last_fast_finish() - start < 0.5


class _Boom(Exception):
    pass


@pytest.mark.anyio
async def test_an_error_in_the_block_comes_out_as_itself(
    server: RedisServer, name: str, raw: Any
) -> None:
    # The limiter and the group run background tasks in a task group, which would wrap the
    # block's exception in an ExceptionGroup; both hand it back unwrapped.
    with pytest.raises(_Boom) as caught:
        async with RedisLimiter.from_url(server.url, name, max_at_once=1) as limiter:
            await limiter.acquire()
            raise _Boom
    assert type(caught.value) is _Boom
    with pytest.raises(_Boom) as caught:
        async with aiometer_redis.RedisLimiterGroup(raw, max_at_once=1) as group:
            await group[name + "-group"].acquire()
            raise _Boom
    assert type(caught.value) is _Boom
