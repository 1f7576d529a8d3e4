"""The fleet demo and the operator commands, run as a person would: as subprocesses."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiometer_redis import RedisLimiter
from aiometer_redis._cli import build_parser
from aiometer_redis.demo import Capacity, TargetServer, Verdict, judge, judge_pushback
from aiometer_redis.demo._verdict import TRANSPORT_SLACK
from aiometer_redis.demo._workers import retry_after_of
from aiometer_redis.testing import RedisServer, allowed_in_window

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


def test_judge_allows_for_the_measured_time_to_arrive() -> None:
    # Four arrivals within 100 ms at 10 per second (burst 1): more than 1 + 10 x 0.11 + 1 if
    # they arrived within 10 ms of their start, not if the first took 150 ms (the four may
    # then have started 250 ms apart, which the limit allows).
    bunch = [(1.0, 1.2, 0), (1.03, 1.2, 1), (1.06, 1.2, 0), (1.09, 1.2, 1)]
    late = (5.0, 5.1, 0)
    requests = [*bunch, late]

    def verdict(transits: list[tuple[float, float]] | None) -> Verdict:
        return judge(
            requests,
            max_at_once=None,
            max_per_second=10,
            burst=1,
            task_time=0.1,
            transits=transits,
        )

    unknown = verdict(None)
    assert not unknown.ok
    assert not unknown.measured
    assert {check.slack for check in unknown.windows} == {TRANSPORT_SLACK}
    quick = verdict([(a, 0.002) for a, _, _ in requests])
    assert not quick.ok  # never less than TRANSPORT_SLACK
    slow = verdict([(1.0, 0.15), (1.03, 0.002), (1.06, 0.002), (1.09, 0.002), (5.0, 0.002)])
    assert slow.ok
    tenth = [check for check in slow.windows if check.width == 0.1]
    assert len(tenth) == 1
    assert tenth[0].seen <= tenth[0].allowed
    # A request that took long elsewhere does not widen the windows of the bunch.
    elsewhere = verdict([(a, 0.002) for a, _, _ in bunch] + [(5.0, 0.5)])
    assert not elsewhere.ok
    broken = [check for check in elsewhere.windows if not check.ok]
    assert broken
    assert all(check.slack == TRANSPORT_SLACK for check in broken)
    # A slow request at the end of a window does not cover the quick bunch before it.
    tail = [(1.0, 1.2, 0), (1.02, 1.2, 1), (1.04, 1.2, 0), (1.06, 1.2, 1), (1.09, 1.2, 0)]
    covered = judge(
        tail,
        max_at_once=None,
        max_per_second=10,
        burst=1,
        task_time=0.1,
        transits=[(a, 0.002) for a, _, _ in tail[:4]] + [(1.09, 0.3)],
    )
    tenth = [check for check in covered.windows if check.width == 0.1]
    assert [(check.seen, check.allowed) for check in tenth] == [(4, 3)]


@given(
    st.lists(
        st.tuples(st.integers(0, 400), st.sampled_from([0.0, 0.002, 0.01, 0.03, 0.08, 0.3])),
        min_size=1,
        max_size=40,
    )
)
def test_judge_finds_the_window_nearest_its_limit(points: list[tuple[int, float]]) -> None:
    # Against every run of consecutive arrivals within the width, judged one by one.
    requests = [(ms / 1000, ms / 1000 + 0.1, 0) for ms, _ in points]
    transits = [(ms / 1000, took) for ms, took in points]
    verdict = judge(
        requests, max_at_once=None, max_per_second=20, burst=2, task_time=0.1, transits=transits
    )
    took: dict[float, float] = {}
    for arrival, seconds in transits:
        took[arrival] = max(seconds, took.get(arrival, seconds))
    arrivals = sorted(a for a, _, _ in requests)
    for check in verdict.windows:
        margins = []
        for first in range(len(arrivals)):
            for last in range(first, len(arrivals)):
                if arrivals[last] > arrivals[first] + check.width:
                    break
                slack = max(max(TRANSPORT_SLACK, took[a]) for a in arrivals[first : last + 1])
                allowed = math.floor(allowed_in_window(20, 2, check.width + slack))
                margins.append(allowed - (last - first + 1))
        assert check.allowed - check.seen == min(margins)


def test_target_measures_how_long_requests_take_to_arrive() -> None:
    target = TargetServer("127.0.0.1", 0, task_time=0.01).start()
    try:
        with httpx.Client(base_url=target.url) as http:
            assert http.get("/work", params={"worker": 0}).status_code == 200
            assert target.recorder.transit_log() == []  # nobody said when they sent
            sent = time.time() - 0.2
            assert http.get("/work", params={"worker": 0, "sent": sent}).status_code == 200
            assert http.get("/work", params={"worker": 1, "sent": repr(time.time())}).is_success
            assert http.get("/work", params={"worker": 0, "sent": "nan"}).status_code == 400
            assert http.get("/work", params={"worker": 0, "sent": "soon"}).status_code == 400
        log = target.recorder.transit_log()
        assert 0.2 <= max(took for _, took in log) < 5
        requests, _, _ = target.recorder.snapshot()
        assert len(requests) == 3
        assert len(log) == 2  # the request without &sent= is not in it
        assert {round(arrival, 6) for arrival, _ in log} <= {round(a, 6) for a, _, _ in requests}
    finally:
        target.stop()


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


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_demo_checks_redis_once_before_the_workers() -> None:
    port = _closed_port()
    result = _cli("demo", "--no-progress", "--redis-url", f"redis://127.0.0.1:{port}/0")
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr == (
        f"aiometer-redis: cannot use Redis at 127.0.0.1:{port}: Connection refused\n"
    )
    assert "workers" not in result.stdout
    assert "All limits held." not in result.stdout


def test_a_worker_says_why_it_failed_in_one_line() -> None:
    redis_port, target_port = _closed_port(), _closed_port()
    result = _cli(
        "demo", "--role", "worker", "--worker-id", "5", "--requests", "3",
        "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
        "--target-url", f"http://127.0.0.1:{target_port}",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines() == [
        f"worker 5: cannot use Redis at 127.0.0.1:{redis_port}: Connection refused"
    ]


@pytest.mark.slow
def test_workers_failing_alike_are_reported_once_and_no_verdict_is_claimed() -> None:
    redis = RedisServer().start()
    port = redis.port
    try:
        demo = subprocess.Popen(
            [sys.executable, "-m", "aiometer_redis", "demo", "--no-progress",
             "--redis-url", redis.url, "--requests", "2000"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert demo.stdout is not None
        for line in demo.stdout:
            if line.startswith("done ") and not line.startswith("done 0/"):
                break
        redis.stop()  # mid-run: every worker loses Redis
        out, err = demo.communicate(timeout=60)
    finally:
        redis.stop()
    assert demo.returncode == 3, out + err
    (line,) = err.splitlines()
    assert line.startswith(f"aiometer-redis: 4 worker(s): cannot use Redis at 127.0.0.1:{port}: ")
    assert "All limits held." not in out
    assert "Incomplete:" in out


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_leaves_no_process() -> None:
    # Ctrl-C in a terminal sends SIGINT to the foreground process group: the demo and the
    # embedded redis-server it started.
    demo = subprocess.Popen(
        [sys.executable, "-m", "aiometer_redis", "demo", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert demo.stdout is not None
    for line in demo.stdout:
        if line.startswith("done ") and not line.startswith("done 0/"):
            break
    children = _descendants(demo.pid)
    assert len(children) >= 5  # four workers and the redis-server
    os.killpg(demo.pid, signal.SIGINT)
    out, err = demo.communicate(timeout=30)
    assert demo.returncode == 130, out + err
    assert err == "aiometer-redis: interrupted\n"
    deadline = time.monotonic() + 5
    while (alive := [pid for pid in children if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive == []


def _descendants(pid: int) -> list[int]:
    """Every process below *pid* (Linux /proc)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- against a target that pushes back (--target-capacity) -----------------------------------


def test_capacity_admits_per_second_and_says_when_there_is_room() -> None:
    capacity = Capacity(3)
    assert [capacity.admit(t) for t in (10.0, 10.2, 10.4)] == [None, None, None]
    assert capacity.admit(10.5) == pytest.approx(0.5)
    assert capacity.admit(10.9) == pytest.approx(0.1)
    # The first admitted request left the window: room for one, not more.
    assert capacity.admit(11.0) is None
    assert capacity.admit(11.1) == pytest.approx(0.1)


def test_retry_after_is_read_as_seconds() -> None:
    class Answer:
        def __init__(self, value: str | None) -> None:
            self.headers = {} if value is None else {"Retry-After": value}

    assert retry_after_of(Answer("0.250")) == 0.25
    assert retry_after_of(Answer("2")) == 2.0
    assert retry_after_of(Answer(None)) is None
    assert retry_after_of(Answer("Wed, 21 Oct 2015 07:28:00 GMT")) is None
    assert retry_after_of(Answer("-1")) is None
    assert retry_after_of(Answer("nan")) is None


def test_judge_pushback_counts_after_convergence() -> None:
    # 10 s at 27 served per second from t=100, and 429s: 40 in the first 5 s, 5 after.
    served = [(100 + i / 27, 100 + i / 27 + 0.1, 0) for i in range(270)]
    refused = [(100 + i * 0.1, 0, 50.0) for i in range(40)] + [(106 + i, 1, 30.0) for i in range(5)]
    verdict = judge_pushback(served, refused, capacity=30, adaptive=True)
    assert (verdict.served, verdict.refused, verdict.refused_after) == (270, 45, 5)
    assert verdict.served_after == 135
    assert verdict.refused_share == pytest.approx(5 / 140)
    assert verdict.throughput_share == pytest.approx(135 / (100 + 269 / 27 - 105) / 30)
    assert verdict.held
    # The same run with 10 more 429s after convergence: over 5%.
    more = refused + [(107.5 + i / 20, 2, 30.0) for i in range(10)]
    assert not judge_pushback(served, more, capacity=30, adaptive=True).held
    # Or with a capacity twice as high: under 85% of it.
    assert not judge_pushback(served, refused, capacity=60, adaptive=True).held
    # A run shorter than the convergence shows nothing.
    short = judge_pushback(served[:100], [], capacity=30, adaptive=True)
    assert short.refused_share is None
    assert short.throughput_share is None
    assert not short.held


def test_no_adaptive_without_a_target_capacity_is_refused() -> None:
    result = _cli("demo", "--no-progress", "--local", "--no-adaptive")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (
        "aiometer-redis: --no-adaptive needs --target-capacity (without a target that pushes "
        "back there is nothing to adapt to)\n"
    )
    assert result.stdout == ""
    result = _cli("demo", "--target-capacity", "0")
    assert result.returncode == 2
    assert "--target-capacity" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def _pushback_row(stdout: str, label: str) -> str:
    (row,) = [line for line in stdout.splitlines() if label in line]
    return row


@pytest.mark.slow
def test_demo_in_process_adaptive_converges_on_the_target_capacity() -> None:
    # One worker, its own adaptive RateLimiter: configured at 100/s against a target of 30/s.
    result = _cli(
        "demo", "--no-progress", "--local", "--workers", "1", "--requests", "420",
        "--target-capacity", "30",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Push-back held" in result.stdout
    assert "All limits held." in result.stdout
    assert "OK" in _pushback_row(result.stdout, "share answered 429")
    assert "OK" in _pushback_row(result.stdout, "throughput / capacity")


@pytest.mark.slow
def test_demo_without_adaptive_says_which_target_it_missed() -> None:
    # Retry-After alone (a pause after each 429) keeps the throughput, at the cost of many
    # 429s: the verdict says so and the demo exits 1.
    result = _cli(
        "demo", "--no-progress", "--local", "--workers", "1", "--requests", "420",
        "--target-capacity", "30", "--no-adaptive",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not adaptive (--no-adaptive)" in result.stdout
    assert "MISSED" in _pushback_row(result.stdout, "share answered 429")
    assert "Push-back missed its targets." in result.stdout
    assert "Push-back held" not in result.stdout


@pytest.mark.slow
def test_demo_fleet_converges_on_the_target_capacity(tmp_path: Path) -> None:
    # Four worker processes share one adaptive RedisLimiter at 100/s against a target of 30/s:
    # the 429s every worker reports cut the fleet's rate, once per cool-down.
    picture = tmp_path / "pushback.png"
    result = _cli(
        "demo", "--no-progress", "--requests", "420", "--target-capacity", "30",
        "--plot", str(picture),
    )  # fmt: skip
    assert "Push-back held" in result.stdout, result.stdout + result.stderr
    assert "OK" in _pushback_row(result.stdout, "share answered 429")
    assert "OK" in _pushback_row(result.stdout, "throughput / capacity")
    assert "max_per_second=100.0" in result.stdout
    # Exit 0 exactly when the limiter's own limits held too (they are checked as always).
    assert result.returncode == (0 if "All limits held." in result.stdout else 1), result.stdout
    assert picture.stat().st_size > 10_000


@pytest.mark.slow
def test_demo_fleet_without_adaptive_keeps_sending_too_many() -> None:
    result = _cli(
        "demo", "--no-progress", "--requests", "420", "--target-capacity", "30", "--no-adaptive",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not adaptive (--no-adaptive)" in result.stdout
    assert "MISSED" in _pushback_row(result.stdout, "share answered 429")
    assert "Push-back missed its targets." in result.stdout
