"""Costs, several windows and settle across a fleet of OS processes sharing one RedisLimiter.

Four worker processes (``helpers/cost_worker.py``) acquire with random costs under three Rates
(two counting cost, one counting calls) and settle their permits up and down; every window is
then checked from the recorded start times and costs, including the documented settle bound.
"""

from __future__ import annotations

from helpers.cost_worker import Task, check_rate, max_started

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
