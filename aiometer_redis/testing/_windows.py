"""Counting over windows: how a rate or concurrency limit is judged from the outside.

A rate limit of ``r`` per second with a burst of ``b`` allows, in any window of width ``w``,
at most ``b + r * w + 1`` starts (the ``+ 1`` absorbs a start that lands exactly on the
window's edge). A concurrency limit of ``n`` allows at most ``n`` intervals open at one instant.
The fleet demo's verdict and the project's own tests judge limits with these functions.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

__all__ = [
    "allowed_in_window",
    "max_in_window",
    "max_overlap",
    "over_limit_seconds",
    "window_violations",
]


def allowed_in_window(rate: float, burst: int, width: float) -> float:
    """The most starts a rate limit of *rate* per second and *burst* allows in *width* seconds."""
    return burst + rate * width + 1


def max_in_window(times: Iterable[float], width: float) -> int:
    """The largest number of *times* that fall in any closed window of length *width*."""
    ordered = sorted(times)
    best = 0
    for i, start in enumerate(ordered):
        end = bisect.bisect_right(ordered, start + width)
        best = max(best, end - i)
    return best


def window_violations(
    times: Sequence[float], rate: float, burst: int, widths: Iterable[float]
) -> list[tuple[float, int, float]]:
    """The windows where more starts happened than :func:`allowed_in_window`.

    Returns ``(width, seen, allowed)`` for each width in *widths* that broke the bound.
    """
    bad = []
    for width in widths:
        seen = max_in_window(times, width)
        allowed = allowed_in_window(rate, burst, width)
        if seen > allowed:
            bad.append((width, seen, allowed))
    return bad


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The largest number of ``(start, end)`` intervals open at one instant."""
    events = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    # Ends sort before starts at the same instant: a slot freed and taken at once is no overlap.
    events.sort()
    current = best = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def over_limit_seconds(intervals: Sequence[tuple[float, float]], limit: int) -> float:
    """How long more than *limit* of the ``(start, end)`` intervals were open at once."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    total = 0.0
    running = 0
    previous = 0.0
    for at, delta in events:
        if running > limit:
            total += at - previous
        running += delta
        previous = at
    return total
