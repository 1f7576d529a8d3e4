"""examples/llm_fleet.py, run as a user would: a short run that holds, and wrong ways in."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.redis

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "llm_fleet.py"


def _example(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # This interpreter already has the project installed: no .venv to prepare.
    environment = {**os.environ, "AIOMETER_PYTHON": sys.executable}
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=environment,
    )


def _row(output: str, label: str) -> list[int]:
    """The numbers of the verdict row that starts with *label* ("1,234 / 2,000" -> [1234, 2000])."""
    (line,) = [line for line in output.splitlines() if line.strip().startswith(label)]
    return [
        int(number.replace(",", "")) for number in re.findall(r"\d[\d,]*", line[len(label) + 2 :])
    ]


@pytest.mark.slow
def test_a_short_run_holds_both_limits() -> None:
    # 4 workers, 40 calls, at most 8 requests and 3,000 tokens in any 2 s: both windows bind
    # (a call is estimated at up to 656 tokens and uses about 330).
    result = _example(
        *("--requests", "40", "--rpm", "8", "--tpm", "3000", "--window", "2"),
        *("--margin", "0.25", "--report-every", "60"),
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert result.stderr == ""
    assert "rates=[Rate(8, per=2.25, counts='calls'), Rate(3000, per=2.25)]" in out
    assert out.rstrip().endswith("All limits held.")
    answered, expected, *per_worker = _row(out, "requests answered")
    assert answered == expected == 40
    assert per_worker == [0, 10, 1, 10, 2, 10, 3, 10]
    most_requests, rpm = _row(out, "max requests in any 2 s")
    most_tokens, tpm = _row(out, "max tokens in any 2 s")
    assert (rpm, tpm) == (8, 3000)
    assert 0 < most_requests <= 8
    assert 0 < most_tokens <= 3000
    # Held back by the limits, not idle: some window came close to them. (40 calls at about
    # 330 tokens need at least 4 windows of 3,000 tokens; unlimited, they would take ~1 s.)
    assert most_requests >= 6 or most_tokens >= 2000
    elapsed = float(re.findall(r"first to last request +([\d.]+) s", out)[0])
    assert elapsed >= 3 * 2
    (refused,) = _row(out, "refused (429)")
    assert refused == 0
    used, estimated = _row(out, "tokens used")
    # Estimates are upper bounds, settled down after each call.
    assert 0 < used < estimated
    (above,) = _row(out, "calls above their estimate")
    assert above == 0


@pytest.mark.slow
def test_limits_kept_per_worker_are_refused_by_the_endpoint() -> None:
    # --local: each of the 4 workers keeps 6 requests per second for itself; at once they
    # send up to 24, and the endpoint refuses what goes over 6.
    result = _example(
        *("--local", "--requests", "40", "--rpm", "6", "--tpm", "4000", "--window", "1"),
        "--report-every", "60",
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "an in-process RateLimiter EACH (--local)" in out
    refused, by_requests = _row(out, "refused (429)")
    assert refused >= 6
    assert f"({by_requests} by the requests window)" in out
    answered, expected, *_ = _row(out, "requests answered")
    assert (answered + refused, expected) == (40, 40)
    most_requests, _ = _row(out, "max requests in any 1 s")
    assert most_requests <= 6  # the endpoint itself never lets more through
    assert out.rstrip().endswith(f"{refused} request(s) refused: a limit would have been broken.")


@functools.cache
def _load_example() -> Any:
    """The example as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("llm_fleet", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_endpoint_refuses_what_would_break_a_window() -> None:
    example = _load_example()
    requests = example.Endpoint(rpm=3, tpm=100_000, window=60.0, seed=1)
    statuses = [requests.admit("x" * 400, 100, 0, 200)[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]  # the 4th request in the window
    verdict = example.judge(requests, expected=4)
    assert (verdict.answered, verdict.refused, verdict.max_requests) == (3, 1, 3)
    assert verdict.refused_by == {"requests": 1}
    assert not verdict.held
    # 1,000 prompt tokens and at least 10 of completion (10 % of max_tokens): over 1,000.
    tokens = example.Endpoint(rpm=100, tpm=1_000, window=60.0, seed=1)
    status, body = tokens.admit("x" * 4_000, 100, 1, 1_100)
    assert (status, body) == (429, {"error": "more than 1000 tokens in 60 s"})
    assert tokens.admit("x" * 3_000, 100, 1, 850)[0] == 200  # 750 + at most 100
    _, refused = tokens.snapshot()
    assert [call.refused_by for call in refused] == ["tokens"]
    for endpoint in (requests, tokens):
        endpoint.stop()


def test_the_busiest_window_is_half_open() -> None:
    example = _load_example()
    calls = [example.Call(at, 0, tokens, tokens) for at, tokens in [(0, 5), (1, 7), (2, 11)]]
    # Arrivals exactly one window apart never share it.
    assert example.busiest_window(calls, 1.0, "requests") == 1
    assert example.busiest_window(calls, 1.5, "tokens") == 18
    assert example.busiest_window(calls, 2.5, "requests") == 3


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_an_unreachable_redis_is_one_line() -> None:
    port = _closed_port()
    result = _example("--redis-url", f"redis://127.0.0.1:{port}/0")
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"llm_fleet: cannot use Redis at 127.0.0.1:{port}: "
        f"Error 111 connecting to 127.0.0.1:{port}. Connection refused."
    ]
    assert "All limits held." not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "argument --workers: must be >= 1, got 0"),
        (["--window", "nan"], "argument --window: must be > 0, got nan"),
        (["--redis-url", "http://x"], "argument --redis-url: expected a redis://"),
        (["--tpm", "500"], "--tpm 500 is below the largest estimate of a call (656 tokens)"),
        (["--name", ""], "name must not be empty"),
    ],
)
def test_bad_options_are_one_line(args: list[str], message: str) -> None:
    result = _example(*args)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("llm_fleet: error: ")
    assert message in line
    assert result.stdout == ""


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_stops_every_worker() -> None:
    # Ctrl-C in a terminal signals the foreground process group: the example and the
    # redis-server it started; the workers run in sessions of their own and are stopped by it.
    name = f"llm-{uuid.uuid4().hex[:8]}"
    environment = {**os.environ, "AIOMETER_PYTHON": sys.executable}
    run = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--name", name, "--report-every", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env=environment,
    )  # fmt: skip
    assert run.stdout is not None
    for line in run.stdout:
        if " answered, " in line:
            break
    assert len(_workers_named(name, parent=run.pid)) == 4
    os.killpg(run.pid, signal.SIGINT)
    out, err = run.communicate(timeout=30)
    assert run.returncode == 130, out + err
    assert err == "llm_fleet: interrupted\n"
    assert "Verdict" not in out
    assert _workers_named(name) == []


def _workers_named(name: str, parent: int | None = None) -> list[int]:
    """The live worker processes of the run called *name* (Linux /proc); with *parent*, only
    its children (a worker's own short-lived forks carry its command line too)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if parent is not None and int(ppid) != parent:
            continue
        role = arguments[arguments.index(b"--role") + 1] if b"--role" in arguments else b""
        if state != "Z" and role == b"worker" and name.encode() in arguments:
            found.append(int(entry.name))
    return found
