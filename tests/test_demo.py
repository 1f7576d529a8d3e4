"""The fleet demo and the operator commands, run as a person would: as subprocesses."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from aiometer_redis import RedisLimiter
from aiometer_redis._cli import build_parser
from aiometer_redis.demo import judge
from aiometer_redis.testing import RedisServer

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


@pytest.mark.slow
def test_target_and_worker_roles(server: RedisServer) -> None:
    # The docker-compose / Kubernetes shape: one target process, workers started separately.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    limits = ["--max-at-once", "3", "--max-per-second", "50", "--task-time", "0.05"]
    demo = [sys.executable, "-m", "aiometer_redis", "demo"]
    target = subprocess.Popen(
        [*demo, "--role", "target", "--port", str(port), *limits],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert target.stdout is not None
        assert "target listening on" in target.stdout.readline()
        workers = [
            subprocess.Popen(
                [
                    *demo,
                    *("--role", "worker", "--worker-id", str(i), "--name", "roles"),
                    *("--redis-url", server.url, "--target-url", f"http://127.0.0.1:{port}"),
                    *("--requests", "20", *limits),
                ]
            )
            for i in range(2)
        ]
        for worker in workers:
            assert worker.wait(timeout=60) == 0
        seen = ""
        deadline = time.monotonic() + 30
        while "All limits held." not in seen and time.monotonic() < deadline:
            seen += target.stdout.readline()
        assert "All limits held." in seen, seen
        assert "w0: 20, w1: 20" in seen
    finally:
        target.terminate()
        target.wait(timeout=10)
        if target.stdout is not None:
            target.stdout.close()


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
