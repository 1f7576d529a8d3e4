"""The fleet demo and the operator commands, run as a person would: as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from aiometer_redis import RedisLimiter
from aiometer_redis._cli import build_parser
from aiometer_redis._demo import judge
from aiometer_redis._server import RedisServer

pytestmark = pytest.mark.redis


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiometer_redis", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_demo_short_run_holds_the_limits(tmp_path: Path) -> None:
    picture = tmp_path / "demo.png"
    result = _cli(
        "demo",
        "--no-progress",
        "--requests",
        "60",
        "--task-time",
        "0.1",
        "--max-per-second",
        "30",
        "--plot",
        str(picture),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All limits held." in result.stdout
    assert "max in flight" in result.stdout
    assert picture.stat().st_size > 10_000


@pytest.mark.slow
def test_demo_catches_a_broken_limit() -> None:
    # --local gives each of the 4 workers its own limit of 4: together they run up to 16.
    result = _cli(
        "demo",
        "--no-progress",
        "--local",
        "--requests",
        "80",
        "--max-at-once",
        "4",
        "--max-per-second",
        "500",
        "--task-time",
        "0.2",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout
    assert "A limit was broken." in result.stdout


def test_judge_counts_windows_and_overlap() -> None:
    requests = [(0.0, 1.0, 0), (0.1, 1.0, 1), (0.2, 0.3, 0), (2.0, 2.1, 1)]
    verdict = judge(requests, max_at_once=2, max_per_second=10, burst=1, task_time=0.1)
    assert verdict.max_in_flight == 3
    assert not verdict.concurrency_ok
    assert not verdict.ok
    assert verdict.per_worker == {0: 2, 1: 2}
    ok = judge(requests[:2], max_at_once=2, max_per_second=10, burst=1, task_time=0.1)
    assert ok.ok


def test_bad_cli_values_are_refused() -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--max-at-once", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--max-per-second", "nan"])


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


def test_status_and_reset(server: RedisServer) -> None:
    name = "ops {test}"
    outputs: dict[str, subprocess.CompletedProcess[str]] = {}

    async def hold_and_inspect() -> None:
        async with (
            RedisLimiter.from_url(server.url, name, max_at_once=2) as limiter,
            limiter.slot() as permit,
        ):
            result = await anyio.to_thread.run_sync(
                lambda: _cli("status", name, "--redis-url", server.url, "--json")
            )
            outputs["json"] = result
            outputs["table"] = await anyio.to_thread.run_sync(
                lambda: _cli("status", name, "--redis-url", server.url)
            )
            outputs["refused"] = await anyio.to_thread.run_sync(
                lambda: _cli("reset", name, "--redis-url", server.url)
            )
            outputs["reset"] = await anyio.to_thread.run_sync(
                lambda: _cli("reset", name, "--redis-url", server.url, "--yes")
            )
            outputs["after"] = await anyio.to_thread.run_sync(
                lambda: _cli("status", name, "--redis-url", server.url, "--json")
            )
            outputs["lease"] = subprocess.CompletedProcess([], 0, permit.lease_id, "")

    anyio.run(hold_and_inspect)
    status = json.loads(outputs["json"].stdout)
    assert [h["lease_id"] for h in status["holders"]] == [outputs["lease"].stdout]
    assert 0 < status["holders"][0]["expires_in"] <= 30
    assert outputs["lease"].stdout in outputs["table"].stdout
    assert "1 holder(s)" in outputs["table"].stdout
    assert outputs["refused"].returncode == 2
    assert "refusing to reset without --yes" in outputs["refused"].stderr
    assert outputs["reset"].returncode == 0
    assert "deleted" in outputs["reset"].stdout
    assert json.loads(outputs["after"].stdout)["holders"] == []
