"""Rate starts reserved ahead: the bookkeeping of one process's pool (no I/O here).

A rate-only limiter's script call can reserve, besides the start its caller asked for, the
next few starts of the fleet for this process's next acquisitions. They wait here, each with
its local start time, and are handed out in order, never before that time. How many to reserve
follows what the process used lately: about ``AHEAD`` seconds of its recent rate of starts,
never more than ``HORIZON`` seconds of the fleet's rate nor ``MAX_RESERVED``.
"""

from __future__ import annotations

import heapq

__all__ = ["AHEAD", "HORIZON", "LATE", "MAX_RESERVED", "ReservePool", "reserve_cap"]

#: About this many seconds of the process's recent rate are reserved ahead.
AHEAD = 0.010
#: No start reserved ahead lies further away than this (seconds).
HORIZON = 0.05
#: A reserved start is handed out at most this late (seconds); later, it is dropped (unused).
LATE = 0.002
#: At most this many starts are reserved in one call.
MAX_RESERVED = 64

#: How much one new measurement of the rate of starts weighs in the estimate.
_SMOOTHING = 0.5


def reserve_cap(max_per_second: float) -> int:
    """The most starts one call may take for a limiter of *max_per_second* (1: none ahead)."""
    return max(1, min(MAX_RESERVED, int(HORIZON * max_per_second)))


class ReservePool:
    """The starts one process reserved ahead: ``(local start time, waiter id, token)``.

    Args:
        cap: the most starts one call may take (see :func:`reserve_cap`).
    """

    __slots__ = ("_entries", "_handed", "_rate", "_since", "cap", "dropped")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._entries: list[tuple[float, str, int]] = []
        #: Starts dropped because nobody took them in time (they are lost to the fleet).
        self.dropped = 0
        # Starts handed out since _since (the last reservation call), and the estimate of the
        # process's rate of starts per second (None: no call made yet).
        self._handed = 0
        self._since: float | None = None
        self._rate: float | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, now: float, deadline: float | None) -> tuple[float, str, int] | None:
        """The earliest start not yet too late, if it lies before *deadline*; starts more
        than ``LATE`` behind *now* are dropped first."""
        self.drop_late(now)
        entries = self._entries
        if not entries or (deadline is not None and entries[0][0] > deadline):
            return None
        self._handed += 1
        return heapq.heappop(entries)

    def handed(self) -> None:
        """Count a start a call handed straight to its caller (not through the pool)."""
        self._handed += 1

    def put(self, at: float, waiter_id: str, token: int) -> None:
        """Add a reserved start (or one a cancelled caller did not use)."""
        heapq.heappush(self._entries, (at, waiter_id, token))

    def put_back(self, entry: tuple[float, str, int]) -> None:
        """Return a start taken with :meth:`take` that its caller did not use."""
        self._handed -= 1
        heapq.heappush(self._entries, entry)

    def drop_late(self, now: float) -> None:
        """Drop the starts more than ``LATE`` behind *now*."""
        entries = self._entries
        while entries and entries[0][0] < now - LATE:
            heapq.heappop(entries)
            self.dropped += 1

    def ahead(self, now: float) -> list[tuple[float, str, int]]:
        """Empty the pool; return the starts still ahead of *now*, latest first."""
        entries, self._entries = self._entries, []
        return sorted((entry for entry in entries if entry[0] > now), reverse=True)

    def wanted(self, now: float) -> int:
        """How many starts a call made at *now* should reserve for the process's next
        acquisitions (beyond the callers waiting): about ``AHEAD`` seconds of its recent rate,
        less what the pool holds. Call once per reservation call: it starts a new
        measurement."""
        since, handed = self._since, self._handed
        self._since, self._handed = now, 0
        if since is not None and now > since:
            measured = handed / (now - since)
            rate = self._rate
            self._rate = measured if rate is None else rate + _SMOOTHING * (measured - rate)
        if self._rate is None:
            return 1  # the first call: one ahead, so the next acquisition measures the rate
        return max(0, min(self.cap - 1, round(self._rate * AHEAD) - len(self._entries)))

    def running_low(self) -> bool:
        """True when the pool holds less than half of what the recent rate uses in
        ``AHEAD``: time to reserve more before a caller finds it empty."""
        rate = self._rate
        return rate is not None and len(self._entries) * 2 < min(self.cap, rate * AHEAD)
