"""Push-back across a fleet of OS processes on a real redis-server: the pause, the adaptive
rate (one cut per burst of 429s, then recovery) and limits set at run time, each with
redis-py on asyncio and coredis on trio.

Start times are taken by the workers on their own clocks as each task starts; the scripts
decide on the Redis clock. The two differ by a round trip or so: every boundary below is
judged with 0.1 s of tolerance (as the other fleet tests do).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from aiometer_redis.testing import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

WORKER = Path(__file__).parent / "helpers" / "pushback_worker.py"
#: How far the workers' clocks may lag the server's decisions (a round trip or so).
LAG = 0.1

CLIENTS = [
    pytest.param(["--backend", "asyncio", "--client", "redis"], id="asyncio-redis"),
    pytest.param(["--backend", "trio", "--client", "coredis"], id="trio-coredis"),
]


def _run_fleet(
    server: RedisServer,
    name: str,
    tmp_path: Path,
    per_process: Sequence[Sequence[str]],
    duration: float,
) -> tuple[list[dict[str, Any]], float]:
    """Run one worker per entry of *per_process* (its options), all starting together; return
    what each one recorded and the common start time."""
    start_at = time.time() + 1.5
    outs = [tmp_path / f"worker{i}.json" for i in range(len(per_process))]
    common = [sys.executable, str(WORKER), "--url", server.url, "--name", name]
    timing = ["--start-at", repr(start_at), "--duration", repr(duration)]
    procs = [
        subprocess.Popen([*common, *timing, "--out", str(out), *options])
        for out, options in zip(outs, per_process, strict=True)
    ]
    for proc in procs:
        assert proc.wait(timeout=duration + 60) == 0
    return [json.loads(out.read_text()) for out in outs], start_at


def _starts(results: Sequence[dict[str, Any]]) -> list[float]:
    return sorted(t for result in results for t in result["starts"])


def _count(starts: Sequence[float], begin: float, end: float) -> int:
    return sum(1 for t in starts if begin <= t < end)


@pytest.mark.parametrize("client", CLIENTS)
def test_no_process_starts_inside_a_pause(
    server: RedisServer, name: str, tmp_path: Path, client: list[str]
) -> None:
    rate = 50.0
    options = ["--max-at-once", "4", "--max-per-second", str(rate), "--task-time", "0.02"]
    pauser = [*options, "--pause-at", "1.0", "--pause-for", "1.2", *client]
    results, _ = _run_fleet(
        server, name, tmp_path, [pauser, [*options, *client], [*options, *client]], 3.5
    )
    before, after, left = results[0]["pause"]
    assert left == pytest.approx(1.2, abs=0.01)
    starts = _starts(results)
    # The pause runs from the server's "now" (between before and after) for 1.2 s. Starts
    # granted before the call keep their time: at most max_at_once of them, one interval
    # apart, so none is later than 4 intervals after the call.
    quiet_from = after + 4 / rate + LAG
    quiet_until = before + 1.2 - LAG
    inside = [t for t in starts if quiet_from <= t < quiet_until]
    assert inside == [], (inside, quiet_from, quiet_until)
    # Work ran before the pause and resumed after it, at the full rate, in every process.
    assert _count(starts, before - 0.5, before) >= 0.8 * 0.5 * rate
    assert _count(starts, before + 1.2 + LAG, before + 2.2) >= 0.8 * (1.0 - LAG) * rate
    for result in results:
        assert any(t > before + 1.2 for t in result["starts"])


@pytest.mark.parametrize("client", CLIENTS)
def test_a_burst_of_429s_from_every_worker_cuts_once_then_recovers(
    server: RedisServer, name: str, tmp_path: Path, client: list[str]
) -> None:
    rate, recovery = 40.0, 10.0
    options = [
        "--max-per-second", str(rate), "--adaptive", "--recovery", str(recovery),
        "--cooldown", "1.0", "--throttle-from", "1.0", "--throttle-until", "1.4", *client,
    ]  # fmt: skip
    results, start = _run_fleet(
        server, name, tmp_path, [[*options, "--sample"], options, options], 8.0
    )
    # Every worker reported 429s for 0.4 s (about 16 reports in all): within one cool-down,
    # one cut.
    reports = _count(_starts(results), start + 1.0, start + 1.4)
    assert reports >= 8
    assert sum(result["cuts"] for result in results) == 1
    starts = _starts(results)
    # Before: the full rate. After the cut (to 20/s, recovering by 3.8/s each second; starts
    # reserved before it, up to 12 workers / 40 per s = 0.3 s ahead, keep their time): about
    # 22/s in the half second from 1.5 s.
    assert _count(starts, start + 0.2, start + 1.0) >= 0.85 * 0.8 * rate
    after_cut = _count(starts, start + 1.5, start + 2.0)
    assert after_cut <= 0.7 * rate * 0.5, after_cut
    # Back to the maximum (40/s) about 5.3 s after the cut: the full rate in the last second.
    assert _count(starts, start + 7.0, start + 8.0) >= 0.85 * rate
    # The effective rate statistics() reports: cut to about half, then rising to the max.
    samples = [(t - start, r) for t, r in results[0]["rates"]]
    cut = [r for t, r in samples if 1.0 + LAG <= t < 1.2]
    assert cut, samples
    assert all(19 <= r <= 21 for r in cut), samples
    later = [r for t, r in samples if 1.2 <= t < 6.0]
    assert later == sorted(later)
    assert later[-1] < rate
    assert all(r == pytest.approx(rate) for t, r in samples if t >= 7.0), samples


@pytest.mark.parametrize("client", CLIENTS)
def test_limits_set_at_run_time_apply_from_the_next_call(
    server: RedisServer, name: str, tmp_path: Path, client: list[str]
) -> None:
    rate = 50.0
    options = ["--max-per-second", str(rate), "--max-at-once", "8", *client]
    operator = [*options, "--set-at", "1.0", "--set-rate", "10", "--clear-at", "2.5"]
    results, _ = _run_fleet(server, name, tmp_path, [operator, options, options], 5.0)
    set_at, clear_at = results[0]["set"], results[0]["clear"]
    starts = _starts(results)
    # Before: 50/s. From the next call after set_limits: 10/s (plus the starts already
    # reserved at 50/s, at most max_at_once). After clear_limits: 50/s again, once the starts
    # reserved at 10/s (at most max_at_once = 8, so 0.8 s ahead) have passed.
    assert _count(starts, set_at - 0.8, set_at) >= 0.85 * 0.8 * rate
    slow = _count(starts, set_at, clear_at)
    assert slow <= 10 * (clear_at - set_at) + 8 + 1, slow
    assert slow >= 0.8 * 10 * (clear_at - set_at - 8 / rate - LAG)
    assert _count(starts, clear_at + 0.8 + LAG, clear_at + 1.8 + LAG) >= 0.85 * rate
