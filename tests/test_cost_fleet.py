"""Costs, several windows and settle across a fleet of OS processes sharing one RedisLimiter.

Four worker processes (``helpers/cost_worker.py``) acquire with random costs under three Rates
(two counting cost, one counting calls) and settle their permits up and down; every window is
then checked from the recorded start times and costs, including the documented settle bound.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.cost_worker import Task, check_rate, load_tasks, max_started
from helpers.fleet import run_workers

from aiometer_redis.testing import RedisServer

pytestmark = pytest.mark.redis

WORKER = Path(__file__).parent / "helpers" / "cost_worker.py"

#: Recorded starts lag the limiter's decided starts by the worker's wake-up; within this, two
#: starts placed exactly one window apart may be recorded a little closer.
JITTER = 0.05

#: (limit, per, counts): 60 cost units per 0.5 s, 150 per 1.5 s, 22 calls per second.
RATES = [(60.0, 0.5, "cost"), (150.0, 1.5, "cost"), (22.0, 1.0, "calls")]

CLIENTS = [
    pytest.param(["--backend", "asyncio", "--client", "redis"], id="asyncio-redis"),
    pytest.param(["--backend", "trio", "--client", "coredis"], id="trio-coredis"),
]


def _run_fleet(
    server: RedisServer, name: str, tmp_path: Path, per_process: list[list[str]], duration: float
) -> list[list[Task]]:
    """Run one cost worker per entry of *per_process* (its extra options), starting together."""
    rates = [
        f"{limit:g},{per:g}" + (",calls" if counts == "calls" else "")
        for limit, per, counts in RATES
    ]
    common = ["--url", server.url, "--name", name]
    common += [option for spec in rates for option in ("--rate", spec)]
    seeded = [["--seed", f"{name}-{i}", *options] for i, options in enumerate(per_process)]
    outs, _ = run_workers(WORKER, common, seeded, tmp_path, duration=duration, lead=2.0)
    return [load_tasks(str(out)) for out in outs]


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_fleet_of_four_keeps_every_window_with_costs_and_settle(
    server: RedisServer, name: str, tmp_path: Path, client: list[str]
) -> None:
    # Two processes settle down (actual 20-90 % of the estimate), one up (100-150 %), one
    # either way (50-150 %), eight local tasks each: refunds and debts of several processes
    # meet in every window, and many starts are reserved before the settles of earlier ones.
    modes = ["down", "down", "up", "mixed"]
    per_process = _run_fleet(
        server, name, tmp_path, [["--settle", mode, *client] for mode in modes], duration=3.0
    )
    tasks = [task for tasks in per_process for task in tasks]
    assert all(len(tasks) >= 10 for tasks in per_process), [len(t) for t in per_process]
    assert any(task.overspend for task in tasks)
    assert any(task.actual < task.estimate for task in tasks)
    for limit, per, counts in RATES:
        assert check_rate(tasks, limit, per, counts, jitter=JITTER) == [], (limit, per, counts)
    # The limits were reached, not merely respected: the fleet was held back by them.
    assert max_started(tasks, 0.5, "actual") >= 0.6 * 60
    assert max_started(tasks, 1.5, "actual") >= 0.6 * 150
    assert max_started(tasks, 1.0, "calls") >= 0.6 * 22


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_fleet_of_four_reuses_what_settling_down_gives_back(
    server: RedisServer, name: str, tmp_path: Path, client: list[str]
) -> None:
    # One task at a time per process, costs of 5 to 15 settled down to 20-90 %: each
    # reservation comes after the settles before it, so the refunds make room at once.
    options = ["--settle", "down", "--pool", "1", "--min-cost", "5", "--max-cost", "15"]
    per_process = _run_fleet(server, name, tmp_path, [[*options, *client]] * 4, duration=3.0)
    tasks = [task for tasks in per_process for task in tasks]
    assert all(len(tasks) >= 5 for tasks in per_process), [len(t) for t in per_process]
    for limit, per, counts in RATES:
        assert check_rate(tasks, limit, per, counts, jitter=JITTER) == [], (limit, per, counts)
    # The estimates started in some long window add up to more than its limit: only refunds
    # at the original starts allow that (without them the estimates alone would fill it).
    assert max_started(tasks, 1.5 - JITTER, "estimate") > 150


# -- the checker itself -----------------------------------------------------------------------


def _task(start: float, estimate: float, actual: float | None = None, **times: float) -> Task:
    return Task(
        ask=times.get("ask", start),
        start=start,
        settled=times.get("settled"),
        estimate=estimate,
        actual=estimate if actual is None else actual,
    )


def test_check_rate_counts_cost_and_calls_in_half_open_windows() -> None:
    # 0.0 and 1.0 are one window apart: they never share one.
    tasks = [_task(0.0, 6), _task(0.3, 4), _task(1.0, 6)]
    assert check_rate(tasks, 10, 1.0, "cost", jitter=0) == []
    assert check_rate(tasks, 2, 1.0, "calls", jitter=0) == []
    # 6 + 4 + 6 within 1.0 s: the third is not a whole window after the first any more.
    crowded = [*tasks[:2], _task(0.9, 6)]
    assert len(check_rate(crowded, 10, 1.0, "cost", jitter=0)) == 1
    assert len(check_rate(crowded, 2, 1.0, "calls", jitter=0)) == 1
    # The jitter allowance shortens the window: 0.95 apart is "one window apart" with 0.05.
    edge = [_task(0.0, 10), _task(0.96, 10)]
    assert check_rate(edge, 10, 1.0, "cost", jitter=0) != []
    assert check_rate(edge, 10, 1.0, "cost", jitter=0.05) == []


def test_check_rate_excuses_only_overspend_settled_after_a_later_reservation() -> None:
    # The first task was estimated at 5 and settled at 8 (overspend 3) at t=0.5.
    early = _task(0.2, 5, 8, settled=0.5)
    # A later start asked for at 0.4 (before that settle): its reservation could not know.
    blind = _task(0.6, 5, ask=0.4)
    assert check_rate([early, blind], 10, 1.0, "cost", jitter=0) == []
    # Asked for at 0.55, after the settle: the debt was known, 13 > 10 is a broken window.
    informed = _task(0.6, 5, ask=0.55)
    assert len(check_rate([early, informed], 10, 1.0, "cost", jitter=0)) == 1
    # A settle down is never an excuse.
    down = _task(0.2, 5, 2, settled=0.5)
    assert len(check_rate([down, _task(0.6, 9, ask=0.4)], 10, 1.0, "cost", jitter=0)) == 1


def test_max_started_sums_what_was_asked() -> None:
    tasks = [_task(0.0, 4, 2), _task(0.5, 4, 3), _task(1.2, 1)]
    assert max_started(tasks, 1.0, "estimate") == 8
    assert max_started(tasks, 1.0, "actual") == 5
    assert max_started(tasks, 1.0, "calls") == 2
    assert max_started(tasks, 2.0, "calls") == 3
