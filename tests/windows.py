"""Counting starts over sliding windows, for the rate-limit tests."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence


def max_in_window(times: Sequence[float], width: float) -> int:
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
    """Windows where more than ``burst + rate * width + 1`` starts happened.

    Returns ``(width, seen, allowed)`` for each width that broke the bound.
    """
    bad = []
    for width in widths:
        seen = max_in_window(times, width)
        allowed = burst + rate * width + 1
        if seen > allowed:
            bad.append((width, seen, allowed))
    return bad


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The largest number of (start, end) intervals open at one instant."""
    events = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    # Ends sort before starts at the same instant: a slot freed and taken at once is no overlap.
    events.sort(key=lambda event: (event[0], event[1]))
    current = best = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def over_limit_seconds(intervals: Sequence[tuple[float, float]], limit: int) -> float:
    """How long more than *limit* of the (start, end) intervals were open at once."""
    # Ends sort before starts at the same instant: a slot handed over is no overlap.
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
